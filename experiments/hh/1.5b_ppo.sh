#!/usr/bin/env bash
# HH, Qwen2.5-1.5B-Instruct: PPO; set ENTROPY_COEFF > 0 for the "Entropy" baseline (full-vocabulary bonus).
# Extra arguments are Hydra overrides; see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF=0.0
TASK=hh SIZE=1.5b METHOD=ppo
source "$(dirname "$0")/../common.sh"
launch "$@"
