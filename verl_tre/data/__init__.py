"""Data preparation for the paper's tasks (MATH, Countdown, HH, and two-operand arithmetic) in verl's parquet row format.

Public names are loaded on first use, so that importing :mod:`verl_tre.data.sources` (as the reward
dispatcher does in every reward worker) pulls in neither pandas nor the hub client.

Countdown data for a run, in code::

    from verl_tre.data import write_countdown_splits
    write_countdown_splits("data/countdown", num_train=1000, num_test=100, seed=0)
"""

from importlib import import_module

_EXPORTS = {
    "CountdownInstance": "countdown_generator",
    "generate_countdown": "countdown_generator",
    "reachable": "countdown_solver",
    "solve": "countdown_solver",
    "countdown_row": "countdown_task",
    "instance_rows": "countdown_task",
    "write_countdown_splits": "countdown_task",
    "write_countdown_from_records": "countdown_task",
    "math_row": "math_task",
    "write_math_splits": "math_task",
    "write_validation_set": "math_task",
    "VALIDATION_SETS": "math_task",
    "hh_row": "hh_task",
    "write_arithmetic_splits": "arithmetic_task",
    "write_hh_splits": "hh_task",
    "load_local_records": "io",
    "write_parquet_atomic": "io",
    "make_row": "rows",
    "BadRow": "rows",
    "BadRowsError": "rows",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
