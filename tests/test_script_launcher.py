"""experiments/common.sh outside an environment: it uses the project's .venv when nothing else is active, or
stops with one line on how to get an environment; paths with commas, quotes and non-ASCII letters reach the
config as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_fixtures import REPO
from verl_tre.trainer import main_ppo

SCRIPT = REPO / "experiments" / "countdown" / "1.5b_ppo.sh"


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def bare_shell(tmp_path) -> dict[str, str]:
    """A new shell's environment: no virtual environment active, and a python3 on PATH without hydra (an
    isolated interpreter that sees no site-packages)."""
    _executable(tmp_path / "bin" / "python3", f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "VERL_TRE_PRINT_ARGS")}
    env.update(PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", PYTHONPATH=str(REPO),
               VERL_TRE_VENV=str(tmp_path / "missing-venv"))
    return env


def _launch(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def test_without_an_environment_one_line_says_how_to_get_one(bare_shell, tmp_path):
    out = _launch(bare_shell, "verl_tre.dry_run=true", cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "bash scripts/env.sh" in lines[0] and "bin/activate" in lines[0]

    # An active environment that lacks the packages is named, not passed over.
    out = _launch({**bare_shell, "VIRTUAL_ENV": str(tmp_path / "other")}, "verl_tre.dry_run=true", cwd=tmp_path)
    assert out.returncode == 2 and str(tmp_path / "other") in out.stderr and "Traceback" not in out.stderr


def test_the_project_venv_is_used_when_nothing_else_is_active(bare_shell, tmp_path):
    venv, launched = tmp_path / "venv", tmp_path / "launched.txt"
    # Stands in for scripts/env.sh's .venv: the interpreter these tests run under (it has the packages), which
    # records the launch instead of running it (the dry run itself: tests/test_configs.py).
    record = f'[ "$1" = -m ] && {{ printf "%s\\n" "$@" > "{launched}"; exit 0; }}'
    _executable(venv / "bin" / "python", f'#!/bin/sh\n{record}\nexec "{sys.executable}" "$@"\n')
    out = _launch({**bare_shell, "VERL_TRE_VENV": str(venv)}, "verl_tre.dry_run=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"using the project's {venv}" in out.stderr
    args = launched.read_text().splitlines()
    assert args[:2] == ["-m", "verl_tre.trainer.main_ppo"] and args[-1] == "verl_tre.dry_run=true"


def test_paths_with_commas_quotes_and_accents_reach_the_config_as_written(tmp_path):
    model, data = "/models/Qwen, fine-tuned/é's", "/data/count,down [v2]/x=1"
    env = {**os.environ, "VERL_TRE_PRINT_ARGS": "1", "MODEL_PATH": model, "DATA_DIR": data}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, check=True, timeout=60)
    config = main_ppo.compose_config(out.stdout.decode().split("\0")[:-1])
    assert config.actor_rollout_ref.model.path == model == config.critic.model.path
    assert (config.data.train_files, config.data.val_files) == (f"{data}/train.parquet", f"{data}/test.parquet")

    out = subprocess.run(["bash", str(SCRIPT)], env={**env, "DATA_DIR": r"C:\data"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "DATA_DIR" in out.stderr and "backslash" in out.stderr
