"""Evaluation of sampled responses: mean reward, unbiased pass@k, avg@k and maj@k per data source.

``python -m verl_tre.eval INPUT`` scores a ``verl.trainer.main_generation`` parquet or a training run's
validation dump; the functions below are the same steps for use from Python.
"""

from verl_tre.eval.evaluate import evaluate, score_samples, summarize
from verl_tre.eval.metrics import avg_at_k, default_ks, maj_at_k, pass_at_k
from verl_tre.eval.samples import PromptSamples, load_samples

__all__ = [
    "PromptSamples",
    "avg_at_k",
    "default_ks",
    "evaluate",
    "load_samples",
    "maj_at_k",
    "pass_at_k",
    "score_samples",
    "summarize",
]
