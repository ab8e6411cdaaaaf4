"""``python -m verl_tre.plots RUN_DIRS... --out DIR``: training curves of runs (drawn by verl_tre/runs/plots.py,
where ``--help`` describes them)."""

from verl_tre.runs.reading import run_command
from verl_tre.runs.plots import main

if __name__ == "__main__":
    run_command(main)
