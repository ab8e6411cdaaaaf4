"""``python -m verl_tre.tables RUN_DIRS...``: the results table of training runs (built in verl_tre/runs/tables.py,
where ``--help`` describes it)."""

from verl_tre.runs.reading import run_command
from verl_tre.runs.tables import main

if __name__ == "__main__":
    run_command(main)
