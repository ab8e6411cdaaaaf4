"""HTTP reward server for the HH task: a scalar reward model behind FastAPI (client: verl_tre.utils.reward_score.hh).

Start it with ``python -m verl_tre.reward_server --model DIR`` (or experiments/hh/reward/run_with_server.sh).
"""

from .settings import ServerSettings

__all__ = ["ServerSettings"]
