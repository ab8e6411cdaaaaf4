"""Run a function right after a module is first imported (at once if it already is).

Ray runs the trainer's worker setup hook in every worker process of the job, also in those that never build a
verl worker (verl's register-center actor of each worker group, which only needs ``import verl``). Patching
verl there meant importing its workers, transformers and our actor first: about 2 s more per process start
(2-core VM). Deferring the patches to the first import of ``verl.workers`` keeps them ahead of every verl worker
class, which can only be reached through that package.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, then ``callback``; everything else is the original loader's."""

    def __init__(self, loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code... of the real loader
        return getattr(self._loader, name)


class _Watch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give ``name``, once, then leaves sys.meta_path."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallbackLoader(spec.loader, self.callback)
                return spec
        return None


def call_after_import(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once module ``name`` has executed (before the import statement that loads it returns),
    or now if it is already imported."""
    if name in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _Watch(name, callback))
