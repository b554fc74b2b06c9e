"""Worker heap under varying batch sizes (issue 18, docs/RELIABILITY.md §3 "Long soak").

vLLM's CPU linear layers run oneDNN matmuls (``onednn_mm``) whose primitives are made per
token count M.  At oneDNN's default, its process-wide primitive cache keeps every one made
(up to 1,024) besides the 32 each layer's handler keeps: live heap that grows with every
new batch size.  HGA on CPU turns that cache off (startup.bound_onednn_cache); this runs
vLLM's own onednn_mm with and without that setting, each in a fresh process (oneDNN reads
the variable once).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

SCRIPT = r"""
import ctypes, os, sys
import torch
import vllm._custom_ops as ops
if sys.argv[1] == "hga":
    from vllm_hga.startup import bound_onednn_cache
    bound_onednn_cache("cpu")
if not ops._supports_onednn:
    print("NO_ONEDNN"); sys.exit(0)

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def in_use():
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd

torch.manual_seed(0)
torch.set_num_threads(1)
# the handler cache vLLM gives each linear layer (model_executor/layers/utils.py)
weight = torch.randn(1536, 576, dtype=torch.bfloat16)
handlers = [ops.create_onednn_mm(weight.t(), 32) for _ in range(4)]
x = torch.randn(600, 576, dtype=torch.bfloat16)
for m in range(1, 33):  # fill the handlers' own caches first
    for h in handlers:
        ops.onednn_mm(h, x[:m], None)
before = in_use()
for m in range(33, 433):  # 400 new batch sizes
    for h in handlers:
        ops.onednn_mm(h, x[:m], None)
print("GROWTH", (in_use() - before) / 2**20)
"""


def heap_growth_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=300
    )
    if "NO_ONEDNN" in out.stdout:
        pytest.skip("this vLLM build has no onednn_mm")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("GROWTH")]
    assert line, out.stderr[-3000:]
    return float(line[0].split()[1])


def test_onednn_matmuls_of_new_batch_sizes_keep_no_heap_with_hgas_setting():
    default, bounded = heap_growth_mib("default"), heap_growth_mib("hga")
    assert default > 30, default  # the growth the soak saw: oneDNN keeps the primitives
    assert bounded < 8, bounded  # each handler's 32 stay; nothing else
