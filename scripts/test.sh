#!/usr/bin/env bash
# One command: set up, then run every CPU test (unit, real vLLM engine, `vllm serve`).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not serve" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${VLLM_HGA_VENV:-.venv}/bin/python
"$PY" -m devkit.model >/dev/null  # convert the embedded model once (cached)
"$PY" -m devkit.texts >/dev/null  # fetch the real texts the tests read (cached)
exec "$PY" -m pytest -m "not gpu" "$@" tests
