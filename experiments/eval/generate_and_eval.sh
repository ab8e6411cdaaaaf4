#!/usr/bin/env bash
# Sample n responses per prompt from a checkpoint with the paper's validation sampling (temperature 1.0,
# top_p 0.7), through verl's own generation entry point, then score them with `python -m verl_tre.eval`.
#
# Usage: experiments/eval/generate_and_eval.sh CHECKPOINT DATA.parquet OUT_DIR [hydra overrides...]
#   CHECKPOINT  a Hugging Face model directory (config.json), a verl FSDP actor checkpoint
#               (.../global_step_N/actor) or its global_step_N directory; FSDP shards are merged first.
#   DATA        a parquet in verl's format (data_source, prompt as chat messages, reward_model.ground_truth),
#               e.g. the test split written by experiments/<task>/data_preprocess.
#   OUT_DIR     gets generations.parquet, eval.json (and hf_model/ when a checkpoint was merged).
# Settings (environment): N_SAMPLES (8), TEMPERATURE (1.0), TOP_P (0.7), TOP_K (-1: off, vLLM's convention;
#   use 0 with rollout.name=hf), PROMPT_LENGTH (1024), RESPONSE_LENGTH (8192 for MATH in the paper; default
#   1024), N_GPUS (default: the GPUs nvidia-smi lists; with none the script stops: main_generation needs GPUs),
#   TP (tensor parallel size, 1), BATCH_SIZE (prompts per generation batch, 512),
#   KS (k values for the eval, e.g. 1,4,8; default powers of two up to N_SAMPLES), PYTHON (python),
#   DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

if [ $# -lt 3 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
CKPT="$1"; DATA="$2"; OUT="$3"; shift 3

N_SAMPLES="${N_SAMPLES:-8}"
TEMPERATURE="${TEMPERATURE:-1.0}"
TOP_P="${TOP_P:-0.7}"
TOP_K="${TOP_K:--1}"
PROMPT_LENGTH="${PROMPT_LENGTH:-1024}"
RESPONSE_LENGTH="${RESPONSE_LENGTH:-1024}"
TP="${TP:-1}"
BATCH_SIZE="${BATCH_SIZE:-512}"
PYTHON="${PYTHON:-python}"
die() { echo "generate_and_eval.sh: $*" >&2; exit 2; }

if [ -z "${N_GPUS:-}" ]; then
  N_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  # verl's main_generation places each rollout worker on a GPU: without one it waits forever, silently.
  [ "$N_GPUS" -gt 0 ] || [ "${DRY_RUN:-0}" = 1 ] || die "no GPU is visible (nvidia-smi lists none): verl's" \
    "main_generation needs one per rollout worker and would wait forever here; run this on a GPU machine (or" \
    "set N_GPUS to the GPUs nvidia-smi cannot see), or score generations you have with python -m verl_tre.eval"
  [ "$N_GPUS" -gt 0 ] || N_GPUS=1
fi
[ -e "$CKPT" ] || die "checkpoint $CKPT does not exist"
[ -f "$DATA" ] || die "data file $DATA does not exist (write it with experiments/<task>/data_preprocess first)"
[[ "$N_SAMPLES" =~ ^[1-9][0-9]*$ ]] || die "N_SAMPLES must be a positive integer, got '$N_SAMPLES'"
[[ "$N_GPUS" =~ ^[1-9][0-9]*$ ]] || die "N_GPUS must be a positive integer, got '$N_GPUS'"
[ $((N_GPUS % TP)) -eq 0 ] || die "N_GPUS=$N_GPUS is not a multiple of TP=$TP"
# main_generation asks Ray for 10 CPUs per GPU worker (RayResourcePool's default max_colocate_count) plus one for
# its driver task; Ray's CPU count is bookkeeping, so advertise at least that many rather than wait forever for
# CPUs the machine lacks. A ray_init.num_cpus=N override comes later and wins.
RAY_CPUS=$(( 10 * N_GPUS + 1 ))
[ "$(nproc 2>/dev/null || echo 1)" -le "$RAY_CPUS" ] || RAY_CPUS=$(nproc)

run() {
  echo "+ $*" >&2
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}

# A global_step_N directory holds the actor's shards under actor/.
[ -d "$CKPT/actor" ] && CKPT="$CKPT/actor"
if [ -f "$CKPT/config.json" ]; then
  MODEL="$CKPT"
elif compgen -G "$CKPT/model_world_size_*_rank_0.pt" >/dev/null; then
  MODEL="$OUT/hf_model"
  run "$PYTHON" -m verl.model_merger merge --backend fsdp --local_dir "$CKPT" --target_dir "$MODEL"
else
  die "$CKPT is neither a Hugging Face model (config.json) nor a verl FSDP checkpoint (model_world_size_*_rank_0.pt)"
fi

run mkdir -p "$OUT"
run "$PYTHON" -m verl.trainer.main_generation \
  trainer.nnodes=1 trainer.n_gpus_per_node="$N_GPUS" \
  model.path="$MODEL" \
  data.path="$DATA" data.prompt_key=prompt data.n_samples="$N_SAMPLES" data.batch_size="$BATCH_SIZE" \
  data.output_path="$OUT/generations.parquet" \
  rollout.temperature="$TEMPERATURE" rollout.top_p="$TOP_P" rollout.top_k="$TOP_K" rollout.do_sample=True \
  rollout.prompt_length="$PROMPT_LENGTH" rollout.response_length="$RESPONSE_LENGTH" \
  rollout.tensor_model_parallel_size="$TP" rollout.gpu_memory_utilization=0.6 \
  ray_init.num_cpus="$RAY_CPUS" \
  "$@"

run "$PYTHON" -m verl_tre.eval "$OUT/generations.parquet" --output "$OUT/eval.json" ${KS:+--k "$KS"}
