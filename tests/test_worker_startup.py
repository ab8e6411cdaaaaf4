"""What makes a trainer run's Ray worker processes start sooner: the setup hook patches verl only where its
workers load (verl_tre.utils.after_import), and each worker group's register center runs in a process that
never imports verl (verl_tre.utils.register_center)."""

from __future__ import annotations

import subprocess
import sys

from trainer_fixtures import REPO
from verl_tre.utils.after_import import call_after_import


def test_the_callback_runs_once_right_after_the_module_executes(tmp_path, monkeypatch):
    package = tmp_path / "watched_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 41\n")
    (package / "child.py").write_text("import watched_pkg\nSEEN = watched_pkg.VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def patch():
        module = sys.modules["watched_pkg"]
        calls.append(module.VALUE)
        module.VALUE += 1  # a patch made before anything that imports the package can use it

    call_after_import("watched_pkg", patch)
    assert calls == [] and "watched_pkg" not in sys.modules
    import watched_pkg.child

    assert calls == [41] and watched_pkg.child.SEEN == 42
    import importlib

    importlib.import_module("watched_pkg")
    assert calls == [41]  # not again, and the finder is gone
    assert not any(type(finder).__name__ == "_Watch" for finder in sys.meta_path)
    call_after_import("watched_pkg", lambda: calls.append("now"))  # already imported: at once
    assert calls == [41, "now"]
    for name in ("watched_pkg", "watched_pkg.child"):
        sys.modules.pop(name)


def test_the_register_center_keeps_verl_s_interface():
    import verl.single_controller.base.register_center.ray as verl_register_center

    from verl_tre import plugin
    from verl_tre.utils.register_center import RegisterCenter, create_register_center

    plugin.install()
    assert verl_register_center.create_worker_group_register_center is create_register_center
    center = RegisterCenter({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    center.set_worker_info(1, "node-b")
    center.set_worker_info(0, "node-a")
    assert center.get_rank_zero_info() == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert center.get_worker_info() == {0: "node-a", 1: "node-b"}


def test_a_register_center_process_imports_neither_verl_nor_the_patches():
    """What the register center's Ray worker process runs, the setup hook and the actor's module, imports no
    verl, torch or transformers (the hook patches verl only once verl.workers is imported; the trainer runs in
    -m slow show that the patches then take effect)."""
    code = ("import sys\n"
            "from verl_tre.trainer.main_ppo import setup_worker_process\n"
            "setup_worker_process()\n"
            "import verl_tre.utils.register_center\n"
            "print(sorted(m for m in ('verl', 'torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "VERL_TRE_CPU_MODE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
