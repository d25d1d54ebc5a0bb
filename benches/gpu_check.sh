#!/usr/bin/env bash
# The GPU checks of `make gpu-check`: the gpu-marked tests (bf16 on the device, the
# device executor, the staged CUDA loads), then benches/bench_kernels.py and
# benches/bench_gpu_sync.py. PY: the Python that has torch, triton and kimi_loader (default
# python3); $1: where the test log, the JUnit report and the figures go (default
# benches/results). The benchmarks run even when a test
# fails; the exit status is the tests' (or a benchmark's, if one failed).
#
# On a lent GPU machine (its own torch and triton, no package index), after
# `make gpu-wheels` here:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl &&
#   PYTHONPATH=/tmp/site benches/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
out=${1:-benches/results}
mkdir -p "$out" && out=$(cd "$out" && pwd)
day=$(date +%F)
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device')" || exit 1
"$PY" -c "import torch, triton, kimi_loader; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$out/gpu-tests-$day.log"
status=0
KIMI_LOADER_GPU_TESTS=1 "$PY" -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors ${GPU_PYTEST_ARGS:-} \
  --junitxml="$out/gpu-tests-$day.xml" 2>&1 | tee -a "$out/gpu-tests-$day.log" || status=$?
# each benchmark writes its figures into $out as they come in: a run stopped at a time
# limit still brings back what was measured
for b in bench_kernels bench_gpu_sync; do
  (cd benches && KIMI_LOADER_GPU_RESULTS="$out" "$PY" "$b.py") 2>&1 | tee -a "$out/gpu-bench-$day.log" ||
    status=$((status ? status : 1))
done
exit $status
