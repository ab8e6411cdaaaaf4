"""Train the HH scalar reward model with TRL's RewardTrainer (Bradley-Terry loss on chosen/rejected pairs).

Paper settings (both presets): num_labels 1, 3 epochs, lr 1e-5, warmup ratio 0.1, center_rewards_coefficient
0.01, bf16, data trl-lib/ultrafeedback_binarized (train split; test split for evaluation).

    # 1.5B, one node of 8 GPUs (data parallel)
    accelerate launch --config_file experiments/hh/reward/accelerate_multi_gpu.yaml \\
        experiments/hh/reward/train_reward_model.py --preset 1.5b --output-dir outputs/hh_rm_1.5b
    # 7B, DeepSpeed ZeRO-3 (pip install deepspeed)
    accelerate launch --config_file experiments/hh/reward/deepspeed_config_zero3.yaml \\
        experiments/hh/reward/train_reward_model.py --preset 7b --output-dir outputs/hh_rm_7b
    # a tiny CPU run on local data
    python experiments/hh/reward/train_reward_model.py --model DIR --train-file prefs.jsonl --no-bf16 --max-steps 10

Local files (--train-file / --eval-file, .jsonl, .json or .parquet) hold ``chosen``/``rejected`` as message lists
([user, assistant], the hub format; a ``prompt`` beside them, as in HuggingFaceH4/ultrafeedback_binarized, is
folded in) or as strings next to a string ``prompt`` column; other columns are dropped. The final
model goes to OUTPUT_DIR/model (written aside, then renamed into place); point the reward server at it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

HUB_DATASET = "trl-lib/ultrafeedback_binarized"


@dataclass(frozen=True)
class Preset:
    model: str
    per_device_batch_size: int
    gradient_accumulation_steps: int
    launch_hint: str


# The paper fixes the optimisation settings below; batch sizes are ours: a global batch of 64 pairs on 8 GPUs,
# sized so each preset fits its launcher (DDP for 1.5B, ZeRO-3 for 7B) on 80 GB cards at 2048 tokens.
PRESETS = {
    "1.5b": Preset("Qwen/Qwen2.5-1.5B-Instruct", 4, 2, "accelerate_multi_gpu.yaml"),
    "7b": Preset("Qwen/Qwen2.5-7B-Instruct", 2, 4, "deepspeed_config_zero3.yaml"),
}
PAPER = dict(num_train_epochs=3, learning_rate=1e-5, warmup_ratio=0.1, center_rewards_coefficient=0.01)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1.5b", help="model and batch layout (default 1.5b)")
    p.add_argument("--model", help="override the preset's model (hub id or local directory)")
    p.add_argument("--dataset", default=HUB_DATASET, help="hub dataset when no --train-file (default %(default)s)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="test", help="hub split for evaluation; '' to skip")
    p.add_argument("--train-file", type=Path, help="local preference data instead of the hub (.jsonl/.json/.parquet)")
    p.add_argument("--eval-file", type=Path, help="local evaluation data (with --train-file)")
    p.add_argument("--max-samples", type=int, help="use only the first N training pairs (quick runs)")
    p.add_argument("--output-dir", type=Path, help="default outputs/hh_reward_<preset>")
    p.add_argument("--epochs", type=float, default=PAPER["num_train_epochs"])
    p.add_argument("--lr", type=float, default=PAPER["learning_rate"])
    p.add_argument("--warmup-ratio", type=float, default=PAPER["warmup_ratio"])
    p.add_argument("--center-rewards-coefficient", type=float, default=PAPER["center_rewards_coefficient"])
    p.add_argument("--per-device-batch-size", type=int, help="pairs per device per step (default: preset)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: preset)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="TRL drops pairs whose chosen or rejected side is longer (tokens, default %(default)s)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (default: all epochs)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 (CPU runs)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--save-strategy", choices=["epoch", "steps", "no"], default="epoch",
                   help="intermediate checkpoints under OUTPUT_DIR/checkpoints (default %(default)s)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--report-to", default="none", help="e.g. wandb, tensorboard (default none)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.model = args.model or preset.model
    args.per_device_batch_size = args.per_device_batch_size or preset.per_device_batch_size
    args.grad_accum = args.grad_accum or preset.gradient_accumulation_steps
    args.output_dir = args.output_dir or Path("outputs") / f"hh_reward_{args.preset}"
    for name in ("train_file", "eval_file"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name.replace('_', '-')} {path} does not exist")
        if path is not None and path.suffix not in (".jsonl", ".json", ".parquet"):
            p.error(f"--{name.replace('_', '-')} {path}: use a .jsonl, .json or .parquet file")
    if args.eval_file and not args.train_file:
        p.error("--eval-file needs --train-file (the hub dataset has its own test split)")
    if not 0 <= args.warmup_ratio <= 1 or args.lr <= 0 or args.epochs <= 0:
        p.error("need lr > 0, epochs > 0 and warmup ratio in [0, 1]")
    return args


def _conversation(prompt, messages: list[dict]) -> list[dict]:
    """``messages`` as a whole conversation: as they are when they start with a user turn (the prompt is in
    them already), else after the prompt (a string, or TRL's list of prompt messages)."""
    if messages and messages[0]["role"] == "user":
        return messages
    return ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)) + messages


def to_conversations(dataset, source: str):
    """``chosen``/``rejected`` as whole [user, assistant] conversations, the format the server scores, and no
    other column. Accepted layouts: message lists alone (trl-lib/ultrafeedback_binarized); message lists beside
    a ``prompt`` (HuggingFaceH4/ultrafeedback_binarized: a string prompt that the lists repeat, or a reply-only
    list after it); strings beside a string ``prompt``. TRL would otherwise read a string prompt next to message
    lists as plain text and fail."""
    columns = set(dataset.column_names)
    if not {"chosen", "rejected"} <= columns:
        raise ValueError(f"{source} has columns {sorted(columns)}; preference data needs 'chosen' and 'rejected'")
    first = dataset[0]
    if isinstance(first["chosen"], list):
        if "prompt" not in columns:
            return dataset.select_columns(["chosen", "rejected"])

        def join(row):
            return {side: _conversation(row["prompt"], row[side]) for side in ("chosen", "rejected")}

        return dataset.map(join, remove_columns=sorted(columns - {"chosen", "rejected"}),
                           desc=f"whole conversations {source}")
    if "prompt" not in columns or not isinstance(first["prompt"], str):
        raise ValueError(
            f"{source}: 'chosen'/'rejected' are plain strings but there is no string 'prompt' column. The reward "
            "server scores the chat template of [user prompt, assistant response]; give each row a prompt, or "
            "chosen/rejected as message lists"
        )

    def wrap(row):
        user = {"role": "user", "content": row["prompt"]}
        return {"chosen": [user, {"role": "assistant", "content": row["chosen"]}],
                "rejected": [user, {"role": "assistant", "content": row["rejected"]}]}

    return dataset.map(wrap, remove_columns=sorted(columns), desc=f"chat format {source}")


def load_preferences(args):
    from datasets import load_dataset

    def local(path: Path):
        kind = "parquet" if path.suffix == ".parquet" else "json"
        return to_conversations(load_dataset(kind, data_files=str(path), split="train"), str(path))

    if args.train_file:
        train = local(args.train_file)
        evaluation = local(args.eval_file) if args.eval_file else None
    else:
        try:
            train = load_dataset(args.dataset, split=args.train_split)
            evaluation = load_dataset(args.dataset, split=args.eval_split) if args.eval_split else None
        except Exception as exc:  # offline machines land here; say what to do instead
            raise SystemExit(f"could not load {args.dataset} from the hub ({type(exc).__name__}: {exc}); "
                             "pass --train-file with local preference data") from exc
        train = to_conversations(train, args.dataset)
        evaluation = to_conversations(evaluation, args.dataset) if evaluation is not None else None
    if args.max_samples:
        train = train.select(range(min(args.max_samples, len(train))))
    return train, evaluation


def training_settings(args) -> dict:
    """Keyword arguments of TRL's RewardConfig for ``args``."""
    has_eval = bool(args.eval_file or (not args.train_file and args.eval_split))
    return dict(
        output_dir=str(args.output_dir / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        lr_scheduler_type="linear",
        center_rewards_coefficient=args.center_rewards_coefficient,
        bf16=args.bf16,
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.max_length,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy=args.save_strategy,
        save_only_model=True,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        seed=args.seed,
    )


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an older ``dst`` is swapped out, then removed."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import torch

    if args.bf16 and not torch.cuda.is_available():
        raise SystemExit("bf16 training needs a GPU; pass --no-bf16 for a CPU run")
    train, evaluation = load_preferences(args)  # data problems surface before any model is loaded

    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**training_settings(args))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = RewardTrainer(model=args.model, args=config, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer)
    if not trainer.accelerator.distributed_type.value.startswith(("MULTI", "DEEPSPEED")) and args.preset == "7b":
        print(f"note: the 7b preset is meant for `accelerate launch --config_file "
              f"experiments/hh/reward/{PRESETS['7b'].launch_hint}`", file=sys.stderr)
    result = trainer.train()
    metrics = {"train": result.metrics}
    if evaluation is not None:
        metrics["eval"] = trainer.evaluate()

    final, staging = args.output_dir / "model", args.output_dir / ".model.partial"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every rank takes part: ZeRO-3 gathers the shards here
    if trainer.accelerator.is_main_process:
        summary = {"model": args.model, "preset": args.preset, "pairs": len(train), "metrics": metrics,
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        (staging / "reward_training.json").write_text(json.dumps(summary, indent=2))
        replace_dir(staging, final)
        print(f"reward model saved to {final}\n  serve it: HH_REWARD_MODEL_PATH={final} "
              "bash experiments/hh/reward/run_with_server.sh")
    trainer.accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    main()
