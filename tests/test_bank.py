"""The device bank (vllm_hga/bank.py) on the CPU path: same outputs with it large, small
(forcing evictions) or off, never stale data after a block is rewritten, hit counting.

Driven through the layer harness (paged shuffled blocks, NaN-poisoned pool), float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from layer_harness import PagedRun

from devkit import reference as ref
from vllm_hga.config import CHUNK_SIZE, HGAConfig
from vllm_hga.metrics import WorkerMetrics, bank_hit_rate

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
        # the open own chunk is banked too: its unwritten tail is the pool's NaN poison
        torch.testing.assert_close(
            bank.data[slot],
            run.pool[blk],
            rtol=0,
            atol=0,
            equal_nan=True,
            msg=f"slot {slot} stale for block {blk}",
        )
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
    run.k[1] = run.rope.apply(
        torch.randn(S, 2, 64, generator=gen, dtype=torch.float64), torch.arange(S)
    )
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
    assert HGAConfig().bank_auto("cuda")  # on by default on CUDA, sized from free memory
    assert HGAConfig().bank_size("cpu") == 0
    assert HGAConfig(bank_chunks=0).bank_size("cuda") == 0
    assert HGAConfig(bank_chunks=7).bank_size("cpu") == 7
    from vllm_hga.config import HGAConfigError

    with pytest.raises(HGAConfigError, match="bank_chunks"):
        HGAConfig(bank_chunks=-1)


def test_capacity_limit():
    from vllm_hga.bank import DeviceBank
    from vllm_hga.config import BANK_MAX_CHUNKS, HGAConfigError

    assert HGAConfig(bank_chunks=BANK_MAX_CHUNKS).bank_size("cuda") == BANK_MAX_CHUNKS
    with pytest.raises(HGAConfigError, match="bank_chunks"):
        HGAConfig(bank_chunks=BANK_MAX_CHUNKS + 1)
    with pytest.raises(ValueError, match="lower bank_chunks"):
        DeviceBank(BANK_MAX_CHUNKS + 1, 1, 8, torch.float32, "cpu")


# ----------------------------------------------------------------------------- kernel model
class KernelModel:
    """csrc/bank.cu's admission in plain Python, phase by phase: hits found and encoded at
    mark time, misses in block order, victims from [empty slots by index] ++ [kept slots
    in the previous LRU order] (no sort), new order = rest ++ touched slots by index,
    order double-buffered by step parity.  Checked against the torch reference below."""

    PENDING = object()

    def __init__(self, cap: int, nb: int, h2m: int):
        self.cap, self.nb, self.h2m = cap, nb, h2m
        self.sob, self.bos, self.lu = [-1] * nb, [-1] * cap, [-1] * cap
        self.order = [list(range(cap)), list(range(cap))]
        self.step = 0
        self.fills: list[tuple[int, int]] = []

    def invalidate(self, slots) -> None:
        for t in slots:
            if t >= 0 and self.sob[t // CHUNK_SIZE] >= 0:
                s = self.sob[t // CHUNK_SIZE]
                self.sob[t // CHUNK_SIZE] = self.bos[s] = self.lu[s] = -1

    def admit(self, rows: torch.Tensor, token_ok: torch.Tensor, own) -> torch.Tensor:
        cap, h2m, step = self.cap, self.h2m, self.step + 1
        gt = rows.shape[-1]
        flat, ok = rows.flatten().tolist(), token_ok.any(-1).flatten().tolist()
        enc, misses = [], set()
        for i, (row, o) in enumerate(zip(flat, ok)):  # mark
            if own[0] <= i % gt < own[1] or not o:
                enc.append(row)
            elif self.sob[row // h2m] >= 0:
                s = self.sob[row // h2m]
                self.lu[s] = step
                enc.append(-(s * h2m + row % h2m) - 1)
            else:
                misses.add(row // h2m)
                enc.append(self.PENDING)
        empty = [s for s in range(cap) if self.lu[s] < 0]  # admit
        kept = [s for s in self.order[(step - 1) & 1] if 0 <= self.lu[s] < step]
        seq = empty + kept
        n_admit = min(len(misses), len(seq))
        self.fills = list(zip(sorted(misses)[:n_admit], seq[:n_admit]))
        for blk, s in self.fills:
            if self.bos[s] >= 0:
                self.sob[self.bos[s]] = -1
            self.bos[s], self.lu[s] = blk, step
        for blk, s in self.fills:
            self.sob[blk] = s
        self.order[step & 1] = seq[n_admit:] + [s for s in range(cap) if self.lu[s] == step]
        self.step = step
        for i, e in enumerate(enc):  # encode the pending columns
            if e is self.PENDING:
                row = flat[i]
                s = self.sob[row // h2m]
                enc[i] = -(s * h2m + row % h2m) - 1 if s >= 0 else row
        return torch.tensor(enc).view(rows.shape)


@pytest.mark.parametrize("cap", [3, 17, 60, 400])
def test_kernel_model_matches_torch_admission(cap):
    """The CUDA kernels' LRU-order bookkeeping gives the torch path's tables and rows, over
    decode steps with evictions, finished requests whose blocks are reused, invalidation."""
    from bank_lists import DecodeLists

    from vllm_hga.bank import DeviceBank

    nb, Hkv, D = 700, 2, 4
    lists = DecodeLists(
        nb,
        R=3,
        Hq=4,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=6,
        groups=8,
        lengths=(300, 5000),
        seed=cap,
        max_decode=50,
    )
    pool = torch.randn(nb, Hkv, 2, CHUNK_SIZE, D)
    bank = DeviceBank(cap, Hkv, D, torch.float32, "cpu")
    bank.bind(pool)
    model = KernelModel(cap, nb, lists.h2m)
    hits = admitted = dropped = 0
    for _ in range(120):
        rows, ok, slots = lists.step()
        dropped += sum(model.sob[t // CHUNK_SIZE] >= 0 for t in set(slots.tolist()) if t >= 0)
        bank.invalidate(slots)
        model.invalidate(slots.tolist())
        enc = bank.admit(pool, rows, ok, lists.own_cols)
        want = model.admit(rows, ok, lists.own_cols)
        assert torch.equal(enc, want)
        assert bank.slot_of_block[:nb].tolist() == model.sob
        assert bank.block_of_slot[:cap].tolist() == model.bos
        assert bank.last_use[:cap].tolist() == model.lu
        order = torch.sort(bank.last_use[:cap], stable=True).indices.tolist()
        assert model.order[model.step & 1] == order
        for blk, s in model.fills:
            assert torch.equal(bank.data[s], pool[blk])
        hits += int(bank.meta[5])
        admitted += len(model.fills)
    assert bank.step == model.step == 120
    assert hits > 0 and admitted == bank.stats()["bank_bytes_fetched"] // bank.chunk_bytes
    assert admitted > cap or cap == 400  # the small banks filled up and evicted
    assert dropped > 0 or cap == 3  # reused blocks left the bank
