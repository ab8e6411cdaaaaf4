"""The main job's demo: TRE-K against the entropy bonus through verl's real PPO trainer, on CPU, nothing downloaded.

    python -m verl_tre.demo [--out outputs/demo] [--steps N] [--entropy-coeff C] [--seed S] [--reuse-setup]

1. Set-up: generates a Countdown set (2 numbers) with the project's generator, trains a byte-level BPE tokenizer
   on it and warm-starts a tiny Qwen2 policy by a short supervised pass on the generator's verified solutions.
   Only TAGGED_FRACTION of those demonstrations put the equation in the <answer> tags the reward reads; the
   others leave it in the <think> block (a common failure of instruction models on Countdown, and the first
   thing RL fixes at scale). So the warm start earns reward on some prompts from the first step (GRPO needs
   that) and has something RL can learn in minutes: a 1M-parameter policy improves its arithmetic far too
   slowly for a 5-minute demo (measured, see the settings below).
2. Training: one Ray start-up, then two runs of verl's RayPPOTrainer in CPU mode (GRPO, HF rollout) from the same
   warm start with the same data order: TRE-K (K = 2) and the full-entropy bonus at the same coefficient.
   Each step prints one line; verl's own output goes to ``<out>/train.log``.
3. Report: a side-by-side table, ``<out>/demo.png`` (held-out and training reward, full entropy, tail mass
   outside the top 2), one sentence saying what changed, and ``<out>/summary.json``.

Every invocation starts fresh (it deletes ``<out>``); ``--reuse-setup`` keeps the data, tokenizer and warm
start of an earlier invocation made with the same settings (the runs are always retrained).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

# Before torch loads: OpenMP threads that spin while they wait make the warm start 7.6x slower than one thread
# when another job holds a core (measured on the 2-core VM); sleeping threads cost nothing then.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The demo's settings, chosen by measurement on the 2-core VM (2026-12-01). With every demonstration in the
# tags (3 numbers in 1-20, 400 supervised steps: held-out reward 0.05 sampled, 0.14 greedy; or 2 numbers in
# 1-60, 300 steps: 0.23 sampled) 20 GRPO steps at lr 1e-4 or 3e-4 left the held-out reward flat and lr 1e-3
# collapsed it to 0.00-0.03 (verl's trainer and a plain-torch GRPO loop of the same sizes).
# With TAGGED_FRACTION = 0.3, 20 steps at lr 3e-4 raised it 0.01 -> 0.17 (plain-torch GRPO, same sizes).
NUM_TRAIN, NUM_TEST, DATA_SEED = 3000, 256, 0
NUMBERS = dict(num_numbers=(2,), min_number=1, max_number=60, min_target=1, max_target=100)
TAGGED_FRACTION = 0.4
VOCAB_SIZE = 1024
POLICY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
SFT_STEPS, SFT_BATCH, SFT_LR = 300, 32, 3e-3
MAX_PROMPT, MAX_RESPONSE = 48, 16
RL_LR, DEFAULT_STEPS, DEFAULT_COEFF, TEST_FREQ = 3e-4, 20, 0.001, 5
PROMPTS, ROLLOUTS = 8, 16  # per step; 16 rollouts give more prompts at least one success to learn from

# The runs: name -> (method preset, trust-region mode). Both use the same entropy_coeff.
RUNS = {"tre_k": ("tre_k", "top_k"), "entropy": ("ppo", "full")}
LABELS = {"tre_k": "TRE-K (K=2)", "entropy": "Entropy bonus"}

# Display label -> metric name in the run record (metrics.jsonl). The only place the demo names a metric.
METRICS = {
    "reward": "critic/score/mean",
    "entropy": "actor/ref/entropy_full",
    "regularizer": "actor/regularizer/value",
    "tail>top2": "actor/ref/tail_mass_top2",
    "resp_len": "response_length/mean",
    "seconds": "timing_s/step",
    "held-out": "val-core/countdown/reward/mean@1",
}


def _response(solution: str, tagged: bool = True) -> str:
    """A completion the warm start imitates: the verified equation in the reward's answer tags, or (untagged,
    scored 0) left in the think block."""
    return f"<think> </think> <answer> {solution} </answer>" if tagged else f"<think> {solution} </think>"


def prepare_data(out: Path) -> tuple[Path, list[dict]]:
    """Generated Countdown train/test parquet under ``out/data``; returns the directory and the train rows."""
    import pandas as pd

    from verl_tre.data.countdown_task import write_countdown_splits

    data = out / "data"
    if not (data / "test.parquet").is_file():
        write_countdown_splits(data, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=DATA_SEED, progress=False,
                               **NUMBERS)
    rows = pd.read_parquet(data / "train.parquet").to_dict("records")
    return data, rows


def _chat(tokenizer, row) -> str:
    return tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)


def build_tokenizer(out: Path, rows: list[dict]):
    """A byte-level BPE tokenizer trained on the prompts and solutions (in ``out/tokenizer``)."""
    from transformers import AutoTokenizer

    from verl_tre.utils import local_assets

    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    texts = [row["prompt"][0]["content"] for row in rows]
    texts += [_response(r["extra_info"]["solution"], tagged) for r in rows for tagged in (True, False)]
    texts += ["user\n", "assistant\n"] * len(rows)  # the chat template's role lines
    return local_assets.train_bpe_tokenizer(texts, path, vocab_size=VOCAB_SIZE, compact=True)


def warm_start(out: Path, tokenizer, rows: list[dict], steps: int, seed: int) -> Path:
    """Supervised warm start of a tiny Qwen2 policy on (prompt, verified solution) pairs; returns its dir.

    Each row's demonstration is tagged with probability TAGGED_FRACTION (drawn once per row from ``seed``).
    Loss: token-mean cross-entropy on the response tokens only (prompt positions masked with -100).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from verl_tre.utils import local_assets

    policy = out / "policy"
    if (policy / "model.safetensors").is_file():
        return policy
    # Measured on the 2-core VM: 2 threads 1.75x faster than 1; a policy this small gains nothing from more.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    init = local_assets.tiny_qwen2(out / "policy_init", tokenizer, seed=seed, **POLICY)
    model = AutoModelForCausalLM.from_pretrained(str(init))
    rng = random.Random(seed)
    examples = []
    for row in rows:
        prompt = tokenizer(_chat(tokenizer, row), add_special_tokens=False)["input_ids"]
        tagged = rng.random() < TAGGED_FRACTION
        answer = tokenizer(_response(row["extra_info"]["solution"], tagged) + tokenizer.eos_token,
                           add_special_tokens=False)["input_ids"]
        examples.append((prompt, answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=SFT_LR, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(steps), desc="warm start (supervised)", unit="step", file=sys.stdout)
    for _ in bar:
        batch = rng.sample(examples, SFT_BATCH)
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((SFT_BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((SFT_BATCH, width), -100)
        mask = torch.zeros((SFT_BATCH, width), dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    local_assets.tiny_qwen2(policy, tokenizer, model=model)
    shutil.rmtree(init)
    return policy


def training_overrides(run_dir: Path, data: Path, policy: Path, *, method: str, mode: str, steps: int,
                       entropy_coeff: float, seed: int) -> list[str]:
    """One GRPO run on CPU: PROMPTS x ROLLOUTS responses per step, one policy update per step, held-out reward
    (sampled at the training temperature, so it measures the trained policy itself) every TEST_FREQ steps."""
    return [
        "task=countdown", f"method={method}", "trainer.device=cpu", "trainer.n_gpus_per_node=1",
        "verl_tre.model_size=null",  # the tiny policy is neither paper size: run records must not say 1.5b
        f"actor_rollout_ref.model.path={policy}", f"critic.model.path={policy}",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
        f"data.max_prompt_length={MAX_PROMPT}", f"data.max_response_length={MAX_RESPONSE}", f"verl_tre.seed={seed}",
        f"data.train_batch_size={PROMPTS}", f"actor_rollout_ref.rollout.n={ROLLOUTS}", "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
        # Recomputing activations saves memory a 1M-parameter policy does not need, at a third more compute.
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}", "actor_rollout_ref.actor.use_dynamic_bsz=false",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={min(64, PROMPTS * ROLLOUTS)}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=128",
        f"actor_rollout_ref.actor.optim.lr={RL_LR}",
        f"actor_rollout_ref.actor.entropy_coeff={entropy_coeff}",
        f"actor_rollout_ref.actor.trust_region.mode={mode}", "actor_rollout_ref.actor.trust_region.top_k=2",
        "trainer.total_epochs=1", f"trainer.total_training_steps={steps}", "trainer.save_freq=-1",
        f"trainer.test_freq={TEST_FREQ}", "trainer.val_before_train=true", "trainer.resume_mode=disable",
        "trainer.logger=[console]", f"trainer.experiment_name=demo_{run_dir.name}",
        f"trainer.default_local_dir={run_dir}",
    ]


def read_records(run_dir: Path) -> list[dict]:
    """The run record's lines ({"step", "time", "metrics"}), skipping a partly written last line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _value(record: dict, label: str) -> float | None:
    value = record["metrics"].get(METRICS[label])
    return value if isinstance(value, float) and math.isfinite(value) else None


def _cell(value: float | None, width: int, digits: int = 3) -> str:
    finite = value is not None and math.isfinite(value)
    return f"{value:>{width}.{digits}f}" if finite else f"{'-':>{width}}"


def step_line(name: str, record: dict, steps: int) -> str:
    """The compact live line of one logged step."""
    parts = [f"[{name:>7}] step {record['step']:>3}/{steps}"]
    held_out = _value(record, "held-out")
    if _value(record, "reward") is not None:
        parts.append(f"reward {_cell(_value(record, 'reward'), 5)}")
        parts.append(f"entropy {_cell(_value(record, 'entropy'), 5)}")
        parts.append(f"regularizer {_cell(_value(record, 'regularizer'), 6)}")
        parts.append(f"tail>top2 {_cell(_value(record, 'tail>top2'), 5)}")
        parts.append(f"len {_cell(_value(record, 'resp_len'), 4, 1)}")
        parts.append(f"{_cell(_value(record, 'seconds'), 4, 1)} s")
    if held_out is not None:
        parts.append(f"held-out reward {held_out:.3f}")
    return "  ".join(parts)


class LiveLines:
    """Prints each new step of a run record as it lands (polls the file; the trainer runs in Ray workers).
    ``line(name, record, steps)`` formats one step (default: the demo's :func:`step_line`)."""

    def __init__(self, name: str, run_dir: Path, steps: int, stream, line=None):
        self.name, self.run_dir, self.steps, self.stream = name, run_dir, steps, stream
        self.line = line or step_line
        self.shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _emit(self) -> None:
        records = read_records(self.run_dir)
        for record in records[self.shown:]:
            self.stream.write(self.line(self.name, record, self.steps) + "\n")
            self.stream.flush()
        self.shown = max(self.shown, len(records))

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._emit()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._emit()


@contextlib.contextmanager
def output_to(log_path: Path):
    """Send this process's stdout/stderr (verl's metric dumps and worker logs, which Ray forwards to the driver)
    to ``log_path``; yields a stream on the original terminal for the live lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    streams = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python-level writers too: sys.stdout need not be fd 1 (pytest's capture, notebooks).
        sys.stdout = sys.stderr = log
        try:
            yield terminal
        finally:
            sys.stdout, sys.stderr = streams
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def summarize(records: list[dict]) -> dict:
    """Per-run numbers of the report: held-out reward at the first and last validation, first/last training
    step's statistics."""
    val = [(r["step"], _value(r, "held-out")) for r in records if _value(r, "held-out") is not None]
    train = [r for r in records if _value(r, "reward") is not None]
    out = {"val_reward_start": val[0][1] if val else float("nan"), "val_reward_end": val[-1][1] if val else float("nan")}
    for label in ("reward", "entropy", "tail>top2", "resp_len", "seconds"):
        values = [_value(r, label) for r in train if _value(r, label) is not None]
        out[f"{label}_first"] = values[0] if values else None
        out[f"{label}_last"] = values[-1] if values else None
        out[f"{label}_mean"] = sum(values) / len(values) if values else None
    return out


def side_by_side(stats: dict[str, dict], n_val: int) -> str:
    """The closing table: one column per run."""
    rows = [
        (f"held-out reward, before ({n_val} prompts)", "val_reward_start"),
        ("held-out reward, after", "val_reward_end"),
        ("training reward, first step", "reward_first"),
        ("training reward, last step", "reward_last"),
        ("full entropy, first step", "entropy_first"),
        ("full entropy, last step", "entropy_last"),
        ("tail mass outside top 2, first step", "tail>top2_first"),
        ("tail mass outside top 2, last step", "tail>top2_last"),
        ("response length, last step", "resp_len_last"),
        ("seconds per step (mean)", "seconds_mean"),
    ]
    names = list(stats)
    lines = [f"{'':<38}" + "".join(f"{LABELS.get(n, n):>16}" for n in names)]
    for title, key in rows:
        cells = "".join(_cell(stats[n].get(key), 16) for n in names)
        lines.append(f"{title:<38}{cells}")
    return "\n".join(lines)


def _trend(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "was not logged"
    verb = "rose" if end > start else "fell" if end < start else "stayed"
    return f"{verb} from {start:.3f} to {end:.3f}"


def conclusion(stats: dict[str, dict], n_val: int, coeff: float) -> str:
    """One sentence with the numbers: what training changed in each run."""
    tre, base = stats["tre_k"], stats["entropy"]
    return (f"From the same warm start, TRE-K's held-out reward ({n_val} prompts) "
            f"{_trend(tre['val_reward_start'], tre['val_reward_end'])} and the entropy bonus's "
            f"{_trend(base['val_reward_start'], base['val_reward_end'])} at the same coefficient {coeff:g}, "
            f"while the probability outside the top 2 tokens {_trend(tre['tail>top2_first'], tre['tail>top2_last'])} "
            f"under TRE-K and {_trend(base['tail>top2_first'], base['tail>top2_last'])} under the entropy bonus.")


def plot(records: dict[str, list[dict]], path: Path) -> Path:
    """Four panels over training steps, one line per run: held-out reward, training reward, full entropy,
    tail mass outside the top 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("held-out", "held-out reward (mean, sampled)"), ("reward", "training reward (mean)"),
              ("entropy", "full entropy (nats/token)"), ("tail>top2", "probability outside the top 2"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (label, title) in zip(axes.flat, panels):
        for name, recs in records.items():
            points = [(r["step"], _value(r, label)) for r in recs if _value(r, label) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if label == "held-out" else None, label=LABELS.get(name, name))
        ax.set_ylabel(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TRE-K vs entropy bonus on generated Countdown (verl RayPPOTrainer, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _settings(args) -> dict:
    return {"numbers": NUMBERS, "num_train": NUM_TRAIN, "num_test": NUM_TEST, "data_seed": DATA_SEED,
            "vocab": VOCAB_SIZE, "policy": POLICY, "tagged": TAGGED_FRACTION,
            "sft": [args.sft_steps, SFT_BATCH, SFT_LR], "seed": args.seed}


def set_up(out: Path, args) -> Path:
    """Data, tokenizer and warm start in ``out`` (reused with --reuse-setup when made with the same settings)."""
    stamp = out / "setup.json"
    settings = json.loads(json.dumps(_settings(args)))  # as stored: tuples become lists
    reuse = args.reuse_setup and stamp.is_file() and json.loads(stamp.read_text()) == settings
    for entry in out.iterdir() if out.exists() else ():
        if not (reuse and entry.name in ("data", "tokenizer", "policy", "setup.json")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data, rows = prepare_data(out)
    tokenizer = build_tokenizer(out, rows)
    policy = warm_start(out, tokenizer, rows, args.sft_steps, args.seed)
    stamp.write_text(json.dumps(settings))
    return data, policy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="working directory (emptied)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="GRPO steps per run (8 prompts x 16 rollouts)")
    parser.add_argument("--entropy-coeff", type=float, default=DEFAULT_COEFF, help="coefficient of both runs")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="supervised warm-start steps")
    parser.add_argument("--seed", type=int, default=0, help="warm-start initialization and RL data order")
    parser.add_argument("--reuse-setup", action="store_true",
                        help="keep data, tokenizer and warm start from an earlier invocation with the same settings")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.sft_steps < 1 or args.entropy_coeff < 0:
        parser.error("--steps and --sft-steps must be >= 1 and --entropy-coeff >= 0")
    out = args.out.expanduser().resolve()
    # verl 0.4.1 imports pkg_resources (setuptools < 81 is pinned for it); its banner says nothing to a newcomer.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

    started = time.time()
    data, policy = set_up(out, args)
    setup_s = time.time() - started
    print(f"set-up (data, tokenizer, warm start): {setup_s:.0f} s")

    from verl_tre.trainer import main_ppo

    configs = {}
    for name, (method, mode) in RUNS.items():
        overrides = training_overrides(out / name, data, policy, method=method, mode=mode, steps=args.steps,
                                       entropy_coeff=args.entropy_coeff, seed=args.seed)
        configs[name] = main_ppo.compose_config(overrides)
    log_path = out / "train.log"
    print(f"training {len(configs)} runs x {args.steps} steps, coefficient {args.entropy_coeff:g}; "
          f"verl's own output: {log_path}")
    print("  regularizer = the run's trained term (TRE-K: top-2 renormalized entropy x log V/log 2; "
          "Entropy: full entropy)")
    import ray

    trained = time.time()
    with output_to(log_path) as terminal:
        main_ppo.init_ray(configs["tre_k"])
        try:
            for name, config in configs.items():
                with LiveLines(name, out / name, args.steps, terminal):
                    main_ppo.run(config)
        finally:
            ray.shutdown()
    train_s = time.time() - trained

    records = {name: read_records(out / name) for name in configs}
    stats = {name: summarize(recs) for name, recs in records.items()}
    import pandas as pd

    n_val = len(pd.read_parquet(data / "test.parquet"))
    print()
    print(side_by_side(stats, n_val))
    figure = plot(records, out / "demo.png")
    print()
    print(conclusion(stats, n_val, args.entropy_coeff))
    summary = {
        "train_seconds": train_s, "setup_seconds": setup_s,
        "runs": {name: {"method": json.loads((out / name / "run.json").read_text())["method"],
                        "val_reward_start": stats[name]["val_reward_start"],
                        "val_reward_end": stats[name]["val_reward_end"], "n_val_prompts": n_val}
                 for name in configs},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nset-up {setup_s:.0f} s; training (both runs, one Ray start-up) {train_s:.0f} s")
    print(f"plot: {figure}   summary: {out / 'summary.json'}   verl's log: {log_path}")
    print(f"run records: {out / 'tre_k' / 'metrics.jsonl'}, {out / 'entropy' / 'metrics.jsonl'} (no checkpoints)")


if __name__ == "__main__":
    sys.exit(main())
