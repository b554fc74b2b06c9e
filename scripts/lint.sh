#!/usr/bin/env bash
# Lint: ruff (rules and format, pyproject.toml) over Python, clang-format (.clang-format) over csrc/.
#   bash scripts/lint.sh          check only (CI)
#   bash scripts/lint.sh --fix    rewrite files in place
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VLLM_HGA_VENV:-.venv}/bin
CSRC=(csrc/*.cu csrc/*.cuh csrc/*.cpp)
if [[ "${1:-}" == "--fix" ]]; then
  "$BIN/ruff" check --fix . && "$BIN/ruff" format . && "$BIN/clang-format" -i "${CSRC[@]}"
else
  "$BIN/ruff" check . && "$BIN/ruff" format --check . \
    && "$BIN/clang-format" --dry-run --Werror "${CSRC[@]}"
fi
