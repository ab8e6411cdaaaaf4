"""Installs verl_tre into verl in the current process.

verl's FSDP worker builds its actor with ``from verl.workers.actor import DataParallelPPOActor`` inside
``init_model``; pointing that name at our subclass before init_model runs is the whole hook. With
``use_fused_kernels`` the worker also calls verl's ``patch_forward_with_backends`` on the actor and reference
models: ours takes its place, so the models get verl_tre's fused lm-head forward instead of verl's. It must run in
the driver and in every Ray worker process (the trainer's entry point passes it as Ray's worker_process_setup_hook).

verl 0.4.1 seeds the dataloader (``data.seed``) and vLLM (``rollout.seed``) but not torch in its workers, so the
HF rollout's sampling and the critic's fresh value head differ on every launch. ``install`` also makes each
worker's ``init_model`` seed Python, numpy and torch first, with the run's seed plus the worker's rank (our config
sets ``rollout.seed`` and ``critic.seed`` from ``verl_tre.seed``).

Start-up: each worker group's register-center actor comes from verl_tre.utils.register_center, whose process
starts without importing verl.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
import verl.models.transformers.monkey_patch as verl_monkey_patch
import verl.single_controller.base.register_center.ray as verl_register_center
import verl.workers.actor as verl_actor

import verl_tre.trainer.ppo.core_algos  # noqa: F401  registers the clipped_kl_cov policy loss
from verl_tre.models import fused_forward
from verl_tre.utils import register_center
from verl_tre.workers.actor.dp_actor import TREDataParallelPPOActor

__all__ = ["install", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's global generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seeding_init_model(init_model, seed_of):
    """init_model that seeds the worker's generators first; keeps verl's dispatch attributes (functools.wraps)."""

    @functools.wraps(init_model)
    def wrapper(self, *args, **kwargs):
        seed = seed_of(self.config)
        if seed is not None:
            seed_everything(int(seed) + self.rank)
        return init_model(self, *args, **kwargs)

    wrapper._verl_tre_seeding = True
    return wrapper


def _seed_workers() -> None:
    from verl.workers import fsdp_workers

    for cls, seed_of in (
        (fsdp_workers.ActorRolloutRefWorker, lambda config: config.get("rollout", {}).get("seed")),
        (fsdp_workers.CriticWorker, lambda config: config.get("seed")),
    ):
        if not getattr(cls.init_model, "_verl_tre_seeding", False):
            cls.init_model = _seeding_init_model(cls.init_model, seed_of)


def install() -> None:
    """Registers our policy losses, makes verl's workers build TREDataParallelPPOActor (with our fused lm-head
    forward where use_fused_kernels is on) and seed themselves, and their groups start a light register center.
    Idempotent."""
    verl_actor.DataParallelPPOActor = TREDataParallelPPOActor
    verl_monkey_patch.patch_forward_with_backends = fused_forward.patch_forward_with_backends
    verl_register_center.create_worker_group_register_center = register_center.create_register_center
    _seed_workers()
