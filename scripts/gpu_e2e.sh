#!/usr/bin/env bash
# On the device machine, after the gpu-kit and `python3 setup.py build_ext --inplace`:
# benchmarks.gpu_e2e for each backend in its own process (back to back, one warm machine),
# rows appended to one JSON in $OUT, each run bounded so the call still returns its output.
#   bash scripts/gpu_e2e.sh HGA FLASH_ATTN -- --points 8192:1 32768:1 --new 64 --capture-sizes 1 4 16
# Per-backend limit: GPU_E2E_TIMEOUT seconds (default 280).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
backends=()
while [[ $# -gt 0 && "$1" != "--" ]]; do backends+=("$1"); shift; done
[[ "$1" == "--" ]] && shift
bash scripts/register_entry_points.sh >/dev/null
export PYTHONPATH=/tmp/gpu-site:$PWD:/tmp/hga-ep VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
status=0
for b in "${backends[@]}"; do
  timeout "${GPU_E2E_TIMEOUT:-280}" python3 -m benchmarks.gpu_e2e --out "$OUT/e2e.json" \
    --backends "$b" "$@" >"$OUT/e2e_$b.log" 2>&1
  rc=$?
  echo "$b: rc $rc"
  grep -E "^RESULT|HGA: F=" "$OUT/e2e_$b.log" | cut -c1-400
  [[ $rc -ne 0 ]] && { tail -5 "$OUT/e2e_$b.log"; status=1; }
done
python3 -c "import json,sys; from benchmarks.gpu_e2e import ratio_table; print(ratio_table(json.load(open(sys.argv[1]))))" "$OUT/e2e.json" 2>/dev/null
exit $status
