"""The exact reference: summaries against their definition, routing invariants, dense limit."""

from __future__ import annotations

import pytest
import torch

from devkit import reference as ref
from vllm_hga.config import HGAConfig
from vllm_hga.ops import SummaryRotation, summarize_blocks
from vllm_hga.rope import RopeSpec, rotate

ROPES = {
    "neox": RopeSpec.default(64, theta=10000.0),
    "neox-theta1e6": RopeSpec.default(128, theta=1e6),
    "gptj": RopeSpec.default(64, theta=10000.0, neox_style=False),
    "partial": RopeSpec.default(64, theta=10000.0, rotary_dim=32),
}


def summaries_by_definition(k_raw: torch.Tensor, rope: RopeSpec, cfg: HGAConfig):
    """Straight from the paper's words, in float64, from PRE-RoPE keys k_raw [S, H, D].

    High-frequency pairs: mean of keys rotated at their own positions.
    Low-frequency pairs: mean of raw keys, rotated at the span's middle position.
    """
    C, gs = cfg.chunk_size, cfg.group_size
    S, H, D = k_raw.shape
    high = rope.high_frequency(C, cfg.rope_threshold)
    a_idx, b_idx = rope.pair_index()
    pos = torch.arange(S, dtype=torch.float64)
    rotated = rotate(k_raw, pos, rope)

    def span(lo: int, hi: int) -> torch.Tensor:
        out = rotated[lo:hi].mean(0)  # high pairs and unrotated dims: mean after rotation
        anchor = torch.tensor([lo + (hi - lo - 1) // 2], dtype=torch.float64)
        pooled = rotate(k_raw[lo:hi].mean(0, keepdim=True), anchor, rope)[0]
        low = ~high
        out[:, a_idx[low]] = pooled[:, a_idx[low]]
        out[:, b_idx[low]] = pooled[:, b_idx[low]]
        if rope.rotary_dim < D:  # unrotated tail: both rules agree
            out[:, rope.rotary_dim :] = k_raw[lo:hi, :, rope.rotary_dim :].mean(0)
        return out

    n = S // C
    chunk = torch.stack([span(j * C, (j + 1) * C) for j in range(n)])
    group = torch.stack(
        [
            torch.stack([span(j * C + m * gs, j * C + (m + 1) * gs) for m in range(C // gs)])
            for j in range(n)
        ]
    )
    return chunk, group


@pytest.mark.parametrize("name", sorted(ROPES))
def test_summaries_equal_float64_definition(name):
    rope = ROPES[name]
    # the paper's scoring: page row 0 is the chunk summary (mean_std puts the variance there)
    cfg = HGAConfig.from_mapping({"preset": "paper"})
    gen = torch.Generator().manual_seed(1)
    S, H = 5 * 64 + 17, 3
    k_raw = torch.randn(S, H, rope.head_size, generator=gen, dtype=torch.float64) * 3
    k = rotate(k_raw, torch.arange(S, dtype=torch.float64), rope)
    want_chunk, want_group = summaries_by_definition(k_raw, rope, cfg)
    # the reference, float64: exact to rounding
    got = ref.summarize(k, 0, rope, cfg)
    assert torch.allclose(got.chunk, want_chunk, atol=1e-12)
    assert torch.allclose(got.group, want_group, atol=1e-12)
    # the production op on float32 keys (what vLLM hands us), float32 math
    n = S // 64
    pages = summarize_blocks(k[: n * 64].float().view(n, 64, H, -1), SummaryRotation(rope, cfg))
    scale = want_chunk.abs().max()
    assert (pages[:, :, 0].double() - want_chunk).abs().max() / scale < 1e-5
    assert (pages[:, :, 1:].transpose(1, 2).double() - want_group).abs().max() / scale < 1e-5


def test_rope_threshold_splits_pairs_like_the_authors():
    # Qwen3 (theta 1e6, head 128): the authors' 0.5 rad rule keeps the first 23 of 64 pairs
    # as high frequency; theta 1e7 keeps 20.
    assert int(RopeSpec.default(128, 1e6).high_frequency(64, 0.5).sum()) == 23
    assert int(RopeSpec.default(128, 1e7).high_frequency(64, 0.5).sum()) == 20


def _random_request(S, Hq, Hkv, D=64, seed=0, theta=10000.0):
    gen = torch.Generator().manual_seed(seed)
    rope = RopeSpec.default(D, theta)
    k = rope.apply(torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64), torch.arange(S))
    v = torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64)
    q = torch.randn(S, Hq, D, generator=gen, dtype=torch.float64) * 2
    return rope, q, k, v


@pytest.mark.parametrize(
    "cfg",
    [
        HGAConfig(sink_chunks=2, local_chunks=3, topk_chunks=4, topk_groups=6),
        HGAConfig(sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=12),
        HGAConfig(sink_chunks=0, local_chunks=2, topk_chunks=2, topk_groups=8, groups_per_query=5),
        HGAConfig.from_mapping({"preset": "paper"}),
        HGAConfig(),
    ],
    ids=["small", "no-local", "no-sink", "paper", "default"],
)
def test_routing_invariants(cfg):
    S, Hq, Hkv = 1500, 4, 2
    rope, q, k, v = _random_request(S, Hq, Hkv, seed=3)
    summ = ref.summarize(k, 0, rope, cfg)
    mask = ref.visible_mask(q, 0, S, summ, cfg)  # [Hq, T, S]
    C, gs, M = 64, 16, 4
    F, L, G = cfg.sink_chunks, cfg.local_chunks, cfg.groups_per_query
    keys = torch.arange(S)
    for t in range(0, S, 7):
        c = t // C
        row = mask[:, t]
        # causality: nothing after the query
        assert not row[:, t + 1 :].any()
        # own chunk up to the query, sinks and local window always visible
        assert row[:, c * C : t + 1].all()
        for j in list(range(min(F, c))) + list(range(max(F, c - L), c)):
            assert row[:, j * C : (j + 1) * C].all()
        pool = max(0, c - L - F)
        if L == 0 and pool and G >= M * cfg.topk_chunks:
            # the preceding chunk is forced into the kept chunks; with every group of the
            # kept chunks opened it must then be visible whole
            assert row[:, (c - 1) * C : c * C].all()
        # exact budget: fixed part plus min(G, groups in the kept chunks) routed groups
        fixed = (min(F, c) + max(0, c - max(F, c - L))) * C + (t - c * C + 1)
        routed = min(G, M * min(cfg.topk_chunks, pool)) * gs
        assert (row.sum(dim=1) == fixed + routed).all(), t
        # routed keys come in whole 16-token groups
        middle = row[:, F * C : max(F, c - L) * C].reshape(Hq, -1, gs)
        assert ((middle.sum(-1) == 0) | (middle.sum(-1) == gs)).all()
    assert mask.sum() <= mask.shape[0] * (keys.unsqueeze(1) >= keys).sum()


@pytest.mark.parametrize("S", [1, 63, 64, 65, 127, 1000])
def test_full_coverage_reference_is_dense(S):
    cfg = HGAConfig.from_mapping({"preset": "full"})
    rope, q, k, v = _random_request(S, 6, 2, seed=S)
    out, mask = ref.hga_attention(q, k, v, 0, rope, cfg)
    dense = ref.masked_attention(q, k, v, ref.dense_causal_mask(6, 0, S, S), 64**-0.5)
    assert torch.equal(mask, ref.dense_causal_mask(6, 0, S, S))
    assert torch.allclose(out, dense, atol=1e-12)
    assert ref.density(mask, 0) == 1.0


def test_sparse_reference_differs_from_dense_and_density_is_counted():
    cfg = HGAConfig(sink_chunks=1, local_chunks=2, topk_chunks=3, topk_groups=4)
    S = 2000
    rope, q, k, v = _random_request(S, 4, 2, seed=9)
    out, mask = ref.hga_attention(q, k, v, 0, rope, cfg)
    dense = ref.masked_attention(q, k, v, ref.dense_causal_mask(4, 0, S, S), 64**-0.5)
    assert not torch.allclose(out, dense, atol=1e-3)  # routing really drops keys
    d = ref.density(mask, 0)
    assert d == mask.sum().item() / (4 * S * (S + 1) / 2)
    assert 0.05 < d < 0.5
