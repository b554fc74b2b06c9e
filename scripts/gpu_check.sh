#!/usr/bin/env bash
# On the device machine (one command): build vllm_hga._C, run the GPU tests, run the
# kernel benchmark.  Logs and JSON go to $OUT (default ./out).  Extra args go to the
# benchmark, e.g.  scripts/gpu_check.sh --contexts 131072 --batches 16
# Skip stages with GPU_CHECK_SKIP="tests" or "bench".
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"

if [[ "$GPU_CHECK_SKIP" != *tests* ]]; then
  python3 -m pytest tests/gpu -m gpu -q -rs --confcutdir=tests/gpu -p no:cacheprovider \
    --durations=8 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [[ "$GPU_CHECK_SKIP" != *bench* ]]; then
  python3 -m benchmarks.bench_kernels --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
