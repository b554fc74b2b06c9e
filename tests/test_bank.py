"""The device bank (vllm_hga/bank.py) on the CPU path: same outputs with it large, small
(forcing evictions) or off, never stale data after a block is rewritten, hit counting.

Driven through the layer harness (paged shuffled blocks, NaN-poisoned pool), float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from layer_harness import PagedRun

from vllm_hga import reference as ref
from vllm_hga.config import CHUNK_SIZE, HGAConfig
from vllm_hga.metrics import WorkerMetrics, bank_hit_rate

SPARSE = HGAConfig(sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8)
MEAN_STD = HGAConfig(sink_chunks=1, local_chunks=2, topk_chunks=4, topk_groups=8,
                     chunk_score="max_group", group_score="mean_std")


def with_bank(cfg: HGAConfig, chunks: int) -> HGAConfig:
    return dataclasses.replace(cfg, bank_chunks=chunks)


def check_bank_consistent(run: PagedRun) -> int:
    """Every resident slot holds exactly its block's pool data; tables agree both ways.
    Returns the number of resident blocks."""
    bank = run.layer.bank
    if bank is None:
        return 0
    held = (bank.block_of_slot[: bank.capacity] >= 0).nonzero()[:, 0]
    for slot in held.tolist():
        blk = int(bank.block_of_slot[slot])
        assert int(bank.slot_of_block[blk]) == slot
        assert torch.equal(bank.data[slot], run.pool[blk]), f"slot {slot} stale for block {blk}"
    resident = (bank.slot_of_block[: bank.num_blocks] >= 0).nonzero()[:, 0]
    assert resident.numel() == held.numel()
    return held.numel()


def run_mixed(run: PagedRun, lengths, prefill_chunk: int, decode_tail: int):
    """Staggered: each request prefills in chunks, then decodes token by token, while the
    others are still prefilling (mixed prefill/decode batches)."""
    outs = {r: [] for r in range(len(lengths))}
    target = {r: max(L - decode_tail, 1) for r, L in enumerate(lengths)}
    step = 0
    while any(run.done[r] < L for r, L in enumerate(lengths)):
        sched = {}
        for r, L in enumerate(lengths):
            if run.done[r] >= L or step < 2 * r:  # later requests arrive later
                continue
            left = target[r] - run.done[r]
            sched[r] = min(prefill_chunk, left) if left > 0 else 1
        step += 1
        if not sched:
            continue
        for r, o in run.step(sched).items():
            outs[r].append(o)
        check_bank_consistent(run)
    return {r: torch.cat(o) for r, o in outs.items()}


@pytest.mark.parametrize("cfg", [SPARSE, MEAN_STD], ids=["sparse", "mean_std"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa3", "mha"])
def test_outputs_identical_with_bank_large_small_off(cfg, heads):
    lengths = [130, 777, 1501]
    outs, totals = [], []
    for chunks in (0, 3, 1000):  # off, smaller than one step's needs, everything fits
        run = PagedRun(lengths, with_bank(cfg, chunks), *heads, dtype=torch.float64, seed=3)
        run.summ = run.summ.double()
        run.layer.metrics = WorkerMetrics()
        outs.append(run_mixed(run, lengths, prefill_chunk=300, decode_tail=70))
        totals.append(run.layer.metrics.totals())
    for r, S in enumerate(lengths):
        assert torch.equal(outs[0][r], outs[1][r]), (S, "small bank")
        assert torch.equal(outs[0][r], outs[2][r]), (S, "large bank")
        want, _ = ref.hga_attention(run.q[r], run.k[r], run.v[r], 0, run.rope, cfg)
        assert torch.allclose(outs[2][r], want, atol=1e-10), S
    off, small, large = totals
    assert off["bank_hits"] == off["bank_misses"] == 0  # no bank, nothing counted
    chunk_bytes = heads[1] * 2 * CHUNK_SIZE * 64 * 8
    # the small bank evicted (fetched more chunks than it holds) and still served hits
    assert small["bank_bytes_fetched"] > 3 * chunk_bytes and small["bank_hits"] > 0
    assert large["bank_hits"] > small["bank_hits"]
    # the large bank fetched every chunk once: misses are exactly the distinct chunks
    assert large["bank_bytes_fetched"] == large["bank_misses"] * chunk_bytes


def test_rewritten_block_never_serves_stale_bank_data():
    """Request 0 decodes (its chunks become resident), finishes; request 1 takes over its
    blocks with other data, as vLLM does after a free, and decodes."""
    S = 900
    cfg = with_bank(SPARSE, 64)
    run = PagedRun([S, S], cfg, 4, 2, dtype=torch.float64, seed=8)
    run.summ = run.summ.double()
    run.layer.metrics = WorkerMetrics()
    run.step({0: S - 20})
    for _ in range(20):
        run.step({0: 1})
    assert check_bank_consistent(run) > 5  # request 0's chunks are resident
    old_bank = run.layer.bank.data.clone()
    run.block_table[1] = run.block_table[0]
    gen = torch.Generator().manual_seed(99)
    run.k[1] = run.rope.apply(torch.randn(S, 2, 64, generator=gen, dtype=torch.float64),
                              torch.arange(S))
    run.v[1] = torch.randn(S, 2, 64, generator=gen, dtype=torch.float64)
    before = run.layer.metrics.totals()
    parts = [run.step({1: n})[1] for n in (300, S - 300 - 30)]
    check_bank_consistent(run)
    parts += [run.step({1: 1})[1] for _ in range(30)]
    check_bank_consistent(run)
    after = run.layer.metrics.totals()
    want, _ = ref.hga_attention(run.q[1], run.k[1], run.v[1], 0, run.rope, cfg)
    assert torch.allclose(torch.cat(parts), want, atol=1e-10)
    assert after["bank_hits"] > before["bank_hits"]  # request 1 did read from the bank
    assert not torch.equal(old_bank, run.layer.bank.data)  # and its data was replaced


def test_hit_rate_is_one_when_everything_fits_after_warm_up():
    S = 2000
    run = PagedRun([S], with_bank(HGAConfig(), 1000), 8, 2, seed=1)
    run.layer.metrics = WorkerMetrics()
    run.step({0: 1985})
    run.step({0: 1})  # warm-up: the first decode step admits its chunks
    warm = run.layer.metrics.totals()
    assert warm["bank_misses"] > 0 and warm["bank_hits"] == 0
    for _ in range(10):  # positions 1986..1995: same own chunk, no chunk closes
        run.step({0: 1})
    t = run.layer.metrics.totals()
    d = {k: t[k] - warm[k] for k in t}
    assert d["bank_misses"] == 0 and d["bank_hits"] > 0
    assert bank_hit_rate(d) == 1.0
    assert d["bank_bytes_fetched"] == 0


def test_small_bank_hit_rate_between_zero_and_one():
    S = 3000
    run = PagedRun([S], with_bank(HGAConfig(), 12), 8, 2, seed=2)
    run.layer.metrics = WorkerMetrics()
    run.step({0: S - 40})
    for _ in range(40):
        run.step({0: 1})
    rate = bank_hit_rate(run.layer.metrics.totals())
    assert 0.0 < rate < 1.0, rate
    assert check_bank_consistent(run) == 12  # full, and consistent


def test_bank_chunks_config():
    assert HGAConfig().bank_size("cuda") == 0 and HGAConfig().bank_size("cpu") == 0
    assert HGAConfig(bank_chunks=0).bank_size("cuda") == 0
    assert HGAConfig(bank_chunks=7).bank_size("cpu") == 7
    from vllm_hga.config import HGAConfigError

    with pytest.raises(HGAConfigError, match="bank_chunks"):
        HGAConfig(bank_chunks=-1)
