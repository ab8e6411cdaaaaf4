"""Runs gathered into seed groups (runs that differ only in the seed), each labelled for a table row and a legend.

A label is the method plus what tells its group apart from the others: first the method options whose values
differ between that method's groups ("TRE-K (K=2, coeff 0.001)"), then, for groups that would still share a
label in one (task, size) - they differ in a key outside the method options, such as the learning rate - the
training-configuration keys whose values differ between them ("PPO (lr 1e-3)"). Only records without a config
fall back to their seed group's hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verl_tre.runs import identity
from verl_tre.runs.methods import METHODS
from verl_tre.runs.reading import Run

# How a method option reads in a row label ("TRE-K (K=2, coeff 0.001)"), in this order; other options read
# "name=value", after these.
_OPTION_FORMATS = {
    "top_k": "K={}",
    "top_p": "p={}",
    "max_size": "cap={}",
    "max_region_size": "cap={}",
    "scale": "scale={}",
    "top_ratio": "ratio={}",
    "forking_ratio": "ratio={}",
    "scope": "scope={}",
    "forking_scope": "scope={}",
    "kl_cov_ratio": "ratio={}",
    "ppo_kl_coef": "KL coef {}",
    "entropy_coeff": "coeff {}",
    "coeff": "coeff {}",
}
_OPTION_ORDER = {name: i for i, name in enumerate(_OPTION_FORMATS)}


@dataclass
class RunGroup:
    """Runs that differ only in the seed (one ``seed_group``), or the older records of one method, task and model
    size, which carry no seed fields and are grouped as before. ``label``: the method plus the options that tell
    this group apart from the method's other groups."""

    key: str
    method: str
    task: str
    model_size: str | None
    label: str
    runs: list[Run]
    sort_key: tuple = ()

    @property
    def n(self) -> int:
        return len(self.runs)


def _format_option(name: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return _OPTION_FORMATS.get(name, name + "={}").format(text)


# What a training-configuration key reads as in a label; any other key reads as the shortest end of its dotted
# path that no other differing key shares ("clip_ratio", "rollout.temperature").
_KEY_NAMES = {
    "actor_rollout_ref.actor.optim.lr": "lr",
    "critic.optim.lr": "critic lr",
    "actor_rollout_ref.model.path": "model",
    "critic.model.path": "critic model",
    "data.train_batch_size": "batch",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "mini-batch",
    "actor_rollout_ref.rollout.n": "n",
    "algorithm.adv_estimator": "estimator",
}
_MAX_KEYS_SHOWN = 3


def _key_names(keys: list[str]) -> dict[str, str]:
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        names[key] = _KEY_NAMES.get(key, tail)
    return names


def _format_value(value: Any) -> str:
    """Short text of a config value: small numbers in exponent form (1e-3), paths by their last part."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(value, list):
        return ",".join(_format_value(v) for v in value)
    return "none" if value is None else str(value)


def _hidden_differences(groups: list[RunGroup]) -> list[list[tuple[str, Any]]] | None:
    """Per group, (label text, value) of the training-configuration keys (seed aside) whose values differ between
    ``groups``, a key with the same values as one before it left out; None when a group has no recorded config."""
    if not all(g.runs[0].config for g in groups):
        return None
    flats = [{k: v for k, v in identity.training_config(g.runs[0].config).items() if k not in identity.SEED_KEYS}
             for g in groups]
    missing = object()
    columns: dict[str, tuple] = {}
    for key in sorted(set().union(*flats)):
        values = tuple(repr(f.get(key, missing)) for f in flats)
        if len(set(values)) > 1 and values not in columns.values():
            columns[key] = values
    if not columns:
        return None
    names = _key_names(list(columns))
    known = {k: i for i, k in enumerate(_KEY_NAMES)}
    keys = sorted(columns, key=lambda k: (known.get(k, len(known)), k))
    return [[(names[k], f.get(k)) for k in keys] for f in flats]


def _label(method: str, parts: list[str]) -> str:
    return METHODS.get(method, method) + (f" ({', '.join(parts)})" if parts else "")


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """Seed groups of ``runs`` in the paper's method order, labelled by method plus the method options whose values
    differ between that method's groups; groups whose labels would still coincide in one (task, size) add the
    configuration keys that differ between them (records without a config: their seed group)."""
    members: dict[str, list[Run]] = {}
    for r in runs:
        key = f"seed_group:{r.seed_group}" if r.seed_group else f"legacy:{r.method}:{r.task}:{r.model_size}"
        members.setdefault(key, []).append(r)
    by_method: dict[str, list[str]] = {}
    for key, rs in members.items():
        by_method.setdefault(rs[0].method or "unknown", []).append(key)
    groups, parts = [], {}
    for method, keys in by_method.items():
        options = {k: members[k][0].method_options for k in keys}
        names = sorted({n for o in options.values() for n in o}, key=lambda n: (_OPTION_ORDER.get(n, len(_OPTION_ORDER)), n))
        varying = [n for n in names if len({repr(o.get(n)) for o in options.values()}) > 1]
        for k in keys:
            parts[k] = [_format_option(n, options[k][n]) for n in varying if n in options[k]]
            first = members[k][0]
            order = tuple(_sortable(options[k].get(n)) for n in varying)
            groups.append(RunGroup(k, method, first.task or "unknown", first.model_size, _label(method, parts[k]),
                                   members[k], order))
    seen: dict[tuple, list[RunGroup]] = {}
    for g in groups:
        seen.setdefault((g.label, g.task, g.model_size), []).append(g)
    for clash in (c for c in seen.values() if len(c) > 1):
        differences = _hidden_differences(clash)
        for i, g in enumerate(clash):
            if differences is None:
                g.label += f" [{g.runs[0].seed_group or g.runs[0].name}]"
                continue
            shown = [f"{name} {_format_value(value)}" for name, value in differences[i][:_MAX_KEYS_SHOWN]]
            if len(differences[i]) > _MAX_KEYS_SHOWN:
                shown.append(f"+{len(differences[i]) - _MAX_KEYS_SHOWN} more keys")
            g.label = _label(g.method, parts[g.key] + shown)
            g.sort_key += tuple(_sortable(value) for _, value in differences[i])
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(groups, key=lambda g: (order.get(g.method, len(order)), g.method, g.sort_key, g.label))


def _sortable(value: Any) -> tuple:
    """Numbers in numeric order (K=2 before K=10), then everything else as text, a missing option first."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))
