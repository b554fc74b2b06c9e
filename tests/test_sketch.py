"""group_score "sketch": the 2-bit key copy in the summary pages, and routing by it.

The page format (``ops.torch_ops.pack_sketch``) must decode to exactly the keys the
reference defines (``reference.sketch_keys``); routing from the pages must pick what the
reference picks; a layer running it must give the reference's attention.
"""

from __future__ import annotations

import pytest
import torch
from layer_harness import PagedRun, run_requests

from devkit import reference as ref
from vllm_hga import routing
from vllm_hga.config import HGAConfig, HGAConfigError
from vllm_hga.ops import torch_ops
from vllm_hga.rope import RopeSpec

SKETCH = dict(group_score="sketch", chunk_score="max_group")


def _keys(n_chunks: int, H: int, D: int, seed: int) -> torch.Tensor:
    """Post-RoPE-like keys [n, 64, H, D] with uneven per-channel scales and an outlier."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n_chunks, 64, H, D, generator=gen) * (torch.rand(D, generator=gen) * 4)
    k[:, 5, :, 3] += 40.0  # a massive channel on one token, as real models have
    return k


def test_production_quantizer_equals_the_reference():
    """The package has its own grid and codes (production does not import devkit): they
    must be the reference's bit for bit, also on constant channels and float16 overflow."""
    k = _keys(4, 2, 64, seed=3)
    k[1, :, 0, 7] = 2.5  # a constant channel: step 0
    k[2, 9, 1, 11] = 1e6  # beyond float16: clamped
    lo, step, codes = torch_ops.sketch_quantize(k)
    ref_lo, ref_step = ref.sketch_grid(k)
    assert torch.equal(lo, ref_lo) and torch.equal(step, ref_step)
    assert torch.equal(codes, ref.sketch_codes(k, ref_lo, ref_step))
    assert torch_ops.SKETCH_LEVELS == ref.SKETCH_LEVELS


@pytest.mark.parametrize("D", [64, 128])
def test_pages_decode_to_the_reference_sketch(D):
    k = _keys(3, 2, D, seed=D)
    page = torch_ops.pack_sketch(k)
    assert page.shape == (3, 2, 5, D) and page.dtype == torch.float32  # the usual page size
    got = torch_ops.unpack_sketch(page[:, :, 0], page[:, :, 1:])  # [n, H, M, 16, D]
    want = ref.sketch_keys(k)  # [n, 64, H, D]
    assert torch.equal(got, want.view(3, 4, 16, 2, D).permute(0, 3, 1, 2, 4))
    # a uniform 2-bit grid between the chunk's min and max: error at most half a step
    # (plus the float16 rounding of the grid)
    lo, hi = k.amin(1, keepdim=True), k.amax(1, keepdim=True)
    err = (want - k).abs()
    assert torch.all(err <= (hi - lo) / 6 * 1.01 + 1e-2 * (hi.abs() + lo.abs()))
    assert err.mean() > 0  # it is a lossy copy, not the keys themselves


def test_constant_channels_and_huge_values_stay_finite():
    k = torch.zeros(1, 64, 1, 64)
    k[..., 1] = 7.0  # constant channel: step 0
    k[0, 3, 0, 2] = 1e6  # beyond float16: clipped to its range
    hat = ref.sketch_keys(k)
    assert torch.isfinite(hat).all()
    assert torch.equal(hat[..., 1], k[..., 1])
    page = torch_ops.pack_sketch(k)
    assert torch.equal(
        torch_ops.unpack_sketch(page[:, :, 0], page[:, :, 1:])
        .permute(0, 2, 3, 1, 4)
        .reshape(1, 64, 1, 64),
        hat,
    )


@pytest.mark.parametrize(
    "budget",
    [
        dict(sink_chunks=2, local_chunks=3, topk_chunks=4, topk_groups=6),
        dict(sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=12),
        dict(),
    ],
    ids=["small", "no-local", "default"],
)
@pytest.mark.parametrize("S", [1000, 2113])
def test_routing_from_pages_equals_reference(budget, S):
    cfg = HGAConfig(**budget, **SKETCH)
    Hq, Hkv, D = 4, 2, 64
    gen = torch.Generator().manual_seed(S)
    rope = RopeSpec.default(D, 1e5)
    k = rope.apply(torch.randn(S, Hkv, D, generator=gen) * 2, torch.arange(S)).float()
    q = (torch.randn(S, Hq, D, generator=gen) * 2).float()
    n = S // 64
    pages = torch_ops.summarize_blocks(
        k[: n * 64].view(n, 64, Hkv, D), torch_ops.SummaryRotation(rope, cfg)
    )
    pos = torch.arange(S)
    fixed, ids, ok = routing.route(
        q, pos, pages[:, :, 0].unsqueeze(0), pages[:, :, 1:].transpose(1, 2).unsqueeze(0), cfg
    )
    got = routing.token_mask(pos, fixed, ids, ok, S, cfg).transpose(0, 1)
    want = ref.visible_mask(q.double(), 0, S, ref.summarize(k.double(), 0, rope, cfg), cfg)
    # float32 scores here vs float64 in the reference: a near-tie may flip for a rare
    # (query, head); the budget is the same everywhere
    differ = (got != want).any(-1).float().mean()
    assert differ < 2e-3, differ
    assert torch.equal(got.sum(-1), want.sum(-1))


def test_sketch_routes_differently_from_mean_std_at_equal_budget():
    S, Hq, Hkv, D = 1500, 4, 2, 64
    gen = torch.Generator().manual_seed(3)
    rope = RopeSpec.default(D, 1e5)
    k = rope.apply(torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64), torch.arange(S))
    q = torch.randn(S, Hq, D, generator=gen, dtype=torch.float64)
    small = dict(sink_chunks=1, local_chunks=2, topk_chunks=5, topk_groups=10)
    masks = {}
    for score in ("mean_std", "sketch"):
        cfg = HGAConfig(group_score=score, chunk_score="max_group", **small)
        masks[score] = ref.visible_mask(q, 0, S, ref.summarize(k, 0, rope, cfg), cfg)
    assert not torch.equal(masks["sketch"], masks["mean_std"])
    assert torch.equal(masks["sketch"].sum(-1), masks["mean_std"].sum(-1))


def test_sketch_finds_the_one_matching_key():
    """A group holding one key aligned with q (the rest opposed) has a low mean but the
    sketch score opens it: the case the mean dilutes 16-fold."""
    D, S = 64, 64 * 12
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(S, 1, D, generator=gen) * 0.3
    q = torch.zeros(1, 1, D)
    q[0, 0, :8] = 3.0
    k[64 * 5 + 16 : 64 * 5 + 32, 0, :8] = -1.0  # group 21: 15 opposed keys ...
    k[64 * 5 + 20, 0, :8] = 2.5  # ... and one that matches q strongly
    cfg = HGAConfig(
        sink_chunks=1, local_chunks=1, topk_chunks=1, topk_groups=2, groups_per_query=1, **SKETCH
    )
    rope = RopeSpec.default(D, 1e5)  # summaries only; keys used as given
    summ = ref.summarize(k.double(), 0, rope, cfg)
    mask = ref.visible_mask(q.double(), S - 1, S, summ, cfg)
    assert mask[0, 0, 64 * 5 + 20]  # its group is the one routed group
    mean_cfg = HGAConfig(
        sink_chunks=1,
        local_chunks=1,
        topk_chunks=1,
        topk_groups=2,
        groups_per_query=1,
        group_score="mean_std",
        chunk_score="max_group",
        score_alpha=0.0,
    )
    summ = ref.summarize(k.double(), 0, rope, mean_cfg)
    assert not ref.visible_mask(q.double(), S - 1, S, summ, mean_cfg)[0, 0, 64 * 5 + 20]


@pytest.mark.parametrize("lengths", [[27, 61, 113], [482, 3330]])
def test_layer_with_sketch_matches_reference(lengths):
    cfg = HGAConfig(sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8, **SKETCH)
    run = PagedRun(lengths, cfg, 6, 2, seed=len(lengths))
    got = run_requests(run, lengths, prefill_chunk=300, decode_tail=6)
    for r in range(len(lengths)):
        want, _ = ref.hga_attention(
            run.q[r].double(), run.k[r].double(), run.v[r].double(), 0, run.rope, cfg
        )
        err = (got[r].double() - want).abs().amax(-1)
        assert (err > 1e-4).float().mean() < 2e-3, lengths[r]
        assert torch.median(err) < 1e-5


def test_sketch_needs_max_group():
    with pytest.raises(HGAConfigError, match="max_group"):
        HGAConfig(group_score="sketch", chunk_score="summary")
