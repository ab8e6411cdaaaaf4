#!/usr/bin/env bash
# HH, Qwen2.5-7B-Instruct: TRE-P (ours): entropy over the nucleus of mass P.
# The values below are defaults: ENTROPY_COEFF, K and P set in the environment win. Extra arguments are Hydra
# overrides (verl_tre.seed=N, any verl key); see experiments/common.sh for MODEL_PATH, CRITIC_PATH, DATA_DIR.
ENTROPY_COEFF="${ENTROPY_COEFF:-0.001}"
P="${P:-0.99}"
TASK=hh SIZE=7b METHOD=tre_p
source "$(dirname "$0")/../common.sh"
launch actor_rollout_ref.actor.trust_region.top_p="$P" "$@"
