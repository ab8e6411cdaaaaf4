"""HTTP reward server for the HH task: a scalar reward model behind FastAPI, with a retrying client.

Start it with ``python -m verl_tre.reward_server --model DIR`` (or experiments/hh/reward/run_with_server.sh).
"""

from .settings import ServerSettings

__all__ = ["ServerSettings"]
