"""HTTP reward server for the HH task: a scalar reward model behind FastAPI (client: verl_tre.utils.reward_score.hh).

Start it with ``python -m verl_tre.reward_server --model DIR`` (or experiments/hh/reward/run_with_server.sh);
check it with ``python -m verl_tre.reward_server.check [URL]``. Modules: settings (validated options), app (the
HTTP API, back-pressure), payload (reading and checking bodies), idempotency (what retries get), tokenizing
(tokenizer turns), batching (length-aware batches, chunked long pairs), replicas (the model per device),
encoding (chat template and truncation), serve (binding and stopping), background (in-process).
"""

from .settings import ServerSettings

__all__ = ["ServerSettings"]
