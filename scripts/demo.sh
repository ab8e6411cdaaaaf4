#!/usr/bin/env bash
# The main job on an embedded default: TRE-K and the entropy bonus trained from one warm start through verl's PPO
# trainer on CPU, on a Countdown set it generates (no downloads). Output under outputs/demo (emptied first).
# Extra arguments go to `python -m verl_tre.demo` (e.g. --steps 30, --entropy-coeff 0.005, --seed 1).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m verl_tre.demo "$@"
