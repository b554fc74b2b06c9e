#!/usr/bin/env bash
# One command: set up, then serve the embedded SmolLM2-135M-Instruct with HGA through
# vLLM's OpenAI-compatible server on http://localhost:${PORT:-8000}.
# Extra arguments go to the server, e.g.  bash scripts/serve.sh --additional-config \
#   '{"hga": {"topk_chunks": 32}}'
# To serve another model: HGA_MODEL=/path/or/hf-id bash scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${VLLM_HGA_VENV:-.venv}/bin/python
MODEL=${HGA_MODEL:-$("$PY" -m devkit.model)}
# vLLM's CPU worker otherwise reserves --gpu-memory-utilization (0.92) of the NUMA node's
# RAM for its KV cache and refuses to start when less is free (page cache, other jobs):
# on CPU, unless the caller sized it, give it a fixed 4 GiB (the HGA host pool takes the
# same budget: 180K tokens of full K/V for SmolLM2-135M, 22 contexts of 8K).
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
   && [[ -z "${VLLM_CPU_KVCACHE_SPACE:-}" && " $* " != *" --kv-cache-memory-bytes"* \
         && " $* " != *" --gpu-memory-utilization"* ]]; then
  export VLLM_CPU_KVCACHE_SPACE=4
fi
# vllm-cpu 0.32.0's `vllm` console script looks up a distribution named "vllm" and fails;
# the same server runs as a module.  On CUDA installs `vllm serve` works too.
exec "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
  --attention-backend HGA --max-model-len "${MAX_MODEL_LEN:-8192}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
