#!/usr/bin/env bash
# Make vLLM find the HGA plugin when the package runs from a source tree on PYTHONPATH
# (the GPU machine: gpu-kit site + `setup.py build_ext --inplace`, no pip install).
# vLLM discovers plugins through installed entry points; this writes the minimal
# dist-info that declares them (the same ones as setup.py) into DIR, default /tmp/hga-ep.
#   bash scripts/register_entry_points.sh && export PYTHONPATH=/tmp/gpu-site:$PWD:/tmp/hga-ep
set -euo pipefail
DIR=${1:-/tmp/hga-ep}
INFO="$DIR/vllm_hga-0.1.0.dist-info"
mkdir -p "$INFO"
printf 'Metadata-Version: 2.1\nName: vllm_hga\nVersion: 0.1.0\n' >"$INFO/METADATA"
cat >"$INFO/entry_points.txt" <<'EP'
[vllm.general_plugins]
hga = vllm_hga:register

[vllm.platform_plugins]
hga = vllm_hga.platform_hook:platform_plugin
EP
echo "entry points in $INFO"
