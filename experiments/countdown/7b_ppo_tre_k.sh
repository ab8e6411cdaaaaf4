#!/usr/bin/env bash
# Countdown, Qwen2.5-7B-Instruct: TRE-K (ours): entropy over the top-K tokens.
# The values below are defaults: ENTROPY_COEFF, K and P set in the environment win. Extra arguments are Hydra
# overrides (verl_tre.seed=N, any verl key); see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF="${ENTROPY_COEFF:-0.001}"
K="${K:-2}"
TASK=countdown SIZE=7b METHOD=tre_k
source "$(dirname "$0")/../common.sh"
launch actor_rollout_ref.actor.trust_region.top_k="$K" "$@"
