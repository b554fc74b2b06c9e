"""Opt-in routing options: the exact reference and the vectorised routing agree exactly.

``routing.route`` + ``routing.token_mask`` is what the backend's layer calls; the reference
(``reference.visible_mask``) is the definition.  Float64 everywhere so no near-tie flips.
"""

from __future__ import annotations

import pytest
import torch

from devkit import reference as ref
from vllm_hga import routing
from vllm_hga.config import HGAConfig, HGAConfigError
from vllm_hga.rope import RopeSpec

OPTIONS = {
    "mean_std": dict(group_score="mean_std", chunk_score="max_group"),
    "mean_std-alpha0.5": dict(group_score="mean_std", chunk_score="max_group", score_alpha=0.5),
    "max_group": dict(chunk_score="max_group", group_score="mean"),
    "paper-scoring": dict(chunk_score="summary", group_score="mean"),
}
BUDGETS = {
    "small": dict(sink_chunks=2, local_chunks=3, topk_chunks=4, topk_groups=6),
    "no-local": dict(sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=12),
    "no-sink": dict(
        sink_chunks=0, local_chunks=2, topk_chunks=2, topk_groups=8, groups_per_query=5
    ),
    "paper": dict(sink_chunks=2, local_chunks=8, topk_chunks=20, topk_groups=32),
    "default": dict(),
}


def _request(S, Hq, Hkv, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rope = RopeSpec.default(D, 1e5)
    # keys with uneven spread per group, as real keys have
    raw = torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64)
    raw = (
        raw
        * torch.rand(S // 16 + 1, 1, D, generator=gen, dtype=torch.float64).repeat_interleave(
            16, 0
        )[:S]
        * 3
    )
    k = rope.apply(raw, torch.arange(S))
    q = torch.randn(S, Hq, D, generator=gen, dtype=torch.float64) * 2
    return rope, q, k


def _vectorised_mask(q, k, rope, cfg, q_start=0):
    S = k.shape[0]
    summ = ref.summarize(k, 0, rope, cfg)
    pos = torch.arange(q_start, S)
    n = summ.chunk.shape[0]
    var = summ.var.unsqueeze(0) if summ.var is not None else None
    fixed, ids, ok = routing.route(
        q[q_start:], pos, summ.chunk.unsqueeze(0), summ.group.unsqueeze(0), cfg, group_var=var
    )
    assert fixed.shape[1] == n
    return routing.token_mask(pos, fixed, ids, ok, S, cfg).transpose(0, 1)  # [Hq, T, S]


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_vectorised_routing_equals_reference(option, budget):
    cfg = HGAConfig(**BUDGETS[budget], **OPTIONS[option])
    S, Hq, Hkv = 1000, 4, 2
    rope, q, k = _request(S, Hq, Hkv, seed=len(option) + len(budget))
    want = ref.visible_mask(q, 0, S, ref.summarize(k, 0, rope, cfg), cfg)
    got = _vectorised_mask(q, k, rope, cfg)
    assert torch.equal(got, want)


def test_mean_std_changes_routing_and_alpha0_is_max_group():
    S, Hq, Hkv = 900, 4, 2
    rope, q, k = _request(S, Hq, Hkv, seed=7)
    small = BUDGETS["small"]
    base = HGAConfig(chunk_score="max_group", group_score="mean", **small)
    m0 = ref.visible_mask(q, 0, S, ref.summarize(k, 0, rope, base), base)
    a0 = HGAConfig(chunk_score="max_group", group_score="mean_std", score_alpha=0.0, **small)
    assert torch.equal(ref.visible_mask(q, 0, S, ref.summarize(k, 0, rope, a0), a0), m0)
    a2 = HGAConfig(chunk_score="max_group", group_score="mean_std", score_alpha=2.0, **small)
    m2 = ref.visible_mask(q, 0, S, ref.summarize(k, 0, rope, a2), a2)
    assert not torch.equal(m2, m0)
    assert m2.sum() == m0.sum()  # same budget: only which groups differs


def test_group_key_variance_is_the_within_group_variance():
    cfg = HGAConfig(group_score="mean_std", chunk_score="max_group")
    _, _, k = _request(200, 3, 3, seed=2)
    var = ref.group_key_variance(k, cfg)  # [3 chunks, H, D]
    j, h, d = 1, 2, 5
    keys = k[64 * j : 64 * (j + 1), h, d].reshape(4, 16)
    want = ((keys - keys.mean(1, keepdim=True)) ** 2).mean()
    assert var.shape == (3, 3, 64)
    assert var[j, h, d].item() == pytest.approx(want.item(), rel=1e-12)


def test_mean_std_needs_variance_and_max_group():
    with pytest.raises(HGAConfigError, match="max_group"):
        HGAConfig(group_score="mean_std", chunk_score="summary")
    with pytest.raises(HGAConfigError, match="group_score"):
        HGAConfig(group_score="max")
    with pytest.raises(HGAConfigError, match="score_alpha"):
        HGAConfig(group_score="mean_std", chunk_score="max_group", score_alpha=-1)
    cfg = HGAConfig(group_score="mean_std", chunk_score="max_group")
    rope, q, k = _request(1000, 6, 2)
    summ = ref.summarize(k, 0, rope, cfg)
    with pytest.raises(ValueError, match="group_var"):
        routing.route(q, torch.arange(1000), summ.chunk.unsqueeze(0), summ.group.unsqueeze(0), cfg)


# ------------------------------------------------------------------ the backend's layer
def _layer_supports(cfg: HGAConfig) -> bool:
    """The layer (attention.py, ops) computes the summaries an option needs."""
    if cfg.group_score == "mean":
        return True
    from vllm_hga.ops import SummaryRotation

    return getattr(SummaryRotation(RopeSpec.default(64), cfg), "variance", None) is not None


LAYER_CASES = {
    "mean_std": dict(
        sink_chunks=2,
        local_chunks=3,
        topk_chunks=5,
        topk_groups=8,
        group_score="mean_std",
        chunk_score="max_group",
    ),
    "mean_std-no-local": dict(
        sink_chunks=1,
        local_chunks=0,
        topk_chunks=4,
        topk_groups=12,
        group_score="mean_std",
        chunk_score="max_group",
        score_alpha=3.0,
    ),
    "max_group": dict(
        sink_chunks=2,
        local_chunks=3,
        topk_chunks=5,
        topk_groups=8,
        chunk_score="max_group",
        group_score="mean",
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_equals_reference_with_option(case):
    """Paged blocks, chunked prefill and decode through HGALayer, float64: exact."""
    from layer_harness import PagedRun, run_requests

    cfg = HGAConfig(**LAYER_CASES[case])
    if not _layer_supports(cfg):
        pytest.skip("the layer does not compute this option's summaries yet (attention.py/ops)")
    lengths = [300, 1500]
    run = PagedRun(lengths, cfg, 6, 2, dtype=torch.float64, seed=5)
    run.summ = run.summ.double()
    got = run_requests(run, lengths, prefill_chunk=400, decode_tail=5)
    for r in range(len(lengths)):
        want, _ = ref.hga_attention(run.q[r], run.k[r], run.v[r], 0, run.rope, cfg)
        assert torch.allclose(got[r], want, atol=1e-10), (case, lengths[r])


@pytest.mark.parametrize(
    "router",
    [
        {"kind": "reserve", "reserve": 4},
        {"kind": "quest", "alpha": 1.0},
        {"kind": "sketch", "bits": 2, "span": "chunk"},
    ],
)
def test_research_routers_open_the_shipped_number_of_groups(router):
    """The replay's research routers (analysis.research_router) change which groups open,
    never how many: their NLLs compare at the density of the shipped rule."""
    from research import analysis
    from vllm_hga.ops import torch_ops

    cfg = HGAConfig(
        sink_chunks=1, local_chunks=2, topk_chunks=5, topk_groups=12, group_score="mean_std"
    )
    S, Hq, Hkv, D = 1400, 4, 2, 64
    rope, q, k = _request(S, Hq, Hkv, D, seed=11)
    q, k = q.float(), k.float()
    n = S // 64
    pages = torch_ops.summarize_blocks(
        k[: n * 64].view(n, 64, Hkv, D), torch_ops.SummaryRotation(rope, cfg)
    )
    route = analysis.research_router(**router)(k, cfg, rope)
    pos = torch.arange(S)
    fixed, ids, ok = route(
        q, pos, pages[:, :, 0].unsqueeze(0), pages[:, :, 1:].transpose(1, 2).unsqueeze(0), cfg
    )
    want = torch.tensor([routing.routed_groups(int(p) // 64, cfg) for p in pos])
    assert torch.equal(ok.sum(-1), want.unsqueeze(1).expand(S, Hq))
    opened = torch.where(ok, ids, -1)
    for row in (S - 1, 900):  # distinct groups, all in the pool
        g = opened[row][opened[row] >= 0].view(Hq, -1)
        assert all(len(set(h.tolist())) == h.numel() for h in g)
        c = row // 64
        assert bool(((g // 4 >= cfg.sink_chunks) & (g // 4 < c - cfg.local_chunks)).all())
    base = routing.route(
        q,
        pos,
        pages[:, :, 0].unsqueeze(0),
        pages[:, :, 1:].transpose(1, 2).unsqueeze(0),
        cfg,
        group_var=pages[:, :, 0].unsqueeze(0),
    )
    assert not torch.equal(
        routing.group_mask(ids, ok, n * 4), routing.group_mask(base[1], base[2], n * 4)
    )
