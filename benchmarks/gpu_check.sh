#!/usr/bin/env bash
# The GPU check, in one call: the CUDA-marked tests, then the GPU benchmark.
# On the lent machine: bash benchmarks/gpu_check.sh   (results also land in $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -p no:cacheprovider -m cuda tests -q 2>&1 | tee "$out/cuda_tests.txt"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu.py "$@" 2>&1 | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "cuda tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
