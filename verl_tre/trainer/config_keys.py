"""Keys added with Hydra's ``+`` that nothing would read.

Hydra refuses a misspelt key and suggests the ``+`` form that adds it; the added key then sits in the config,
ignored, and the run trains with the default. A key that
is in none of the config files (verl's ppo_trainer.yaml, ours and every preset) is accepted only where new keys
are the point (``OPEN_SUBTREES``: model config overrides, reward and engine keyword arguments) or where verl or
verl_tre reads it by name (verl reads many optional keys with ``config.get("name", default)``: their names
occur in its code). Anything else is reported with the nearest existing key.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Subtrees whose entries are passed on as keyword arguments or config overrides: any new key is meant.
OPEN_SUBTREES = (
    "actor_rollout_ref.model.override_config",
    "critic.model.override_config",
    "reward_model.model.override_config",
    "reward_model.reward_kwargs",
    "custom_reward_function.reward_kwargs",
    "actor_rollout_ref.rollout.engine_kwargs",
)
_CONFIG_DIR = Path(__file__).resolve().parent / "config"


def _package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent


def _key_paths(node, prefix: str = "") -> set[str]:
    paths = set()
    if OmegaConf.is_dict(node):
        for key in node.keys():
            path = f"{prefix}{key}"
            paths.add(path)
            paths |= _key_paths(node._get_node(key), path + ".")
    return paths


@functools.lru_cache(maxsize=1)
def schema_keys() -> frozenset[str]:
    """Every key path that verl's ppo_trainer.yaml, ours or any of our presets defines."""
    files = [_package_dir("verl") / "trainer" / "config" / "ppo_trainer.yaml", _CONFIG_DIR / "ppo_trainer.yaml"]
    files += sorted(_CONFIG_DIR.glob("*/*.yaml"))
    keys: set[str] = set()
    for path in files:
        loaded = OmegaConf.load(path)
        for hydra_only in ("hydra", "defaults"):
            loaded.pop(hydra_only, None)
        keys |= _key_paths(loaded)
    return frozenset(keys)


@functools.lru_cache(maxsize=1)
def _source_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace")
                     for package in ("verl", "verl_tre") for path in _package_dir(package).rglob("*.py"))


@functools.lru_cache(maxsize=None)
def read_by_name(name: str) -> bool:
    """Whether verl's or verl_tre's code names ``name`` as a string or an attribute (and so may read it)."""
    return re.search(rf"[\"']{re.escape(name)}[\"']|\.{re.escape(name)}\b", _source_text()) is not None


def _open(path: str) -> bool:
    return any(path == root or path.startswith(root + ".") for root in OPEN_SUBTREES)


def unread_added_keys(config: DictConfig) -> list[str]:
    """One problem line per added key that nothing reads (the outermost such key of each added subtree)."""
    known = schema_keys()
    problems = []

    def walk(node, prefix: str) -> None:
        for key in node.keys():
            path = f"{prefix}{key}"
            if path not in known:
                if not _open(path) and not read_by_name(str(key)):
                    problems.append(_problem(path, known))
                continue
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and not _open(path):
                walk(child, path + ".")

    walk(config, "")
    return problems


def _problem(path: str, known: frozenset[str]) -> str:
    parent, _, name = path.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}? " if close else ""
    return (f"{path}: no such key in verl's or verl_tre's config, and nothing reads '{name}' (a key added with "
            f"'+' is kept but ignored); {hint}drop the '+' and set an existing key (new keys are taken only "
            f"under {', '.join(OPEN_SUBTREES)})")
