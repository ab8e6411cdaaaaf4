#!/usr/bin/env bash
# HH, Qwen2.5-7B-Instruct: PPO; set ENTROPY_COEFF > 0 for the "Entropy" baseline (full-vocabulary bonus).
# The values below are defaults: ENTROPY_COEFF, K and P set in the environment win. Extra arguments are Hydra
# overrides (verl_tre.seed=N, any verl key); see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF="${ENTROPY_COEFF:-0.0}"
TASK=hh SIZE=7b METHOD=ppo
source "$(dirname "$0")/../common.sh"
launch "$@"
