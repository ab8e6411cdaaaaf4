"""The real-LM study's settings and its runs through verl's RayPPOTrainer in CPU mode.

One place for every setting (``StudySettings``) and arm (``ARMS``); ``plan`` lists the runs in the order they train,
``overrides`` gives the Hydra overrides of one run, ``train`` runs the missing ones in one Ray start-up and probes
each as it finishes (``experiments/real_lm/probe.py``). A run lives in ``<results>/runs/<name>/`` (run.json,
metrics.jsonl and the probe's probe.json; its final weights only until the probe has read them).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

VAL_METRIC = "val-core/arithmetic/reward/mean@1"


@dataclass(frozen=True)
class Arm:
    """One training configuration of the study: the method preset, trust-region mode and coefficient."""

    method: str  # ppo | tre_k | tre_p (verl_tre/trainer/config/method/)
    mode: str  # full | top_k | top_p
    coeff: float = 0.0
    scale: bool = True

    @property
    def name(self) -> str:
        return {"full": "Entropy", "top_k": "TRE-K", "top_p": "TRE-P"}[self.mode] if self.coeff else "PPO"

    @property
    def key(self) -> str:
        """Directory-name part: method, coefficient and scaling (a run's key adds its seed)."""
        if not self.coeff:
            return "ppo"
        base = {"full": "entropy", "top_k": "tre_k", "top_p": "tre_p"}[self.mode]
        return f"{base}_c{self.coeff:g}" + ("" if self.scale else "_unscaled")

    @property
    def label(self) -> str:
        return self.name + (f" {self.coeff:g}" if self.coeff else "") + ("" if self.scale else " unscaled")

    def overrides(self) -> list[str]:
        return [f"method={self.method}", f"actor_rollout_ref.actor.trust_region.mode={self.mode}",
                f"actor_rollout_ref.actor.entropy_coeff={self.coeff}",
                f"actor_rollout_ref.actor.trust_region.scale={str(self.scale).lower()}"]


PPO = Arm("ppo", "full")


def entropy(coeff: float) -> Arm:
    return Arm("ppo", "full", coeff)


# The paper's coefficient; the strong one was chosen by measurement (see README, "TRE on a real LM"): the smallest
# of the calibration's candidates under which the full-entropy bonus visibly raised the tail within the run.
PAPER_COEFF = 0.001
STRONG_COEFF = 0.03
CALIBRATION_COEFFS = (0.03, 0.1, 0.01)  # trained in this order


def study_arms(strong: float = STRONG_COEFF) -> list[Arm]:
    """The study's arms in training order: the strong-coefficient ones first (where effects are expected), then
    the paper's coefficient; TRE-K unscaled at the strong coefficient pairs with the bonus at equal strength."""
    return [PPO, entropy(strong), Arm("tre_k", "top_k", strong), Arm("tre_k", "top_k", strong, scale=False),
            Arm("tre_p", "top_p", strong), entropy(PAPER_COEFF), Arm("tre_k", "top_k", PAPER_COEFF),
            Arm("tre_p", "top_p", PAPER_COEFF)]


def calibration_arms() -> list[Arm]:
    return [PPO] + [entropy(c) for c in CALIBRATION_COEFFS]


@dataclass(frozen=True)
class StudySettings:
    """What every run of a results directory shares (``run_settings``, remembered there), then which runs."""

    steps: int = 8  # GRPO steps per run
    prompts: int = 8  # prompts per step
    rollouts: int = 4  # responses per prompt (the GRPO group)
    lr: float = 1e-5
    held_out: int = 128  # held-out prompts, validated at the start, middle and end
    max_operand: int = 20  # operands of the additions, 1..max_operand (400 ordered pairs)
    data_seed: int = 0
    max_prompt: int = 64
    max_response: int = 32
    seeds: tuple[int, ...] = (1, 2)
    arms: tuple[Arm, ...] = field(default_factory=lambda: tuple(study_arms()))

    @classmethod
    def quick(cls) -> "StudySettings":
        """A pipeline check: two arms, one seed, two steps, 16 held-out prompts."""
        return cls(steps=2, seeds=(1,), held_out=16, arms=(PPO, Arm("tre_k", "top_k", STRONG_COEFF)))

    def run_settings(self) -> dict:
        """The settings a run's training depends on besides its arm and seed."""
        return {k: v for k, v in json.loads(json.dumps(asdict(self))).items() if k not in ("seeds", "arms")}


def calibration_settings(settings: StudySettings) -> StudySettings:
    """The calibration: PPO and the full-entropy bonus at each candidate coefficient, the first seed; its runs
    share the study's directory (PPO and the chosen coefficient's run are the study's own)."""
    return replace(settings, seeds=settings.seeds[:1], arms=tuple(calibration_arms()))


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm.key}_s{self.seed}"


def plan(settings: StudySettings) -> list[PlannedRun]:
    """Every run, seed-major: all arms of the first seed finish before the second seed starts."""
    return [PlannedRun(arm, seed) for seed in settings.seeds for arm in settings.arms]


def overrides(settings: StudySettings, run: PlannedRun, model: str, data: Path, run_dir: Path) -> list[str]:
    """Hydra overrides of one run: GRPO on CPU, HF rollout, one policy update per step, held-out reward at the
    start, middle and end (sampled at the training temperature 1.0 without top-p: the policy itself, tail
    included), the final weights saved in HF format for the probe (not resumable: runs restart as a whole)."""
    batch = settings.prompts * settings.rollouts
    return [
        "task=arithmetic", "model=smollm2_135m", *run.arm.overrides(), "trainer.device=cpu", "trainer.n_gpus_per_node=1",
        f"actor_rollout_ref.model.path={model}", f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}", f"data.max_prompt_length={settings.max_prompt}",
        f"data.max_response_length={settings.max_response}", f"verl_tre.seed={run.seed}",
        f"data.train_batch_size={settings.prompts}", f"actor_rollout_ref.rollout.n={settings.rollouts}",
        "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
        # 135M parameters fit a 24 GiB machine without recomputation, which would cost a third more time.
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={settings.prompts}", "actor_rollout_ref.actor.use_dynamic_bsz=false",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch}",
        f"actor_rollout_ref.actor.optim.lr={settings.lr}",
        "trainer.total_epochs=100", f"trainer.total_training_steps={settings.steps}",
        f"trainer.save_freq={settings.steps}", "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
        f"trainer.test_freq={max(1, settings.steps // 2)}", "trainer.val_before_train=true",
        "trainer.logger=[console]", "trainer.project_name=real_lm", f"trainer.default_local_dir={run_dir}",
        f"trainer.experiment_name={run_dir.name}",
    ]


def final_weights(run_dir: Path, steps: int) -> Path:
    return run_dir / f"global_step_{steps}" / "actor" / "huggingface"


def step_line(name: str, record: dict, steps: int) -> str:
    """One live line per logged step: reward, the reference statistics, length, seconds, held-out reward."""
    m = record["metrics"]

    def cell(key: str, fmt: str) -> str:
        value = m.get(key)
        return format(value, fmt) if isinstance(value, float) and math.isfinite(value) else "-"

    parts = [f"[{name}] step {record['step']:>2}/{steps}"]
    if "critic/score/mean" in m:
        parts += [f"reward {cell('critic/score/mean', '.3f')}", f"entropy {cell('actor/ref/entropy_full', '.3f')}",
                  f"tail>2 {cell('actor/ref/tail_mass_top2', '.2e')}", f"tail>10 {cell('actor/ref/tail_mass_top10', '.2e')}",
                  f"nucleus {cell('actor/ref/nucleus_size_p0.99', '.0f')}", f"len {cell('response_length/mean', '.1f')}",
                  f"{cell('timing_s/step', '.0f')} s"]
    if VAL_METRIC in m:
        parts.append(f"held-out {cell(VAL_METRIC, '.3f')}")
    return "  ".join(parts)


def _restart_if_interrupted(run_dir: Path, steps: int, say) -> None:
    """A run killed before its final step has no checkpoint to resume from (only the final weights are saved):
    its directory is cleared so that it trains again from the start, rather than refused."""
    from verl_tre.runs import record

    summary = record.read_summary(run_dir)
    if summary is None or summary.get("finished") or final_weights(run_dir, steps).is_dir():
        return
    done = record.logged_steps(run_dir)
    say(f"{run_dir.name}: interrupted after step {max(done) if done else 0} of {steps}; training it again")
    shutil.rmtree(run_dir)


def train(settings: StudySettings, runs_dir: Path, model: str, data: Path, probe_file: Path, say) -> list[Path]:
    """Train and probe every planned run that is not done yet, in one Ray start-up. Returns the run dirs."""
    import ray

    from experiments.real_lm import probe
    from verl_tre.demo import LiveLines, output_to
    from verl_tre.trainer import main_ppo

    planned = plan(settings)
    todo = [r for r in planned if not (runs_dir / r.key / probe.PROBE_FILE).is_file()]
    say(f"{len(planned) - len(todo)} of {len(planned)} runs done; {len(todo)} to train "
        f"({settings.steps} steps of {settings.prompts} x {settings.rollouts} each)")
    if not todo:
        return [runs_dir / r.key for r in planned]
    log = runs_dir.parent / "train.log"
    configs = {}
    for run in todo:
        run_dir = runs_dir / run.key
        _restart_if_interrupted(run_dir, settings.steps, say)
        configs[run.key] = main_ppo.compose_config(overrides(settings, run, model, data, run_dir))
    say(f"verl's own output: {log}")
    with output_to(log) as terminal:
        main_ppo.init_ray(next(iter(configs.values())))
        try:
            for i, run in enumerate(todo, 1):
                run_dir = runs_dir / run.key
                started = time.time()
                print(f"[study] run {i}/{len(todo)}: {run.key} ({run.arm.label}, seed {run.seed})", file=terminal)
                if not final_weights(run_dir, settings.steps).is_dir():
                    with LiveLines(run.key, run_dir, settings.steps, terminal, line=step_line):
                        main_ppo.run(configs[run.key])
                result = probe.probe_run(final_weights(run_dir, settings.steps), probe_file)
                probe.write_result(run_dir, result)
                shutil.rmtree(run_dir / f"global_step_{settings.steps}")
                (run_dir / "latest_checkpointed_iteration.txt").unlink(missing_ok=True)
                print(f"[study] {run.key} done in {time.time() - started:.0f} s; mass outside the base model's top "
                      f"{result['top_k']}: {result['mass_outside']:.3e} (base {result['base_mass_outside']:.3e})",
                      file=terminal)
        finally:
            ray.shutdown()
    return [runs_dir / r.key for r in planned]


def check_settings(results: Path, settings: StudySettings) -> None:
    """A results directory remembers its run settings: resuming with others would mix two studies."""
    stamp = results / "settings.json"
    ours = settings.run_settings()
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old != ours:
            changed = sorted(k for k in set(old) | set(ours) if old.get(k) != ours.get(k))
            raise ValueError(f"{results} holds a study with other settings ({', '.join(changed)}); use another "
                             f"--results-dir, or delete {results} to start over")
    else:
        results.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(ours, indent=2) + "\n")


def with_overrides(settings: StudySettings, **changes) -> StudySettings:
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})


def _say(text: str) -> None:
    print(f"[study] {text}", file=sys.stderr, flush=True)
