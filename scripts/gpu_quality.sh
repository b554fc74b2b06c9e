#!/usr/bin/env bash
# Quality of the CUDA path (issue 13 item 6) on the lent GPU: NLL gap on the three 8K
# documents and the 30-trial needle grid, bf16, FLASH_ATTN vs the HGA default, real
# weights of the embedded model.  Needs the gpu-kit installed and vllm_hga._C built, then
# two calls through scripts/gpu_replay.sh (it carries the weights and the texts):
#   run carry=[".replay/a"]  bash scripts/gpu_replay.sh first
#   run carry=[".replay/b"]  bash scripts/gpu_replay.sh run bash scripts/gpu_quality.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
# spawn: the parent must not have CUDA initialised when vLLM starts its engine core
export PYTHONPATH=/tmp/gpu-site:${PYTHONPATH:-}:/tmp/hga-ep VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_WORKER_MULTIPROC_METHOD=spawn PYTHONUNBUFFERED=1
bash scripts/register_entry_points.sh >/dev/null
timeout "${NLL_TIMEOUT:-280}" python3 -m research.eval_quality --dtype bfloat16 --length 8000 \
  --docs devils_dictionary argparse_py gnu_coding_standards --config default='{}' \
  --json "$OUT/nll_cuda.json" >"$OUT/nll.log" 2>&1
tail -12 "$OUT/nll.log"
timeout "${NIAH_TIMEOUT:-260}" python3 -m research.niah --dtype bfloat16 --hays gpl \
  --kinds password number --lengths 2048 4096 7500 --config default='{}' \
  --json "$OUT/niah_cuda.json" >"$OUT/niah.log" 2>&1
tail -14 "$OUT/niah.log"
