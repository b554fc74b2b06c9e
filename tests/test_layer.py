"""The backend's layer (paged host pool + summary pages + planned steps) against the reference."""

from __future__ import annotations

import pytest
import torch
from layer_harness import PagedRun, run_requests

from devkit import reference as ref
from vllm_hga.config import HGAConfig

FULL = HGAConfig.from_mapping({"preset": "full"})
# float64 pages (exact comparisons) hold mean / mean_std summaries; sketch pages are
# float32 bit fields (tests/test_sketch.py covers them)
SPARSE = HGAConfig(
    sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8, group_score="mean_std"
)


def dense(run: PagedRun, r: int) -> torch.Tensor:
    S = run.q[r].shape[0]
    mask = ref.dense_causal_mask(run.H, 0, S, S)
    return ref.masked_attention(
        run.q[r].double(), run.k[r].double(), run.v[r].double(), mask, run.D**-0.5
    )


@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
def test_full_coverage_equals_dense_mixed_batches(heads):
    lengths = [1, 63, 64, 65, 127, 1000, 4097]
    run = PagedRun(lengths, FULL, *heads, seed=sum(heads))
    got = run_requests(run, lengths, prefill_chunk=700, decode_tail=4)
    for r, S in enumerate(lengths):
        want = dense(run, r)
        rel = (got[r].double() - want).abs().max() / want.abs().max()
        assert rel <= 1e-5, (S, rel.item())


@pytest.mark.parametrize(
    "cfg",
    [
        SPARSE,
        HGAConfig(
            sink_chunks=0,
            local_chunks=4,
            topk_chunks=3,
            topk_groups=6,  # no sinks
            group_score="mean_std",
        ),
        HGAConfig(
            sink_chunks=1,
            local_chunks=0,
            topk_chunks=3,
            topk_groups=6,  # forced prev
            group_score="mean_std",
        ),
        HGAConfig(
            sink_chunks=2,
            local_chunks=3,
            topk_chunks=5,
            topk_groups=8,
            chunk_score="max_group",
            group_score="mean",
        ),
        HGAConfig(
            sink_chunks=2,
            local_chunks=3,
            topk_chunks=5,
            topk_groups=8,
            chunk_score="summary",
            group_score="mean",
        ),
    ],
    ids=["sparse", "no-sink", "no-local", "max-group", "paper-scoring"],
)
@pytest.mark.parametrize("lengths", [[27, 61, 113], [482, 3330]])
def test_sparse_layer_equals_reference_exactly_in_float64(lengths, cfg):
    run = PagedRun(lengths, cfg, 6, 2, dtype=torch.float64, seed=len(lengths))
    run.summ = run.summ.double()  # float64 pages: no near-tie can flip a top-k pick
    got = run_requests(run, lengths, prefill_chunk=300, decode_tail=6)
    for r in range(len(lengths)):
        want, mask = ref.hga_attention(run.q[r], run.k[r], run.v[r], 0, run.rope, cfg)
        assert torch.allclose(got[r], want, atol=1e-10), lengths[r]


def test_sparse_layer_float32_matches_reference():
    lengths = [2100]
    run = PagedRun(lengths, HGAConfig(), 6, 2, seed=5)
    got = run_requests(run, lengths, prefill_chunk=1024, decode_tail=8)[0].double()
    want, mask = ref.hga_attention(
        run.q[0].double(), run.k[0].double(), run.v[0].double(), 0, run.rope, HGAConfig()
    )
    err = (got - want).abs().amax(-1)  # [T, H]
    # float32 summaries may flip a near-tie between two candidates for a rare (query, head)
    assert (err > 1e-4).float().mean() < 1e-3
    assert torch.median(err) < 1e-5
    assert ref.density(mask, 0) < 0.8  # routing is active over most of the request


def test_prefill_chunking_and_decode_give_identical_outputs():
    """Per-query routing makes a token's output independent of how the prompt was split."""
    S = 1300
    outs = []
    for chunk, tail in [(S, 0), (256, 0), (100, 200)]:
        run = PagedRun([S], SPARSE, 4, 2, dtype=torch.float64, seed=11)
        run.summ = run.summ.double()
        outs.append(run_requests(run, [S], prefill_chunk=chunk, decode_tail=tail)[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    assert torch.allclose(outs[0], outs[2], atol=1e-12)


def test_dense_fallback_when_context_fits_the_budget():
    # pool chunks (c - F - L) x 4 groups <= groups_per_query: routing keeps everything
    cfg = HGAConfig(
        sink_chunks=1, local_chunks=2, topk_chunks=4, topk_groups=16, groups_per_query=16
    )
    S = (1 + 2 + 4) * 64 + 63  # the last query's pool holds exactly 4 chunks = 16 groups
    run = PagedRun([S], cfg, 4, 2, seed=2)
    got = run_requests(run, [S], prefill_chunk=200, decode_tail=3)[0]
    want = dense(run, 0)
    assert (got.double() - want).abs().max() / want.abs().max() <= 1e-5


def test_dense_layers_stay_dense():
    S = 2000
    run = PagedRun([S], SPARSE, 4, 2, seed=4)
    run.layer.dense = True
    got = run_requests(run, [S], prefill_chunk=512, decode_tail=3)[0]
    want = dense(run, 0)
    assert (got.double() - want).abs().max() / want.abs().max() <= 1e-5


def test_reused_blocks_never_leak_old_keys():
    """A block freed by one request and reused by another is rewritten before it is read."""
    S = 700
    run = PagedRun([S, S], SPARSE, 4, 2, dtype=torch.float64, seed=8)
    run.summ = run.summ.double()
    first = run_requests(run, [S, S], prefill_chunk=S, decode_tail=0)
    # request 1 takes over request 0's blocks with fresh data, as vLLM does after a free
    run.block_table[1] = run.block_table[0]
    run.done[1] = 0
    gen = torch.Generator().manual_seed(99)
    run.k[1] = run.rope.apply(
        torch.randn(S, 2, 64, generator=gen, dtype=torch.float64), torch.arange(S)
    )
    run.v[1] = torch.randn(S, 2, 64, generator=gen, dtype=torch.float64)
    parts = [run.step({1: n})[1] for n in (256, 256, S - 512 - 2, 1, 1)]
    second = torch.cat(parts)
    want, _ = ref.hga_attention(run.q[1], run.k[1], run.v[1], 0, run.rope, SPARSE)
    assert torch.allclose(second, want, atol=1e-10)
    assert not torch.allclose(first[1], second, atol=1e-3)


def test_a_decode_step_calls_the_ops_straight_from_forward():
    """Backend -> HGALayer.forward -> ops method -> kernel: every op of a decode step is
    called by forward itself, so CudaOps' kernels launch at most three package frames
    below the backend (CudaOps methods launch their kernel directly)."""
    import sys

    from vllm_hga.ops import TorchOps

    callers: dict[str, set[str]] = {}

    class Recording(TorchOps):
        def __getattribute__(self, name):
            attr = super().__getattribute__(name)
            if name in ("write_kv", "summarize_pool", "decode_groups", "attend_groups"):
                code = sys._getframe(1).f_code  # whoever looks the method up calls it
                callers.setdefault(name, set()).add(
                    f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
                )
            return attr

    run = PagedRun(
        [700], HGAConfig(sink_chunks=1, local_chunks=2, topk_chunks=2, topk_groups=8), 4, 2
    )
    run.step({0: 639})
    run.layer.ops = Recording()
    run.step({0: 1})  # token 639 closes chunk 9: summarize_pool runs too
    assert run.last_md.num_decodes == 1
    assert set(callers) == {"write_kv", "summarize_pool", "decode_groups", "attend_groups"}
    assert all(c == {"attention.py:forward"} for c in callers.values()), callers
