"""Reading source records (local JSONL/JSON/parquet files or the Hugging Face hub) and writing parquet atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from verl_tre.data.rows import Unreadable

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_local_records(path: str | os.PathLike) -> list[Any]:
    """Records of a ``.jsonl``/``.json`` (one JSON object per line) or ``.parquet`` file, in file order.

    A JSON line that does not decode becomes an :class:`Unreadable` placeholder so that the caller can stop
    or skip with its index; blank lines are ignored.
    """
    path = Path(path).expanduser()
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"--input {path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records: list[Any] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                records.append(Unreadable(f"{path}:{number}: not valid JSON ({error})"))
    return records


def load_hub_records(name: str, split: str, offline_hint: str = "") -> Any:
    """The ``split`` of hub dataset ``name`` (a ``datasets.Dataset``), with a clear error when unreachable;
    ``offline_hint`` names a further way around a missing hub."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # the hub raises many types (offline, auth, missing split); all mean the same here
        raise RuntimeError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub: {type(error).__name__}: {error}\n"
            f"without hub access, pass a local copy with --input (JSONL or parquet){offline_hint}"
        ) from error


def write_parquet_atomic(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` to ``path`` as parquet; a crash leaves either the old file or none, never half of one."""
    import pandas as pd

    if not rows:
        raise ValueError(f"refusing to write {path}: no rows (all skipped, or an empty source)")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
