#!/usr/bin/env bash
# MATH, Qwen2.5-1.5B-Instruct: Forking Tokens baseline (policy gradient on the 20 % highest-entropy tokens).
# The values below are defaults: ENTROPY_COEFF, K and P set in the environment win. Extra arguments are Hydra
# overrides (verl_tre.seed=N, any verl key); see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF="${ENTROPY_COEFF:-0.0}"
TASK=math SIZE=1.5b METHOD=forking_tokens
source "$(dirname "$0")/../common.sh"
launch "$@"
