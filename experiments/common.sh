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
#   NNODES, N_GPUS_PER_NODE (default 1 and 8), PYTHON (default python3)
#   REWARD_SERVER_URL (HH only; default http://127.0.0.1:8888/predict), REWARD_SERVER_TOKEN: the launch checks the
#   server's /health after validating the configuration, before Ray starts
# Offline check: append verl_tre.dry_run=true to print the composed, validated config without starting anything.
set -euo pipefail

case "$SIZE" in
  1.5b) default_model=Qwen/Qwen2.5-1.5B-Instruct ;;
  7b) default_model=Qwen/Qwen2.5-7B-Instruct ;;
  *) echo "error: SIZE must be 1.5b or 7b, got '$SIZE'" >&2; exit 2 ;;
esac
MODEL_PATH="${MODEL_PATH:-$default_model}"
CRITIC_PATH="${CRITIC_PATH:-$MODEL_PATH}"
DATA_DIR="${DATA_DIR:-$HOME/data/$TASK}"
PYTHON="${PYTHON:-python3}"

launch() {
  local args=(
    "task=$TASK" "model=$SIZE" "method=$METHOD"
    "actor_rollout_ref.model.path=$MODEL_PATH"
    "critic.model.path=$CRITIC_PATH"
    "data.train_files=$DATA_DIR/train.parquet"
    "data.val_files=$DATA_DIR/test.parquet"
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
  exec "$PYTHON" -m verl_tre.trainer.main_ppo "${args[@]}"
}
