"""Installs verl_tre into verl in the current process.

verl's FSDP worker builds its actor with ``from verl.workers.actor import DataParallelPPOActor`` inside
``init_model``; pointing that name at our subclass before init_model runs is the whole hook. With
``use_fused_kernels`` the worker also calls verl's ``patch_forward_with_backends`` on the actor and reference
models: ours takes its place, so the models get verl_tre's fused lm-head forward instead of verl's. It must run in
the driver and in every Ray worker process (the trainer's entry point passes it as Ray's worker_process_setup_hook).
"""

from __future__ import annotations

import verl.models.transformers.monkey_patch as verl_monkey_patch
import verl.workers.actor as verl_actor

import verl_tre.trainer.ppo.core_algos  # noqa: F401  registers the clipped_kl_cov policy loss
from verl_tre.models import fused_forward
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor

__all__ = ["install"]


def install() -> None:
    """Registers our policy losses and makes verl's workers build TREDataParallelPPOActor, with our fused lm-head
    forward where use_fused_kernels is on. Idempotent."""
    verl_actor.DataParallelPPOActor = TREDataParallelPPOActor
    verl_monkey_patch.patch_forward_with_backends = fused_forward.patch_forward_with_backends
