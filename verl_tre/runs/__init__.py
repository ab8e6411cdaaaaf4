"""A training run's life in one place, one module per job:

- ``identity``: its name and hash (from its training configuration) and its directory;
- ``methods``: which of the paper's methods its config trains, and that method's options;
- ``lock``: one live launch per run directory;
- ``resume``: what a launch does with a directory that already holds a run (resume, skip a finished run, refuse);
- ``checkpoints``: its checkpoints on disk and their retention;
- ``record``: run.json and metrics.jsonl, written while it trains;
- ``reading``: those records read back; ``groups``: runs gathered into seed groups and labelled;
- ``tables`` and ``plots``: the results table and the training curves (``python -m verl_tre.tables``,
  ``python -m verl_tre.plots``).

Submodules are imported one by one (``from verl_tre.runs import identity``): the package itself imports nothing,
so the trainer's processes do not pay for pandas or matplotlib.
"""
