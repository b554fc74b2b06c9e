"""Decode layouts of a step's plan (vllm_hga/plan.py) against each other and the reference.

The fixed layout is what a full decode CUDA graph replays: positions and closing blocks
in persistent buffers, widths from max_model_len, padded requests.  On the CPU it runs
the same HGALayer code as on the GPU minus the capture, so here it must give exactly
(float64) the outputs, summaries and metrics of the variable layout.  Capture and replay
themselves are tested on the GPU (tests/gpu/test_graphs.py).
"""

from __future__ import annotations

import pytest
import torch
from layer_harness import PagedRun

from devkit import reference as ref
from vllm_hga.config import CHUNK_SIZE, HGAConfig
from vllm_hga.metrics import WorkerMetrics, density
from vllm_hga.plan import DecodeBuffers, HGAMetadata

# float64 pages (exact comparisons) hold mean / mean_std summaries; sketch pages are
# float32 bit fields (tests/test_sketch.py covers them)
SPARSE = HGAConfig(
    sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8, group_score="mean_std"
)
MEAN_STD = HGAConfig(
    sink_chunks=1,
    local_chunks=2,
    topk_chunks=4,
    topk_groups=8,
    chunk_score="max_group",
    group_score="mean_std",
)
NO_LOCAL = HGAConfig(
    sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=6, group_score="mean_std"
)
LENGTHS = [70, 455, 900]  # decode tails cross chunk ends (positions 63 mod 64 close chunks)


def staggered(run: PagedRun, lengths, prefill_chunk=200, tail=70, pad_reqs=0):
    """Request r starts at step 2r and prefills in chunks, then decodes its last `tail`
    tokens one by one: mixed batches first, then all-decode steps (padded by pad_reqs)."""
    outs = {r: [] for r in range(len(lengths))}
    target = {r: max(L - tail, 1) for r, L in enumerate(lengths)}
    step, plans = 0, []
    while any(run.done[r] < L for r, L in enumerate(lengths)):
        sched = {
            r: min(prefill_chunk, target[r] - run.done[r]) if run.done[r] < target[r] else 1
            for r, L in enumerate(lengths)
            if run.done[r] < L and step >= 2 * r
        }
        step += 1
        if not sched:
            continue
        pad = pad_reqs if max(sched.values()) == 1 else 0  # vLLM pads only graph batches
        for r, o in run.step(sched, pad_reqs=pad).items():
            outs[r].append(o)
        plans.append((run.last_md, run.last_pad))
    return {r: torch.cat(o) for r, o in outs.items()}, plans


def float64_run(cfg, lengths=LENGTHS, **kw) -> PagedRun:
    run = PagedRun(lengths, cfg, 6, 2, dtype=torch.float64, seed=7, **kw)
    run.summ = run.summ.double()  # float64 pages: no near-tie can flip a top-k pick
    run.layer.metrics = WorkerMetrics()
    return run


@pytest.mark.parametrize(
    "cfg", [SPARSE, MEAN_STD, NO_LOCAL], ids=["sparse", "mean_std", "no-local"]
)
def test_fixed_layout_equals_variable_layout_exactly(cfg):
    var = float64_run(cfg)
    want, _ = staggered(var, LENGTHS)
    fix = float64_run(cfg, graph_buffers=True)
    got, plans = staggered(fix, LENGTHS, pad_reqs=3)
    fixed = [(md, pad) for md, pad in plans if md.fixed]
    assert len(fixed) >= 60 and any(md.num_closing for md, _ in fixed)  # chunks closed
    assert all(md.num_decodes == len(md.q_lens) for md, _ in fixed)  # padding included
    assert any(
        md.decode_chunks > 1 + int(md.decode_pos.max()) // CHUNK_SIZE for md, _ in fixed
    )  # wider than the batch needs: max_model_len's width
    for _md, pad in fixed:  # padded rows: no key visible, output exactly 0
        assert pad.shape[0] == 3 and torch.equal(pad, torch.zeros_like(pad))
    for r in range(len(LENGTHS)):
        assert torch.equal(got[r], want[r]), r
        mine, _ = ref.hga_attention(fix.q[r], fix.k[r], fix.v[r], 0, fix.rope, cfg)
        assert torch.allclose(got[r], mine, atol=1e-10)
    written = ~torch.isnan(var.summ)
    assert torch.equal(written, ~torch.isnan(fix.summ))  # same chunks summarised
    assert torch.equal(var.summ[written], fix.summ[written])
    assert var.layer.metrics.totals() == fix.layer.metrics.totals()


def test_decodes_first_order_reads_rows_in_place():
    """vLLM's order under reorder_batch_threshold = 1 (decodes first) takes the slice path
    in mixed batches; the sorted order here takes the gather path; same outputs."""
    lengths = LENGTHS[::-1]  # the short request decodes while the long ones prefill
    a, b = float64_run(SPARSE, lengths), float64_run(SPARSE, lengths, decodes_first=True)
    want, plans_a = staggered(a, lengths)
    got, plans_b = staggered(b, lengths)
    mixed = [md for md, _ in plans_b if md.prefill_reqs and md.num_decodes]
    assert mixed and all(md.decode_prefix and md.decode_rows is None for md in mixed)
    assert any(not md.decode_prefix for md, _ in plans_a if md.num_decodes)
    for r in range(len(lengths)):
        assert torch.equal(got[r], want[r])


def test_metrics_of_padded_fixed_steps_count_density_like_the_reference():
    """Decode metrics come from positions and the config on the host (plan.count_step);
    padded requests count nothing."""
    S = 1500
    run = PagedRun([S], SPARSE, 4, 2, dtype=torch.float64, seed=3, graph_buffers=True)
    run.summ = run.summ.double()
    run.layer.metrics = WorkerMetrics()
    run.step({0: 1000})
    while run.done[0] < S:
        run.step({0: 1}, pad_reqs=2)
        assert run.last_md.fixed
    totals = run.layer.metrics.totals()
    _, mask = ref.hga_attention(run.q[0], run.k[0], run.v[0], 0, run.rope, SPARSE)
    assert density(totals) == pytest.approx(ref.density(mask, 0), rel=1e-12)
    assert totals["query_tokens"] == S
    assert totals["summary_bytes_written"] == (S // 64) * 2 * 5 * 64 * 4
    keys = mask.sum().item()
    assert totals["keys_attended"] == keys  # exact, not only the ratio


def test_fixed_plan_reuses_its_buffers_and_marks_padding():
    """Every fixed plan of one batch size hands the layers the same tensors (what a
    captured graph reads) with this step's values written in place."""
    buffers = DecodeBuffers.allocate(8, 64 * 10, "cpu")
    bt = torch.arange(1, 1 + 4 * 10, dtype=torch.int32).view(4, 10)
    bt[3] = 0  # a padded request: vLLM's null block row
    slots = torch.full((4,), -1)
    seq_a, seq_b = [64, 5, 200, 0], [65, 128, 1, 0]
    md_a = HGAMetadata.plan([0, 1, 2, 3, 3], seq_a, bt, slots, 4, buffers=buffers)
    pos_a, closing_a = md_a.decode_pos.clone(), md_a.closing_blocks.clone()
    md_b = HGAMetadata.plan([0, 1, 2, 3, 3], seq_b, bt, slots, 4, buffers=buffers)
    assert md_a.decode_pos.data_ptr() == md_b.decode_pos.data_ptr()
    assert md_a.closing_blocks.data_ptr() == md_b.closing_blocks.data_ptr()
    assert md_a.decode_chunks == md_b.decode_chunks == 10
    assert pos_a.tolist() == [63, 4, 199, -1] and md_b.decode_pos.tolist() == [64, 127, 0, -1]
    assert closing_a.tolist() == [int(bt[0, 0]), -1, -1, -1]
    assert md_b.closing_blocks.tolist() == [-1, int(bt[1, 1]), -1, -1]
    assert (md_a.num_closing, md_b.num_closing) == (1, 1)
    assert md_b.decode_pairs == [(0, 0), (1, 1), (2, 2)]  # the padded request is no decode
    # a mixed batch keeps the variable layout even with buffers
    md_c = HGAMetadata.plan([0, 1, 5], [65, 4], bt[:2], torch.full((5,), -1), 5, buffers=buffers)
    assert not md_c.fixed and md_c.prefill_reqs == [1] and md_c.decode_prefix


def test_cuda_graph_support_follows_the_knob():
    vllm = pytest.importorskip("vllm")  # noqa: F841
    from test_config import engine_config
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_hga.backend import HGAMetadataBuilder, cuda_graph_blockers
    from vllm_hga.ops import cuda_ops

    bf16 = torch.bfloat16

    def cuda(**kw):  # the config an engine resolves (the same on every device)
        return HGAConfig.from_mapping(kw)

    assert cuda().group_score == "sketch"
    assert cuda_graph_blockers(cuda(), 128, bf16, built=True) == []  # sketch kernels
    assert cuda_graph_blockers(cuda(group_score="mean_std"), 128, bf16, True) == []
    assert cuda_graph_blockers(cuda(cuda_graphs=False), 128, bf16, True) == ["cuda_graphs is off"]
    assert cuda_graph_blockers(cuda(bank_chunks=64), 128, bf16, True) == []  # graph-safe
    assert len(cuda_graph_blockers(cuda(dense_layers=(0,)), 128, bf16, True)) == 1
    assert cuda_graph_blockers(cuda(), 96, bf16, True)  # no kernels for D = 96
    spec = FullAttentionSpec(block_size=64, num_kv_heads=3, head_size=64, dtype=bf16)
    for on in (True, False):
        config = engine_config(additional_config={"hga": {"cuda_graphs": on}})
        support = HGAMetadataBuilder.get_cudagraph_support(config, spec)
        kernels = cuda_ops.available()  # False on a CPU install: never graphs
        want = (
            AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
            if on and kernels
            else AttentionCGSupport.NEVER
        )
        assert support == want
