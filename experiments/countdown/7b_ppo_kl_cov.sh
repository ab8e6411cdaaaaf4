#!/usr/bin/env bash
# Countdown, Qwen2.5-7B-Instruct: KL-Cov baseline (the reference variant: ratio 0.002, coefficient 1).
# The values below are defaults: ENTROPY_COEFF, K and P set in the environment win. Extra arguments are Hydra
# overrides (verl_tre.seed=N, any verl key); see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF="${ENTROPY_COEFF:-0.0}"
TASK=countdown SIZE=7b METHOD=kl_cov
source "$(dirname "$0")/../common.sh"
launch "$@"
