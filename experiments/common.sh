# Shared launcher of the paper's 30 experiment scripts (experiments/<task>/<size>_ppo*.sh); source it, then
# call `launch [extra hydra overrides]`. The paper's settings live in verl_tre/trainer/config/ (ppo_trainer.yaml
# and the task/, model/ and method/ presets); a script only picks its task, size and method and sets its
# coefficients. The caller sets before sourcing: TASK (math|countdown|hh), SIZE (1.5b|7b), METHOD
# (ppo|forking_tokens|kl_cov|tre_k|tre_p) and ENTROPY_COEFF (K, P), each a default the environment can override.
# The run's name and directory follow from its whole training configuration (trainer.experiment_name=auto), so
# runs that differ in anything (coefficient, K, P, verl_tre.seed=N, any override) never share a directory.
#
# Environment (defaults are the paper's):
#   MODEL_PATH   actor model (default Qwen/Qwen2.5-1.5B-Instruct or Qwen/Qwen2.5-7B-Instruct)
#   CRITIC_PATH  critic model (default MODEL_PATH: the paper's critic starts from the same model)
#   DATA_DIR     directory with train.parquet and test.parquet (default ~/data/<task>)
#   NNODES, N_GPUS_PER_NODE (default 1 and 8)
#   PYTHON       the interpreter (default: python3 when it can import hydra, verl and verl_tre; else, when no
#                virtual environment is active, the project's .venv that scripts/env.sh makes, or VERL_TRE_VENV)
#   REWARD_SERVER_URL (HH only; default http://127.0.0.1:8888/predict), REWARD_SERVER_TOKEN: the launch checks the
#   server's /health after validating the configuration, before Ray starts
# Offline check: append verl_tre.dry_run=true to print the composed, validated config without starting anything.
# MODEL_PATH, CRITIC_PATH and DATA_DIR reach Hydra quoted: commas, spaces, quotes and non-ASCII letters pass.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 2; }

case "$SIZE" in
  1.5b) default_model=Qwen/Qwen2.5-1.5B-Instruct ;;
  7b) default_model=Qwen/Qwen2.5-7B-Instruct ;;
  *) fail "SIZE must be 1.5b or 7b, got '$SIZE'" ;;
esac
MODEL_PATH="${MODEL_PATH:-$default_model}"
CRITIC_PATH="${CRITIC_PATH:-$MODEL_PATH}"
DATA_DIR="${DATA_DIR:-$HOME/data/$TASK}"
VENV="${VERL_TRE_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}"
for name in MODEL_PATH CRITIC_PATH DATA_DIR; do
  case "${!name}" in
    *\\*) fail "$name=${!name} holds a backslash, which Hydra's parser would alter; rename the path or link to it" ;;
  esac
done

# A value as a Hydra quoted string: unquoted, a comma makes a sweep and a non-ASCII letter a parse error.
hydra_quote() {
  local value="${1//\'/\\\'}"
  printf "'%s'" "${value//\$\{/\\\$\{}"
}

# Whether interpreter $1 can import what the launch needs (find_spec: nothing is imported, nothing printed).
can_launch() {
  "$1" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("hydra", "verl", "verl_tre")))' 2>/dev/null
}

# Sets PYTHON: as given, else python3 when it has the packages, else the project's .venv when no other
# environment is active; otherwise one line on how to get one (never a ModuleNotFoundError traceback).
pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    can_launch "$PYTHON" || fail "PYTHON=$PYTHON cannot import hydra, verl and verl_tre; point PYTHON at the" \
      "environment's python (e.g. $VENV/bin/python, made by bash scripts/env.sh)"
  elif can_launch python3; then
    PYTHON=python3
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    fail "the active environment $VIRTUAL_ENV lacks hydra, verl or verl_tre: pip install -e . there (from the" \
      "repository root), or deactivate it to use the project's .venv (bash scripts/env.sh makes it)"
  elif can_launch "$VENV/bin/python"; then
    PYTHON="$VENV/bin/python"
    echo "[verl_tre] no environment active: using the project's $VENV" >&2
  else
    fail "no Python environment with hydra, verl and verl_tre is active: make the project's with" \
      "bash scripts/env.sh, then source $VENV/bin/activate (or set PYTHON=/path/to/env/bin/python)"
  fi
}

launch() {
  local args=(
    "task=$TASK" "model=$SIZE" "method=$METHOD"
    "actor_rollout_ref.model.path=$(hydra_quote "$MODEL_PATH")"
    "critic.model.path=$(hydra_quote "$CRITIC_PATH")"
    "data.train_files=$(hydra_quote "$DATA_DIR/train.parquet")"
    "data.val_files=$(hydra_quote "$DATA_DIR/test.parquet")"
    "actor_rollout_ref.actor.entropy_coeff=$ENTROPY_COEFF"
    "trainer.nnodes=${NNODES:-1}"
    "trainer.n_gpus_per_node=${N_GPUS_PER_NODE:-8}"
    "$@"
  )
  local effective="ENTROPY_COEFF=$ENTROPY_COEFF"
  case "$METHOD" in tre_k) effective+=" K=$K" ;; tre_p) effective+=" P=$P" ;; esac
  echo "[verl_tre] $TASK $SIZE $METHOD: $effective" >&2
  # For tests: print the command's arguments (NUL-separated) instead of running it.
  if [ -n "${VERL_TRE_PRINT_ARGS:-}" ]; then
    printf '%s\0' "${args[@]}"
    return
  fi
  pick_python
  exec "$PYTHON" -m verl_tre.trainer.main_ppo "${args[@]}"
}
