"""Validation of a composed trainer config, by value, before anything expensive starts.

Hydra already rejects unknown keys (and config_keys the ones added with ``+`` that nothing reads); this module
rejects values that verl would only trip over minutes later inside a Ray worker (or never, training something
else than intended): out-of-range numbers, unknown names, batch sizes that do not divide, missing files, model
folders without weights or tokenizer, logger backends that are not installed. All problems are reported at
once, each with the key, the value, what is allowed and how to fix it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from verl_tre.trainer.config_keys import unread_added_keys

TASKS = ("math", "countdown", "hh", "arithmetic")
MODEL_SIZES = ("1.5b", "7b", "135m")
DEVICES = ("cuda", "cpu", "npu")
# Estimators that normalise rewards within a group of rollouts of the same prompt: n = 1 gives zero advantages.
GROUP_ESTIMATORS = ("grpo", "rloo", "grpo_passk", "opo", "reinforce_plus_plus_baseline")
# trainer.logger backend -> the package verl's Tracking imports for it (the module and the pip name agree).
LOGGER_PACKAGES = {"wandb": "wandb", "tracking": "wandb", "mlflow": "mlflow", "swanlab": "swanlab",
                   "vemlp_wandb": "volcengine_ml_platform", "tensorboard": "tensorboard", "clearml": "clearml"}
# What from_pretrained needs in a local model folder, by what it is for (any one file of each group).
MODEL_CONFIG = ("model config", ("config.json",))
WEIGHTS = ("weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json"))
TOKENIZER = ("tokenizer", ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


class ConfigError(ValueError):
    """One or more invalid config values; the message lists each with its fix."""


def module_file(module: str) -> str:
    """File of an importable module (a package's __init__.py): for verl's file-based custom_reward_function."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"module {module!r} is not importable; is verl-tre installed (pip install -e .)?")
    return spec.origin


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (found, not imported)."""
    return importlib.util.find_spec(module) is not None


def register_resolvers() -> None:
    """``${verl_tre.module_file:pkg.mod}`` in yaml: resolved in the driver before the config ships to Ray."""
    if not OmegaConf.has_resolver("verl_tre.module_file"):
        OmegaConf.register_new_resolver("verl_tre.module_file", module_file)


class _Checker:
    def __init__(self, config: DictConfig):
        self.config = config
        self.problems: list[str] = []
        self.hub_problems: dict[str, str | None] = {}  # one hub request per model id

    def get(self, key: str) -> Any:
        return OmegaConf.select(self.config, key, default=None)

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key}={self.get(key)!r}: {message}")

    def check(self, key: str, ok: Callable[[Any], bool], allowed: str) -> Any:
        value = self.get(key)
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            self.fail(key, f"must be {allowed}; override it, e.g. {key}=<value>")
        return value

    def positive_int(self, key: str) -> Any:
        return self.check(key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                          "an integer >= 1")

    def number_in(self, key: str, low: float, high: float, low_open=False, high_open=False) -> Any:
        def ok(v):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return False
            return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

        allowed = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return self.check(key, ok, allowed)

    def one_of(self, key: str, choices) -> Any:
        return self.check(key, lambda v: v in choices, f"one of {sorted(map(str, choices))}")


def _check_data(c: _Checker, launching: bool) -> None:
    c.positive_int("data.train_batch_size")
    c.positive_int("data.max_prompt_length")
    c.positive_int("data.max_response_length")
    c.one_of("data.truncation", ("error", "left", "right", "middle"))
    if not launching:
        return
    for key in ("data.train_files", "data.val_files"):
        files = c.get(key)
        for path in [files] if isinstance(files, str) else list(files or []):
            if "://" not in str(path) and not os.path.exists(os.path.expanduser(str(path))):
                c.fail(key, f"file {path} does not exist; prepare the data (experiments/<task>/data_preprocess/) "
                            f"or point {key} (DATA_DIR in the scripts) at it")


def _check_rollout(c: _Checker, world: int) -> None:
    r = "actor_rollout_ref.rollout"
    c.one_of(f"{r}.name", ("vllm", "sglang", "hf"))
    c.one_of(f"{r}.mode", ("sync", "async"))
    c.positive_int(f"{r}.n")
    c.number_in(f"{r}.temperature", 0, float("inf"), low_open=True)
    c.number_in(f"{r}.top_p", 0, 1, low_open=True)
    c.number_in(f"{r}.gpu_memory_utilization", 0, 1, low_open=True)
    c.number_in(f"{r}.val_kwargs.temperature", 0, float("inf"))
    c.number_in(f"{r}.val_kwargs.top_p", 0, 1, low_open=True)
    c.positive_int(f"{r}.val_kwargs.n")
    if c.get(f"{r}.val_kwargs.do_sample") and c.get(f"{r}.val_kwargs.temperature") == 0:
        c.fail(f"{r}.val_kwargs.temperature", "must be > 0 when val_kwargs.do_sample=true")
    tp = c.positive_int(f"{r}.tensor_model_parallel_size")
    if isinstance(tp, int) and tp >= 1 and world % tp:
        c.fail(f"{r}.tensor_model_parallel_size",
               f"must divide the number of GPUs (trainer.nnodes * trainer.n_gpus_per_node = {world})")


def _check_batches(c: _Checker, section: str, world: int, seq_len: int) -> None:
    """Mini/micro batch arithmetic verl's workers assert at start-up (per data-parallel rank)."""
    n = c.get("actor_rollout_ref.rollout.n")
    mini = c.positive_int(f"{section}.ppo_mini_batch_size")
    batch = c.get("data.train_batch_size")
    if not all(isinstance(v, int) and v >= 1 for v in (mini, n, batch)):
        return
    if mini > batch:
        c.fail(f"{section}.ppo_mini_batch_size", f"must be <= data.train_batch_size ({batch})")
    per_rank = mini * n // world
    if per_rank < 1 or (mini * n) % world:
        c.fail(f"{section}.ppo_mini_batch_size",
               f"times rollout.n ({n}) must be a positive multiple of the number of GPUs ({world})")
    if c.get(f"{section}.use_dynamic_bsz"):
        max_len = c.positive_int(f"{section}.ppo_max_token_len_per_gpu")
        if isinstance(max_len, int) and max_len < seq_len:
            c.fail(f"{section}.ppo_max_token_len_per_gpu",
                   f"must hold one full sequence: >= max_prompt_length + max_response_length = {seq_len}")
        return
    micro, micro_gpu = c.get(f"{section}.ppo_micro_batch_size"), c.get(f"{section}.ppo_micro_batch_size_per_gpu")
    if (micro is None) == (micro_gpu is None):
        c.fail(f"{section}.ppo_micro_batch_size_per_gpu",
               f"set exactly one of {section}.ppo_micro_batch_size_per_gpu and {section}.ppo_micro_batch_size "
               f"(or {section}.use_dynamic_bsz=true)")
        return
    if micro_gpu is None:
        micro_gpu = micro // world if isinstance(micro, int) else None
    if not isinstance(micro_gpu, int) or micro_gpu < 1 or (per_rank >= 1 and per_rank % micro_gpu):
        c.fail(f"{section}.ppo_micro_batch_size_per_gpu",
               f"must be >= 1 and divide the per-GPU mini-batch (ppo_mini_batch_size * n / GPUs = {per_rank})")


def _check_actor(c: _Checker, world: int, seq_len: int) -> None:
    a = "actor_rollout_ref.actor"
    c.number_in(f"{a}.optim.lr", 0, float("inf"), low_open=True)
    c.number_in(f"{a}.optim.lr_warmup_steps_ratio", 0, 1)
    c.number_in(f"{a}.clip_ratio", 0, float("inf"), low_open=True)
    c.positive_int(f"{a}.ppo_epochs")
    c.one_of(f"{a}.loss_agg_mode", ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                     "seq-mean-token-sum-norm"))
    c.one_of(f"{a}.strategy", ("fsdp", "fsdp2", "megatron"))
    c.number_in(f"{a}.entropy_coeff", 0, float("inf"))
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    # verl 0.4.1 computes "vanilla" inline; every other mode comes from the registry.
    c.one_of(f"{a}.policy_loss.loss_mode", ("vanilla", *POLICY_LOSS_REGISTRY))
    if c.get(f"{a}.use_kl_loss"):
        c.number_in(f"{a}.kl_loss_coef", 0, float("inf"))
    _check_batches(c, a, world, seq_len)
    from verl_tre.workers.actor.options import TREOptions

    try:
        TREOptions.from_actor_config(c.get(a))
    except ValueError as err:
        c.problems.append(f"{a}: {err}")


def _check_critic(c: _Checker, world: int, seq_len: int) -> None:
    if not c.get("critic.model.path"):
        c.fail("critic.model.path", "is required by algorithm.adv_estimator=gae (the critic); set it to a model dir")
    c.number_in("critic.optim.lr", 0, float("inf"), low_open=True)
    c.number_in("critic.optim.lr_warmup_steps_ratio", 0, 1)
    c.number_in("critic.cliprange_value", 0, float("inf"), low_open=True)
    _check_batches(c, "critic", world, seq_len)


def _check_algorithm(c: _Checker) -> None:
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, AdvantageEstimator

    known = {e.value for e in AdvantageEstimator} | set(ADV_ESTIMATOR_REGISTRY)
    est = c.one_of("algorithm.adv_estimator", tuple(known))
    c.number_in("algorithm.gamma", 0, 1)
    c.number_in("algorithm.lam", 0, 1)
    if est in GROUP_ESTIMATORS and c.get("actor_rollout_ref.rollout.n") == 1:
        c.fail("actor_rollout_ref.rollout.n",
               f"must be >= 2 with algorithm.adv_estimator={est}: it compares rollouts of the same prompt, "
               f"and one rollout per prompt gives zero advantages")


def _check_trainer(c: _Checker, launching: bool) -> None:
    t = "trainer"
    device = c.one_of(f"{t}.device", DEVICES)
    c.positive_int(f"{t}.nnodes")
    c.positive_int(f"{t}.n_gpus_per_node")
    c.positive_int(f"{t}.total_epochs")
    if c.get(f"{t}.total_training_steps") is not None:
        c.positive_int(f"{t}.total_training_steps")
    for key in ("save_freq", "test_freq"):
        c.check(f"{t}.{key}", lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 (never) or an integer >= 1")
    mode = c.one_of(f"{t}.resume_mode", ("auto", "disable", "resume_path"))
    if mode == "resume_path" and "global_step_" not in str(c.get(f"{t}.resume_from_path")):
        c.fail(f"{t}.resume_from_path", "must name a checkpoint folder .../global_step_<N> with resume_mode=resume_path")
    from verl.utils.tracking import Tracking

    loggers = c.get(f"{t}.logger")
    for name in [loggers] if isinstance(loggers, str) else list(loggers or []):
        if name not in Tracking.supported_backend:
            c.fail(f"{t}.logger", f"backend {name!r} is unknown; choose from {Tracking.supported_backend}")
        elif launching and name in LOGGER_PACKAGES and not installed(LOGGER_PACKAGES[name]):
            c.fail(f"{t}.logger", f"backend {name!r} needs the {LOGGER_PACKAGES[name]} package, which is not "
                                  f"installed here: pip install {LOGGER_PACKAGES[name]}, or leave {name} out of "
                                  f"{t}.logger (e.g. {t}.logger=[console])")
    if launching and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            c.fail(f"{t}.device", "no CUDA device is visible; on a CPU-only machine pass trainer.device=cpu")


def _check_seed(c: _Checker) -> None:
    from verl_tre.runs.identity import SEED_KEY, SEED_TARGETS

    seed = c.check(SEED_KEY, lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31,
                   "an integer in [0, 2**31)")
    for key in SEED_TARGETS:
        if c.get(key) != seed:
            c.fail(key, f"must follow {SEED_KEY} ({seed!r}), which seeds every worker and names the run; "
                        f"set {SEED_KEY}=<seed> instead of {key}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_problem(repo_id: str, filename: str) -> str | None:
    """Why the hub repo ``repo_id`` cannot be had (its ``filename`` cached, else one short hub request), or None."""
    import huggingface_hub
    from huggingface_hub import errors

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str):
        return None
    if _hub_offline():
        return ("is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); download it "
                f"where the hub is reachable (huggingface-cli download {repo_id}) or point the key at a local copy")
    from huggingface_hub import constants

    try:  # one request, no retries: a launch should not wait half a minute to learn the hub is away
        huggingface_hub.HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, timeout=10)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        return f"is not a model the Hugging Face hub serves to you ({type(err).__name__}); check the id or your token"
    except Exception as err:  # connection errors come in many types; any of them means "not reachable now"
        return (f"cannot be fetched: the Hugging Face hub is unreachable ({type(err).__name__}); point the key at "
                f"a local copy of the model, or set HF_ENDPOINT / a proxy that reaches the hub")
    return None


def _check_model_path(c: _Checker, key: str, needs: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """A local directory must hold one file of each group in ``needs`` (what, file names); a hub id must be
    reachable."""
    path = c.get(key)
    if not isinstance(path, str) or not path or "://" in path:
        return
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        missing = [names[0] if len(names) == 1 else f"{what} ({' or '.join(names)})" for what, names in needs
                   if not any(os.path.isfile(os.path.join(local, name)) for name in names)]
        if missing:
            c.fail(key, f"directory {local} holds no {' and no '.join(missing)}: not a complete Hugging Face model "
                        f"folder; point {key} at one (a verl checkpoint's actor/ folder needs "
                        f"`python -m verl.model_merger merge` first)")
        return
    if os.path.exists(local) or not _HUB_ID.match(path):
        c.fail(key, f"{local} is not a directory and not a hub id (org/name); point {key} at a model folder")
        return
    if path not in c.hub_problems:
        c.hub_problems[path] = _hub_problem(path, needs[0][1][0])
    problem = c.hub_problems[path]
    if problem:
        c.fail(key, f"hub id {path} {problem}")


def _check_models(c: _Checker) -> None:
    """Fail before Ray starts, not ~30 s later in a worker: every model and tokenizer path must be loadable. verl
    loads the tokenizer from the actor's folder, the critic's from critic.model.tokenizer_path."""
    actor = c.get("actor_rollout_ref.model.path")
    _check_model_path(c, "actor_rollout_ref.model.path", (MODEL_CONFIG, WEIGHTS, TOKENIZER))
    if c.get("algorithm.adv_estimator") == "gae":
        _check_model_path(c, "critic.model.path", (MODEL_CONFIG, WEIGHTS))
        tokenizer = c.get("critic.model.tokenizer_path")
        if tokenizer and tokenizer != actor:
            _check_model_path(c, "critic.model.tokenizer_path", (TOKENIZER,))
    if c.get("reward_model.enable"):
        _check_model_path(c, "reward_model.model.path", (MODEL_CONFIG, WEIGHTS))


def _check_reward(c: _Checker) -> None:
    from verl.workers.reward_manager.registry import REWARD_MANAGER_REGISTRY

    c.one_of("reward_model.reward_manager", tuple(REWARD_MANAGER_REGISTRY))
    path = c.get("custom_reward_function.path")
    if path and not os.path.isfile(os.path.expanduser(str(path))):
        c.fail("custom_reward_function.path", "must be an existing Python file defining custom_reward_function.name")


def lm_head_backend(config: DictConfig) -> str:
    """One line saying how the actor computes log-probs and entropy terms, printed at launch."""
    if OmegaConf.select(config, "actor_rollout_ref.model.use_fused_kernels"):
        return ("use_fused_kernels=true: verl_tre's fused lm-head path (log-probs, entropy/TRE and statistics from "
                "the hidden states in row chunks, no logits; fused_kernel_options.impl_backend is not used)")
    return "use_fused_kernels=false: logits from the lm_head, then log-probs and entropy terms on them"


def validate(config: DictConfig, launching: bool = True) -> None:
    """Raise ConfigError listing every invalid value in ``config`` (a composed trainer config).

    ``launching=False`` (offline composition) skips what depends on this machine: data files and devices.
    verl_tre's policy losses must be registered first (``verl_tre.plugin.install()``).
    """
    c = _Checker(config)
    c.problems += unread_added_keys(config)
    c.one_of("verl_tre.task", TASKS + (None,))
    c.one_of("verl_tre.model_size", MODEL_SIZES + (None,))
    _check_trainer(c, launching)
    nnodes, per_node = c.get("trainer.nnodes"), c.get("trainer.n_gpus_per_node")
    world = nnodes * per_node if all(isinstance(v, int) and v >= 1 for v in (nnodes, per_node)) else 1
    _check_data(c, launching)
    prompt, response = c.get("data.max_prompt_length"), c.get("data.max_response_length")
    seq_len = prompt + response if all(isinstance(v, int) for v in (prompt, response)) else 0
    _check_rollout(c, world)
    _check_algorithm(c)
    _check_actor(c, world, seq_len)
    if c.get("algorithm.adv_estimator") == "gae":
        _check_critic(c, world, seq_len)
    _check_reward(c)
    _check_seed(c)
    if launching:
        _check_models(c)
    if c.problems:
        lines = "\n".join(f"  - {p}" for p in c.problems)
        raise ConfigError(f"invalid trainer configuration ({len(c.problems)} problem(s)):\n{lines}")
