"""The grid of runs, and the two kinds of job that fill a results directory.

Layout of a results directory:
    study.json                  the StudyConfig (a resume must use the same one)
    sft/<horizon>_V<V>.pt       warm-start weights, sft/<horizon>.json their held-out readout
    runs/<run id>.json          one RL run: spec, per-step history, held-out readout before and after
A job whose output file exists is skipped, so an interrupted study resumes where it stopped. Every file is
written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .metrics import evaluate
from .policy import GRUPolicy
from .rl import Regularizer, RLConfig, train
from .sft import SFTConfig, warm_starts
from .task import HORIZONS, split
from .tokenizer import CharTokenizer

# name -> (regularizer kind, keep TRE's log V / log |T| factor)
VARIANTS = {
    "none": ("none", True),
    "full": ("full", True),
    "tre_k": ("tre_k", True),
    "tre_k_eq": ("tre_k", False),
    "tre_p": ("tre_p", True),
    "tre_p_eq": ("tre_p", False),
}
LABELS = {
    "none": "no entropy",
    "full": "full entropy",
    "tre_k": "TRE-K (K=2), nominal",
    "tre_k_eq": "TRE-K (K=2), equal strength",
    "tre_p": "TRE-P (p=0.99), nominal",
    "tre_p_eq": "TRE-P (p=0.99), equal strength",
}
SFT_SEED = 0


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines the study's numbers (not how many processes compute them).

    coeff: the one entropy coefficient of every regularized variant; "nominal" TRE multiplies its value by
    log V / log |T| (the reference), "equal strength" leaves the factor out. collapse_ratio: a run collapsed if
    its final held-out sampled accuracy is below this fraction of its warm start's.
    """

    vocab_sizes: tuple[int, ...] = (64, 4096)
    horizons: tuple[str, ...] = ("short", "long")
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    variants: tuple[str, ...] = tuple(VARIANTS)
    coeff: float = 0.05
    n_test: int = 256
    collapse_ratio: float = 0.5
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        bad = [h for h in self.horizons if h not in HORIZONS]
        if bad:
            raise ValueError(f"unknown horizons {bad}; choose from {list(HORIZONS)}")
        if min(self.vocab_sizes) < self.sft.base_vocab:
            raise ValueError(f"vocab sizes must be >= the SFT base vocabulary {self.sft.base_vocab}, got {self.vocab_sizes}")
        if self.coeff <= 0:
            raise ValueError(f"coeff must be > 0 (the 'none' variant is the zero-coefficient baseline), got {self.coeff}")

    @classmethod
    def quick(cls) -> "StudyConfig":
        """A few minutes on 2 cores: every variant and cell, one seed, a few steps (a pipeline check, not evidence)."""
        return cls(
            seeds=(0,),
            n_test=64,
            sft=SFTConfig(steps=150, widen_steps=10),
            rl=RLConfig(steps=6, log_every=3),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        data = dict(data)
        sft, rl = SFTConfig(**data.pop("sft")), RLConfig(**data.pop("rl"))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}, sft=sft, rl=rl)

    def runs(self) -> list[dict]:
        """Every RL run, most expensive first (large V, long horizon, TRE-P sorts), for better packing."""
        specs = [
            {"variant": var, "vocab_size": v, "horizon": h, "seed": s}
            for v in self.vocab_sizes
            for h in self.horizons
            for var in self.variants
            for s in self.seeds
        ]
        return sorted(specs, key=lambda r: (-r["vocab_size"], r["horizon"] != "long", not r["variant"].startswith("tre")))


def run_id(spec: dict) -> str:
    return f"{spec['variant']}_V{spec['vocab_size']}_{spec['horizon']}_s{spec['seed']}"


def write_json(path: Path, data) -> None:
    """Atomic JSON write (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _save_weights(path: Path, policy: GRUPolicy) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    torch.save(policy.state_dict(), tmp)
    os.replace(tmp, path)


def prepare(results: Path, cfg: StudyConfig) -> None:
    """Creates the results directory or checks that the one there holds the same study."""
    results.mkdir(parents=True, exist_ok=True)
    stored = results / "study.json"
    if stored.exists():
        if json.loads(stored.read_text()) != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(
                f"{results} holds a study with different settings (see {stored}); "
                "resume with the same options, or pass a new --results-dir"
            )
    else:
        write_json(stored, cfg.to_dict())


def sft_done(results: Path, horizon: str) -> bool:
    return (results / "sft" / f"{horizon}.json").exists()


def sft_job(results: Path, cfg: StudyConfig, horizon: str) -> str:
    """Trains and evaluates the warm starts of one horizon for every V."""
    start = time.time()
    train_set, test_set = split(cfg.n_test)
    hz = HORIZONS[horizon]
    policies = warm_starts(train_set, hz, cfg.vocab_sizes, SFT_SEED, cfg.sft)
    readout = {}
    for vocab, policy in policies.items():
        (results / "sft").mkdir(exist_ok=True)
        _save_weights(results / "sft" / f"{horizon}_V{vocab}.pt", policy)
        readout[str(vocab)] = evaluate(policy, CharTokenizer(vocab), test_set, hz, torch.Generator().manual_seed(SFT_SEED))
    write_json(results / "sft" / f"{horizon}.json", {"eval": readout, "seconds": time.time() - start})
    return horizon


def rl_done(results: Path, spec: dict) -> bool:
    return (results / "runs" / f"{run_id(spec)}.json").exists()


def rl_job(results: Path, cfg: StudyConfig, spec: dict) -> str:
    """One RL run from its warm start; writes runs/<run id>.json."""
    start = time.time()
    vocab, hz, seed = spec["vocab_size"], HORIZONS[spec["horizon"]], spec["seed"]
    kind, scale = VARIANTS[spec["variant"]]
    regularizer = Regularizer(kind, 0.0 if kind == "none" else cfg.coeff, scale)
    tokenizer = CharTokenizer(vocab)
    train_set, test_set = split(cfg.n_test)
    policy = GRUPolicy(vocab, cfg.sft.embed_dim, cfg.sft.hidden_dim)
    policy.load_state_dict(torch.load(results / "sft" / f"{spec['horizon']}_V{vocab}.pt"))
    history = train(policy, tokenizer, train_set, hz, regularizer, cfg.rl, seed)
    final = evaluate(policy, tokenizer, test_set, hz, torch.Generator().manual_seed(1000 + seed))
    before = json.loads((results / "sft" / f"{spec['horizon']}.json").read_text())["eval"][str(vocab)]
    collapsed = final["acc_sampled"] < cfg.collapse_ratio * before["acc_sampled"]
    record = {**spec, "history": history, "before": before, "final": final, "collapsed": collapsed}
    write_json(results / "runs" / f"{run_id(spec)}.json", {**record, "seconds": time.time() - start})
    return run_id(spec)
