#!/usr/bin/env bash
# The GPU check, in one bounded call: the CUDA tests, then the GPU benchmark.
#
#   bash benchmarks/gpu_check.sh            # on the lent machine; results under $OUT if set
#
# It uses that machine's own python3 and CUDA build of torch and never installs torch or the
# constraints (that would replace the CUDA build with the CPU wheel): the checkout goes on
# PYTHONPATH. Each step has its own timeout (under 8 minutes in all), so a hang still leaves
# a readable summary.txt; an unexpected skip counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/asynchat-gpu-check}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

if ! why=$(python3 -c 'import torch; print("ok" if torch.cuda.is_available() else
    "torch.cuda.is_available() is False")' 2>&1) || [ "$why" != ok ]; then
    note "FAIL: $(echo "$why" | tail -n 1): no usable CUDA device, nothing checked"
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
python3 -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' \
    | tee -a "$summary"

# 1. The CUDA tests: only the files that hold them (others import packages this image lacks,
#    such as uvicorn), at most 120 s a test and 180 s in all.
timeout -k 10 180 python3 -m pytest -p no:cacheprovider -o timeout=120 -rs -q -m cuda \
    tests/test_cuda.py tests/test_transfer.py tests/test_graphs.py 2>&1 | tee "$out/cuda_tests.txt"
tests=${PIPESTATUS[0]}
[ "$tests" = 124 ] && note "FAIL: the CUDA tests ran past 180 s (a hang?)"
# Skips allowed on one GPU: trio (not in the image) and the two-GPU test.
unexpected=$(grep '^SKIPPED' "$out/cuda_tests.txt" | grep -v -e 'needs trio' -e 'needs two GPUs')
if [ -n "$unexpected" ]; then
    note "FAIL: unexpected skips on a CUDA machine:"
    note "$unexpected"
    tests=1
fi
note "cuda tests: exit $tests; $(tail -n 1 "$out/cuda_tests.txt")"

# 2. The eager benchmark: at most 150 s.
timeout -k 10 150 python3 benchmarks/gpu.py --steps 200 "$@" 2>&1 | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
[ "$bench" = 124 ] && note "FAIL: the benchmark ran past 150 s"
note "benchmark: exit $bench"

# 3. Graphs and compiled steps against the hand-written graph: at most 120 s.
timeout -k 10 120 python3 benchmarks/graphs.py --steps 200 --rounds 2 2>&1 \
    | tee "$out/graphs_bench.txt"
graphs=${PIPESTATUS[0]}
[ "$graphs" = 124 ] && note "FAIL: the graph benchmark ran past 120 s"
note "graph benchmark: exit $graphs"
exit $((tests || bench || graphs))
