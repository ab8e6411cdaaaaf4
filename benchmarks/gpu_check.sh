#!/usr/bin/env bash
# One short run on a GPU machine: CUDA equals CPU for every entropy path, then the GPU speed/memory goals.
#   bash benchmarks/gpu_check.sh            (about 3-5 minutes on one H100/H200, setup excluded)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q tests/test_torch_functional.py tests/test_numerics_edge.py -k cuda
python benchmarks/bench_entropy.py --device cuda --dtype bf16 --n 4096,16384 \
  --cases verl_eager,verl_compiled,full,tre_k,tre_p,actor_tre_p
