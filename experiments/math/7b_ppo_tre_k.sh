#!/usr/bin/env bash
# MATH, Qwen2.5-7B-Instruct: TRE-K (ours): entropy over the top-K tokens.
# Extra arguments are Hydra overrides; see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF=0.001
K=2
TASK=math SIZE=7b METHOD=tre_k
source "$(dirname "$0")/../common.sh"
launch actor_rollout_ref.actor.trust_region.top_k="$K" "$@"
