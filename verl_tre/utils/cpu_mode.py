"""CPU mode: what verl 0.4.1 needs to run its RayPPOTrainer on a machine without GPUs.

Used only when ``trainer.device=cpu``. Three kinds of adjustment, each listed with its reason:

- ``adjust_config(config)``: settings whose GPU values cannot work on CPU (changed in place, reported).
- ``ray_init_kwargs(config)``: resources Ray must advertise so verl's GPU-shaped scheduling finds "devices".
- ``apply_worker_patches()``: process-level fixes for places where verl 0.4.1 assumes CUDA; must run in every
  Ray worker process (the entry point registers it as Ray's ``worker_process_setup_hook``).

Compute dtype (``verl_tre.cpu_compute_dtype``, default ``fp32``): verl 0.4.1 computes the actor's, the
reference's and the critic's forward, and the HF rollout's generate, under a hard-coded
``torch.autocast(dtype=torch.bfloat16)``, with FSDP casting parameters to bf16 (its default mixed precision) and
the reference model loaded in bf16. On a GPU that is the fast path. On a CPU without native bf16 arithmetic
(no AVX512-BF16/AMX, e.g. the 2-core AMD EPYC VMs this project is tested on) every bf16 matmul is emulated:
forward+backward of the demo's policy on a 64 x 72-token micro-batch took 6.8 s under bf16 autocast and 0.43 s
in fp32 (torch 2.13, 2 threads, measured 2026-12). ``fp32`` therefore keeps parameters, reference weights and
activations in fp32 (config adjustments below) and turns verl's CPU bf16 autocast regions off in the workers
(``apply_worker_patches``); ``bf16`` leaves verl's precision exactly as on a GPU, for CPUs with fast bf16.

Everything here targets verl 0.4.1's source exactly; on any other version ``require_pinned_verl`` refuses to run
rather than patch code it has not been checked against.
"""

from __future__ import annotations

import functools
import os

from omegaconf import DictConfig, OmegaConf, open_dict

PINNED_VERL_VERSION = "0.4.1"

# Set in the Ray job's environment so that worker processes know to patch themselves, and in which dtype.
ENV_FLAG = "VERL_TRE_CPU_MODE"
DTYPE_ENV = "VERL_TRE_CPU_COMPUTE_DTYPE"
COMPUTE_DTYPES = ("fp32", "bf16")


def is_cpu_mode(config: DictConfig) -> bool:
    return OmegaConf.select(config, "trainer.device") == "cpu"


def compute_dtype(config: DictConfig) -> str:
    """``verl_tre.cpu_compute_dtype`` (fp32 | bf16); raises ConfigError naming the key on any other value."""
    from verl_tre.trainer.config_check import ConfigError

    value = OmegaConf.select(config, "verl_tre.cpu_compute_dtype", default="fp32")
    if value not in COMPUTE_DTYPES:
        raise ConfigError(
            f"verl_tre.cpu_compute_dtype={value!r} is not one of {COMPUTE_DTYPES}. Fix: fp32 (the default: fast on "
            f"any CPU) or bf16 (verl's bf16 autocast, for CPUs with native bf16 arithmetic such as AMX)."
        )
    return value


def worker_env(config: DictConfig) -> dict[str, str]:
    """Environment variables a CPU-mode Ray job gives its workers (empty on GPU runs).

    Set once per Ray start-up: runs sharing one Ray session share its compute dtype.
    """
    if not is_cpu_mode(config):
        return {}
    return {ENV_FLAG: "1", DTYPE_ENV: compute_dtype(config), "OMP_NUM_THREADS": str(worker_threads(config))}


def worker_threads(config: DictConfig) -> int:
    """Threads per worker process: the cores shared out among the workers, or $OMP_NUM_THREADS when set.

    verl creates its worker actors without ``num_cpus``, and Ray then forces OMP_NUM_THREADS=1 in them: one
    worker would compute on one core of many (one GRPO step of SmolLM2-135M, 32 sequences, took 187 s on one
    thread and 129 s on two; 2-core VM shared with other jobs, load average about 9, 2026-12-03).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    workers = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def require_pinned_verl() -> None:
    """Raise unless the installed verl is the version these adjustments were written against."""
    import verl

    found = getattr(verl, "__version__", "unknown")
    if found != PINNED_VERL_VERSION:
        raise RuntimeError(
            f"CPU mode (trainer.device=cpu) supports verl=={PINNED_VERL_VERSION} only, found verl {found}: its "
            f"adjustments patch that release's internals. Fix: pip install verl=={PINNED_VERL_VERSION}, "
            f"or run on GPUs with trainer.device=cuda."
        )


# (config key, CPU value, reason). Keys are changed only where their value differs.
_CONFIG_ADJUSTMENTS: tuple[tuple[str, object, str], ...] = (
    ("actor_rollout_ref.actor.strategy", "fsdp2", "FSDP1's sync_module_states needs parameters on a GPU"),
    ("actor_rollout_ref.ref.strategy", "fsdp2", "FSDP1's sync_module_states needs parameters on a GPU"),
    ("critic.strategy", "fsdp2", "FSDP1's sync_module_states needs parameters on a GPU"),
    ("actor_rollout_ref.model.override_config._attn_implementation", "sdpa",
     "verl hard-codes flash_attention_2, a CUDA-only kernel"),
    ("critic.model.override_config._attn_implementation", "sdpa",
     "verl hard-codes flash_attention_2, a CUDA-only kernel"),
    ("actor_rollout_ref.rollout.name", "hf", "vLLM and SGLang need CUDA; HF generate runs anywhere"),
    ("actor_rollout_ref.rollout.mode", "sync", "async rollout servers are vLLM/SGLang only"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1, "HF rollout has no tensor parallelism"),
    ("actor_rollout_ref.actor.use_torch_compile", False,
     "inductor's first CPU compile costs tens of seconds per worker process, more than a tiny run"),
    ("actor_rollout_ref.actor.fsdp_config.param_offload", False, "there is no device memory to offload from"),
    ("actor_rollout_ref.actor.fsdp_config.optimizer_offload", False, "there is no device memory to offload from"),
    ("actor_rollout_ref.actor.fsdp_config.offload_policy", False, "there is no device memory to offload from"),
    ("actor_rollout_ref.ref.fsdp_config.param_offload", False, "there is no device memory to offload from"),
    ("critic.model.fsdp_config.param_offload", False, "there is no device memory to offload from"),
    ("critic.model.fsdp_config.optimizer_offload", False, "there is no device memory to offload from"),
    ("critic.model.fsdp_config.offload_policy", False, "there is no device memory to offload from"),
)


_FP32_REASON = "verl_tre.cpu_compute_dtype=fp32: bf16 matmuls are emulated, ~16x slower, on most CPUs"
# FSDP casts parameters to mixed_precision.param_dtype (bf16 when unset) for every forward; verl loads the
# reference model in bf16 unless fsdp_config.model_dtype says otherwise.
_FP32_ADJUSTMENTS: tuple[tuple[str, object, str], ...] = (
    ("actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype", "fp32", _FP32_REASON),
    ("actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype", "fp32", _FP32_REASON),
    ("actor_rollout_ref.ref.fsdp_config.model_dtype", "fp32", _FP32_REASON),
    ("critic.model.fsdp_config.mixed_precision.param_dtype", "fp32", _FP32_REASON),
)


def adjust_config(config: DictConfig) -> list[str]:
    """Change the settings that cannot work on CPU, in place; returns one line per change made.

    Call on the composed config before validation and before Ray starts (no-op unless trainer.device=cpu).
    Raises ConfigError for a bad ``verl_tre.cpu_compute_dtype``, on GPU runs too.
    """
    dtype = compute_dtype(config)
    if not is_cpu_mode(config):
        return []
    require_pinned_verl()
    notes = []
    adjustments = _CONFIG_ADJUSTMENTS + (_FP32_ADJUSTMENTS if dtype == "fp32" else ())
    with open_dict(config):
        for key, value, reason in adjustments:
            old = OmegaConf.select(config, key, default=None)
            if old != value:
                OmegaConf.update(config, key, value, force_add=True)
                notes.append(f"{key}: {old!r} -> {value!r} ({reason})")
    return notes


def ray_init_kwargs(config: DictConfig) -> dict:
    """Resources for ``ray.init`` on a CPU-only machine (worker processes stand in for GPUs).

    - verl's resource check counts Ray's "GPU" resource: advertise one logical GPU per worker process.
    - With trainer.device=cpu verl's placement bundles ask for a custom resource named "cpu"; without it the
      placement groups wait forever, silently.
    - Each worker bundle and the TaskRunner take one logical CPU: advertise enough even on a 2-core machine
      (the cores are shared; Ray's CPU counts are bookkeeping, not pinning).
    """
    n = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    cpus = OmegaConf.select(config, "ray_init.num_cpus") or max(os.cpu_count() or 1, n + 1)
    # The dashboard adds processes that compete for the few cores a CPU run has.
    return {"num_cpus": max(int(cpus), n + 1), "num_gpus": n, "resources": {"cpu": n}, "include_dashboard": False}


def _unpinned_offload_policy(policy_cls):
    @functools.wraps(policy_cls)
    def make(*args, pin_memory: bool = True, **kwargs):
        return policy_cls(*args, pin_memory=False, **kwargs)

    return make


def _sdpa_value_model_loader(local_path, torch_dtype, model_config, trust_remote_code):
    """verl's load_valuehead_model with SDPA attention (verl passes flash_attention_2 explicitly)."""
    from transformers import AutoModelForTokenClassification

    model_config._attn_implementation = "sdpa"
    return AutoModelForTokenClassification.from_pretrained(
        local_path, torch_dtype=torch_dtype, config=model_config, attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
    )


def _single_backend_init(init_process_group):
    """torch rejects verl's "cpu:gloo,cpu:gloo" (two backends for one device type): collapse it to "gloo"."""

    @functools.wraps(init_process_group)
    def init(*args, backend=None, **kwargs):
        if isinstance(backend, str) and "," in backend:
            names = {part.split(":")[-1] for part in backend.split(",")}
            if len(names) == 1:
                backend = names.pop()
        return init_process_group(*args, backend=backend, **kwargs)

    return init


def _hf_rollout_positions_from_mask(rollout_cls):
    """verl's HFRollout passes the prompt's position_ids to ``generate``; transformers 4.5x then reuses the last
    prompt position for every new token (measured: the demo policy's sampled reward drops from 5.9 % to 0 %).
    Without them, generate derives positions from the attention mask: the same for the left-padded prompt, and
    right for the new tokens."""
    original_init = rollout_cls.__init__

    @functools.wraps(original_init)
    def init(self, module, config):
        original_init(self, module, config)
        generate = module.generate

        def generate_with_mask_positions(*args, position_ids=None, **kwargs):
            return generate(*args, **kwargs)

        module.generate = generate_with_mask_positions

    rollout_cls.__init__ = init


def _autocast_without_cpu_bf16(autocast_cls):
    """``torch.autocast`` whose CPU bf16 regions compute in fp32 (verl 0.4.1 opens them in dp_actor's and
    dp_critic's ``_forward_micro_batch`` and HFRollout's generate). Every other autocast is left as asked.
    A subclass, so that ``isinstance`` checks and use as a decorator keep working."""
    import torch

    class CpuFp32Autocast(autocast_cls):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cpu" and dtype == torch.bfloat16:
                enabled = False
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    CpuFp32Autocast.__name__ = CpuFp32Autocast.__qualname__ = autocast_cls.__name__
    return CpuFp32Autocast


class _NoTiming:
    # verl 0.4.1's generate_sequences reads rollout_sharding_manager.timing, which only the vLLM/SGLang
    # managers define; the HF rollout's BaseShardingManager has none (an AttributeError on every step).
    @property
    def timing(self) -> dict:
        return {}


_PATCHED = False


def apply_worker_patches() -> None:
    """Patch this process for CPU execution. Idempotent. Each patch names the verl 0.4.1 code it serves."""
    global _PATCHED
    require_pinned_verl()  # before the early return: a process patched earlier must still refuse another verl
    if _PATCHED:
        return
    import platform

    import psutil
    import torch
    import torch.distributed

    import verl.utils.device as verl_device
    import verl.utils.model as verl_model
    import verl.workers.actor.dp_actor as verl_dp_actor
    import verl.workers.critic.dp_critic as verl_dp_critic
    import verl.workers.fsdp_workers as fsdp_workers
    from verl.workers.rollout.hf_rollout import HFRollout
    from verl.workers.sharding_manager.base import BaseShardingManager

    from verl_tre.utils import padding

    # verl calls get_torch_device().<fn>() (torch.cpu on CPU) for memory logging, cache clearing, seeding and
    # checkpointed RNG state; torch.cpu lacks these. Fill only what is missing, with CPU meanings: there is no
    # separate device allocator (0 bytes), the RNG is torch's default generator, "device memory" is host RAM.
    def _mem_get_info():
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    shims = {
        "memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "mem_get_info": lambda *a, **k: _mem_get_info(),
        "empty_cache": lambda: None,
        "manual_seed": torch.manual_seed,
        "manual_seed_all": torch.manual_seed,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "get_device_name": lambda *a, **k: platform.processor() or "cpu",
    }
    for name, fn in shims.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)

    # get_nccl_backend() raises without CUDA/NPU; gloo is torch's CPU backend.
    verl_device.get_nccl_backend = fsdp_workers.get_nccl_backend = lambda: "gloo"
    torch.distributed.init_process_group = _single_backend_init(torch.distributed.init_process_group)
    # The fsdp2 reference model (and offloaded actors) use CPUOffloadPolicy(pin_memory=True); pinning needs an
    # accelerator.
    fsdp_workers.CPUOffloadPolicy = _unpinned_offload_policy(fsdp_workers.CPUOffloadPolicy)
    # The critic's loader passes attn_implementation="flash_attention_2" itself and ignores override_config
    # (the critic worker imports it from verl.utils.model at build time).
    verl_model.load_valuehead_model = _sdpa_value_model_loader
    BaseShardingManager.timing = _NoTiming.timing
    _hf_rollout_positions_from_mask(HFRollout)
    # The remove-padding path of the actor and the critic imports flash-attn's padding helpers only when CUDA is
    # present; plain-torch equivalents take their place. The packed forward itself works with SDPA: transformers
    # splits the causal mask where position_ids restart, as flash-attn's varlen kernel does.
    for module in (verl_dp_actor, verl_dp_critic):
        for name in padding.__all__:
            if not hasattr(module, name):
                setattr(module, name, getattr(padding, name))
    # The worker half of verl_tre.cpu_compute_dtype=fp32 (the config half is _FP32_ADJUSTMENTS).
    if os.environ.get(DTYPE_ENV, "fp32") == "fp32":
        torch.autocast = _autocast_without_cpu_bf16(torch.autocast)
    _PATCHED = True
