#!/usr/bin/env bash
# Countdown, Qwen2.5-7B-Instruct: Forking Tokens baseline (policy gradient on the 20 % highest-entropy tokens).
# Extra arguments are Hydra overrides; see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF=0.0
TASK=countdown SIZE=7b METHOD=forking_tokens
source "$(dirname "$0")/../common.sh"
launch "$@"
