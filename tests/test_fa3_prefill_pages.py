"""The page tables of the FA3 tile prefill (benchmarks/bench_fa3_prefill.py) on CPU: FA3's
paged varlen call, as its torch reference, over (tile, KV head) rows equals a dense masked
attention over exactly the keys tile-level routing makes visible (sinks, local window, the
tile's routed groups, the own chunk up to the query), at odd lengths and a chunked-prefill
step that starts inside a chunk.  On the GPU the bench checks FA3 itself against the same
reference."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_fa3_prefill import (
    pack_queries,
    page_views,
    paged_varlen_reference,
    random_routed,
    tile_rows,
    unpack_output,
)
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig

HKV, REP, D = 2, 3, 16


def dense_masked(q, keys, values, q_start, routed, tiles, cfg):
    """Exact attention of every query over its visible tokens (logical positions)."""
    T, Hq, _ = q.shape
    S = keys.shape[0]
    out = torch.empty(T, Hq, D)
    tile_of = {}
    for t, (p0, n) in enumerate(tiles):
        for p in range(p0, p0 + n):
            tile_of[p] = t
    for i in range(T):
        p = q_start + i
        c = p // CHUNK_SIZE
        for hq in range(Hq):
            h = hq // REP
            vis = torch.zeros(S, dtype=torch.bool)
            for ch in range(c):
                if ch < cfg.sink_chunks or ch >= c - cfg.local_chunks:
                    vis[ch * CHUNK_SIZE : (ch + 1) * CHUNK_SIZE] = True
            for g in routed[tile_of[p]][h].tolist():
                if g >= 0:
                    vis[g * GROUP_SIZE : (g + 1) * GROUP_SIZE] = True
            vis[c * CHUNK_SIZE : p + 1] = True
            s = keys[vis, h] @ q[i, hq] * D**-0.5
            out[i, hq] = torch.softmax(s, 0) @ values[vis, h]
    return out


@pytest.mark.parametrize(
    "S,q_start,groups", [(613, 0, 5), (613, 200, 7), (64 * 6, 64, 3), (70, 0, 4)]
)
def test_tile_rows_attend_exactly_the_routed_tokens(S, q_start, groups):
    cfg = HGAConfig()
    g = torch.Generator().manual_seed(S + q_start)
    nb = -(-S // CHUNK_SIZE)
    block_row = 2 + torch.randperm(nb, generator=g)  # blocks 0, 1 unused: a wrong page reads them
    pool = torch.randn(nb + 2, HKV, 2, CHUNK_SIZE, D, generator=g)
    keys = pool[block_row, :, 0].permute(0, 2, 1, 3).reshape(-1, HKV, D)[:S]
    values = pool[block_row, :, 1].permute(0, 2, 1, 3).reshape(-1, HKV, D)[:S]
    q = torch.randn(S - q_start, HKV * REP, D, generator=g)

    probe = tile_rows(block_row, q_start, S, _n_tiles(q_start, S), HKV, cfg)
    routed = random_routed(probe.tiles, groups, HKV, cfg, seed=S)
    rows = tile_rows(block_row, q_start, S, routed, HKV, cfg)
    k_pages, v_pages = page_views(pool)
    packed = paged_varlen_reference(
        pack_queries(q, rows, q_start, HKV), k_pages, v_pages, rows, D**-0.5
    )
    got = unpack_output(packed, rows, q_start, HKV)
    want = dense_masked(q, keys, values, q_start, routed, rows.tiles, cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the own chunk's partial group is the last page: seqused_k cuts the tile's future
    assert int(rows.seqused_k.min()) > 0


def _n_tiles(q_start: int, q_end: int) -> list:
    n, p = 0, q_start
    while p < q_end:
        p = min(q_end, (p // CHUNK_SIZE + 1) * CHUNK_SIZE)
        n += 1
    return [torch.full((HKV, 1), -1)] * n


def test_tile_rows_refuse_a_list_count_that_does_not_match_the_tiles():
    with pytest.raises(ValueError, match="tiles"):
        tile_rows(torch.arange(3), 0, 130, [torch.full((HKV, 1), -1)], HKV, HGAConfig())
