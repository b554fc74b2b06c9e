"""Tile-level research routers (research.analysis.tile_router): the routing a paged-varlen
prefill would need (issue 14), one routed group list per 64-query tile.  Synthetic q/k,
no model: fast."""

from __future__ import annotations

import pytest
import torch

from vllm_hga import routing
from vllm_hga.config import HGAConfig
from vllm_hga.ops import torch_ops
from vllm_hga.rope import RopeSpec

S, HQ, HKV, D = 1400, 6, 2, 64


def _setup(group_score: str, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    rope = RopeSpec.default(D, 1e5)
    spread = torch.rand(S // 16 + 1, 1, D, generator=gen).repeat_interleave(16, 0)[:S] * 3
    k = rope.apply(torch.randn(S, HKV, D, generator=gen) * spread, torch.arange(S))
    q = torch.randn(S, HQ, D, generator=gen) * 2
    cfg = HGAConfig(
        sink_chunks=1,
        local_chunks=2,
        topk_chunks=5,
        topk_groups=12,
        chunk_score="max_group",
        group_score=group_score,
    )
    n = S // 64
    pages = torch_ops.summarize_blocks(
        k[: n * 64].view(n, 64, HKV, D), torch_ops.SummaryRotation(rope, cfg)
    )
    summ = (pages[:, :, 0].unsqueeze(0), pages[:, :, 1:].transpose(1, 2).unsqueeze(0))
    return cfg, rope, q, k, summ


def _route(kind_params, cfg, rope, q, k, summ, pos):
    from research import analysis

    return analysis.research_router("tile", **kind_params)(k, cfg, rope)(q, pos, *summ, cfg)


@pytest.mark.parametrize("group_score", ["sketch", "mean"])
def test_one_query_tiles_are_per_query_routing(group_score):
    cfg, rope, q, k, summ = _setup(group_score)
    pos = torch.arange(S)
    want = routing.route(q, pos, *summ, cfg)
    for agg in ("max", "mean"):  # a 1-query tile's max and mean are the query itself
        got = _route({"agg": agg, "tile": 1}, cfg, rope, q, k, summ, pos)
        assert torch.equal(got[0], want[0])
        n = summ[0].shape[1] * 4
        assert torch.equal(
            routing.group_mask(got[1], got[2], n), routing.group_mask(want[1], want[2], n)
        )


@pytest.mark.parametrize(
    "params", [{"agg": "max"}, {"agg": "mean"}, {"agg": "max", "per": "kv"}], ids=str
)
def test_a_tile_shares_one_list(params):
    cfg, rope, q, k, summ = _setup("sketch")
    first = 256  # a block of queries as the replay routes it (multiple of 64)
    pos = torch.arange(first, S)
    fixed, ids, ok = _route(params, cfg, rope, q[first:], k, summ, pos)
    n = summ[0].shape[1] * 4
    vis = routing.group_mask(ids, ok, n)
    tile = pos // 64
    for t in tile.unique():
        rows = vis[tile == t]
        assert bool((rows == rows[0]).all()), t  # every query of the tile, every head
        assert bool((fixed[tile == t] == fixed[tile == t][0]).all())
    # the shipped number of groups, all distinct, all in the pool of the own chunk
    want = torch.tensor([routing.routed_groups(int(p) // 64, cfg) for p in pos])
    assert torch.equal(ok.sum(-1), want.unsqueeze(1).expand(len(pos), HQ))
    g = torch.arange(n)
    c = (pos // 64).view(-1, 1, 1)
    in_pool = (g // 4 >= cfg.sink_chunks) & (g // 4 < c - cfg.local_chunks)
    assert not bool((vis & ~in_pool).any())
    if params.get("per") == "kv":  # one list per KV head: its query heads agree
        v = vis.view(len(pos), HKV, HQ // HKV, n)
        assert bool((v == v[:, :, :1]).all())
    # and tiles differ from per-query routing (else the test proves nothing)
    base = routing.route(q[first:], pos, *summ, cfg)
    assert not torch.equal(vis, routing.group_mask(base[1], base[2], n))


def test_max_tile_keeps_each_querys_top_group():
    """Under tile max, the pool group with the best score of any of the tile's queries
    (per head) is open for every query of the tile."""
    cfg, rope, q, k, summ = _setup("sketch")
    pos = torch.arange(S)
    g, _ = routing.route_scores(q, *summ, cfg)
    _, ids, ok = _route({"agg": "max"}, cfg, rope, q, k, summ, pos)
    n = summ[0].shape[1] * 4
    vis = routing.group_mask(ids, ok, n)
    _, pool = routing.window_masks(pos, n // 4, cfg)
    sc = g.flatten(2).masked_fill(~pool.repeat_interleave(4, -1).unsqueeze(1), float("-inf"))
    tile = pos // 64
    for t in tile.unique():
        sel = tile == t
        if not bool(pool[sel].any()):
            continue
        best = sc[sel].amax(0).argmax(-1)  # [Hq]: the tile's best pool group per head
        assert bool(vis[sel][0].gather(-1, best.unsqueeze(-1)).all()), t
