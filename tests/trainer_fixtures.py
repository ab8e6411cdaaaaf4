"""Shared pieces of the trainer tests: tiny offline assets, CPU-mode overrides, and one Ray session for the
whole test run that never outlives it. tests/conftest.py makes ``tiny_assets`` and ``ray_session`` available to
every module; a module that imports them from here instead gets instances of its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The reference statistics every method logs, and the regularizer's own value.
REGION_METRICS = ("actor/ref/entropy_full", "actor/ref/top1_prob", "actor/ref/tail_mass_top2",
                  "actor/ref/tail_mass_top10", "actor/ref/nucleus_size_p0.99", "actor/regularizer/value")
# Ray's logical "GPUs" in CPU mode: the largest world size a test uses.
MAX_WORKERS = 2


def build_tiny_assets(root: Path) -> dict[str, Path]:
    """Generated Countdown parquet (3 numbers) and a tiny random Qwen2 policy with a compact BPE tokenizer."""
    from verl_tre.data.countdown_task import write_countdown_splits
    from verl_tre.utils import local_assets

    data = root / "data"
    paths = write_countdown_splits(data, num_train=32, num_test=8, seed=1, progress=False, num_numbers=(3,),
                                   max_number=20)
    import pandas as pd

    texts = [r["prompt"][0]["content"] for r in pd.read_parquet(paths["train"]).to_dict("records")]
    texts += ["user\n", "assistant\n", "<think> </think> <answer> (1 + 2) * 3 </answer>"] * 8
    tokenizer = local_assets.train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=512, compact=True)
    model = local_assets.tiny_qwen2(root / "model", tokenizer, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64)
    return {"train": paths["train"], "test": paths["test"], "model": model}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


def cpu_overrides(assets: dict[str, Path], run_dir: Path, *, workers: int = 1, steps: int = 2) -> list[str]:
    """A two-step CPU run: 4 prompts x 2 rollouts (GRPO needs a group), micro-batches that divide evenly."""
    return [
        "trainer.device=cpu", f"trainer.n_gpus_per_node={workers}", "trainer.logger=[console]",
        f"actor_rollout_ref.model.path={assets['model']}", f"critic.model.path={assets['model']}",
        f"data.train_files={assets['train']}", f"data.val_files={assets['test']}",
        "data.train_batch_size=4", "data.max_prompt_length=48", "data.max_response_length=8",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8", "critic.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.optim.lr=1e-3", "critic.optim.lr=1e-3",
        "trainer.total_epochs=1", f"trainer.total_training_steps={steps}", "trainer.save_freq=-1",
        "trainer.test_freq=-1", "trainer.val_before_train=false", f"trainer.default_local_dir={run_dir}",
    ]


def marked_processes(mark: str) -> list[int]:
    """PIDs of the live processes whose environment holds ``mark`` ("NAME=value"): everything a test's child
    started, Ray's daemons and workers included (they inherit the environment), wherever they were re-parented."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # ended while we looked, or not ours to read
            continue
    return pids


def _ray_daemon_pids() -> list[int]:
    """PIDs of the local cluster's raylet and GCS server (the processes that can outlive a killed driver)."""
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    if node is None:
        return []
    pids = []
    for kind, infos in node.all_processes.items():
        if kind in ("raylet", "gcs_server"):
            pids += [info.process.pid for info in infos if info.process is not None]
    return pids


class _SharedTaskRunner:
    """Stands in for verl's TaskRunner actor class in ``run_ppo``: every run gets the same actor, started once,
    instead of a new process that imports verl's trainer and workers again (about 6 s per run on the 2-core VM).
    What a run builds (worker groups, their processes and placement groups) is still its own."""

    def __init__(self, actor_class):
        self.actor_class, self.handle = actor_class, None

    def remote(self):
        if self.handle is None:
            self.handle = self.actor_class.remote()
        return self.handle

    def options(self, **options):  # verl's profiling launch: a separate actor, as verl makes it
        return self.actor_class.options(**options)


class SharedRay:
    """The Ray session of the trainer runs: started on first use, stopped by ``close`` (idempotent), which
    tests/conftest.py calls right after the last test that uses it, so that tests after it (e.g. the demo's
    own Ray start-up) find no Ray running."""

    def __init__(self):
        self.daemon_pids: list[int] | None = None
        self.task_runner = None

    def start(self, config) -> None:
        import ray
        import verl.trainer.main_ppo as verl_main_ppo

        from verl_tre.trainer import main_ppo

        if ray.is_initialized():
            pytest.fail("Ray is already initialized in the test process; a previous test leaked it")
        main_ppo.init_ray(config)
        self.daemon_pids = _ray_daemon_pids()
        self.task_runner = verl_main_ppo.TaskRunner
        verl_main_ppo.TaskRunner = _SharedTaskRunner(self.task_runner)

    def close(self) -> None:
        if self.daemon_pids is None:
            return
        import ray
        import verl.trainer.main_ppo as verl_main_ppo

        verl_main_ppo.TaskRunner = self.task_runner
        ray.shutdown()
        for pid in self.daemon_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.daemon_pids = None


SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def ray_session(tiny_assets, tmp_path_factory):
    """One Ray start-up (CPU mode, our setup hook) and one TaskRunner process shared by every trainer run of the
    test session; always torn down. Each run releases its placement groups (main_ppo.run), so runs do not see
    each other's workers."""
    from verl_tre.trainer import main_ppo

    SHARED_RAY.start(main_ppo.compose_config(cpu_overrides(tiny_assets, tmp_path_factory.mktemp("ray"),
                                                           workers=MAX_WORKERS)))
    try:
        yield
    finally:
        SHARED_RAY.close()
