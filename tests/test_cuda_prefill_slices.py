"""Slicing of a prefill request for the CUDA path (pure Python; runs anywhere)."""

from __future__ import annotations

import itertools

import pytest

from vllm_hga.config import CHUNK_SIZE
from vllm_hga.ops import cuda_prefill


@pytest.mark.parametrize(
    "q_start,n,step",
    [(0, 1, 64), (0, 8192, 4096), (1001, 2329, 333), (8999, 2, 64), (63, 5000, 64), (5, 700, 4096)],
)
@pytest.mark.parametrize("aligned", [False, True])
def test_slices_cover_once_and_align(q_start, n, step, aligned):
    got = list(cuda_prefill.slices(q_start, n, step, aligned))
    assert got[0][0] == 0 and got[-1][1] == n
    assert all(a < b <= a + step for a, b in got)
    assert all(b == a2 for (_, b), (a2, _) in itertools.pairwise(got)), "gap or overlap"
    if aligned:  # no chunk's queries are split across two slices
        assert all((q_start + b) % CHUNK_SIZE == 0 for _, b in got[:-1])
    else:
        assert all(b - a == step for a, b in got[:-1])
