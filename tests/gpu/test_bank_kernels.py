"""The fused CUDA bank admission (csrc/bank.cu through DeviceBank) against the torch
admission (DeviceBank with kernels = False, the reference) on the same inputs.

Decode lists from tests/gpu/bank_lists.py (sinks, local window, causal own chunk, routed
groups drifting step to step, invalid padding; requests finish and their blocks are reused,
so invalidation drops resident blocks).  After every step: the three tables, step counter
and counters equal, the encoded rows equal, every resident slot holds its pool block, the
kernels' LRU order equals the stable sort of last_use.  Also: one launch per invalidate,
at most three per admission, no host sync, CUDA-graph capture and replay, metrics.

No vLLM import (the device's native env lacks it).  Run on the device machine:
    python3 -m pytest tests/gpu/test_bank_kernels.py -m gpu -q -s --confcutdir=tests/gpu
"""

from __future__ import annotations

import pytest
import torch
from bank_lists import DecodeLists, assert_same, run_steps

from vllm_hga.bank import DeviceBank
from vllm_hga.config import BANK_MAX_CHUNKS, CHUNK_SIZE
from vllm_hga.metrics import WorkerMetrics
from vllm_hga.ops import cuda_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def make_pool(nb: int, Hkv: int, D: int, dtype, uva: bool, seed: int = 0):
    """(host copy, pool the kernels read): device memory or the UVA view of pinned memory."""
    g = torch.Generator().manual_seed(seed)
    host = torch.randn(nb, Hkv, 2, CHUNK_SIZE, D, generator=g).to(dtype)
    if uva:
        host = host.pin_memory()
        return host, cuda_ops.uva_view(host)
    return host, host.to(DEV)


def bank_pair(cap: int, Hkv: int, D: int, dtype, pool) -> tuple[DeviceBank, DeviceBank]:
    ref = DeviceBank(cap, Hkv, D, dtype, DEV)
    ref.kernels = False
    fused = DeviceBank(cap, Hkv, D, dtype, DEV)
    assert fused._use_kernels(), "extension lacks bank_admit (rebuild vllm_hga._C)"
    ref.bind(pool)
    fused.bind(pool)
    return ref, fused


@pytest.mark.parametrize("cap", [3, 40, 1024])
@pytest.mark.parametrize("heads", [(8, 2), (32, 4)], ids=["gqa4", "gqa8"])
@pytest.mark.parametrize("uva", [False, True], ids=["device", "uva"])
def test_fused_admission_matches_torch(cap, heads, uva):
    Hq, Hkv = heads
    nb, D, dtype = 3000, 64, torch.bfloat16
    host, pool = make_pool(nb, Hkv, D, dtype, uva, seed=cap)
    lists = DecodeLists(
        nb,
        R=5,
        Hq=Hq,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=8,
        groups=12,
        lengths=(200, 5000),
        seed=cap + Hq,
        device=DEV,
        max_decode=60,
    )
    ref, fused = bank_pair(cap, Hkv, D, dtype, pool)
    s = run_steps(lists, ref, fused, pool, host, steps=80)
    assert s["hits"] > 0 and s["misses"] > 0
    if cap < 1000:
        assert s["admitted"] > cap  # filled up and evicted
    if cap >= 40:
        assert s["dropped"] > 0  # reused blocks left the bank


@pytest.mark.parametrize("cap", [512, 8192])
def test_fused_admission_large_shapes(cap):
    """Serving-sized lists (R=48, Hq=32, ~60 columns) over a pool of 1.2M blocks (more than
    one tile of the miss summary bitmap), an expanded pool (tables only; copies fall back)."""
    nb, Hkv, D = 1_200_000, 4, 128
    one = torch.randn(1, Hkv, 2, CHUNK_SIZE, D, device=DEV).to(torch.bfloat16)
    pool = one.expand(nb, -1, -1, -1, -1)
    lists = DecodeLists(
        nb,
        R=48,
        Hq=32,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=22,
        groups=44,
        lengths=(2000, 40000),
        seed=cap,
        device=DEV,
        max_decode=400,
    )
    ref, fused = bank_pair(cap, Hkv, D, torch.bfloat16, pool)
    s = run_steps(lists, ref, fused, pool, None, steps=12)
    assert s["misses"] > 0 and s["hits"] > 0
    held = (fused.block_of_slot[:cap] >= 0).nonzero()[:, 0]
    assert torch.equal(fused.data[held], one.expand(held.numel(), -1, -1, -1, -1))


def test_fused_admission_max_capacity():
    cap, nb, Hkv, D = BANK_MAX_CHUNKS, 40_000, 1, 8
    host, pool = make_pool(nb, Hkv, D, torch.float16, uva=False)
    lists = DecodeLists(
        nb,
        R=24,
        Hq=4,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=30,
        groups=60,
        lengths=(3000, 60000),
        seed=5,
        device=DEV,
        max_decode=30,
    )
    ref, fused = bank_pair(cap, Hkv, D, torch.float16, pool)
    run_steps(lists, ref, fused, pool, host, steps=30)
    with pytest.raises(ValueError, match="bank_chunks"):
        DeviceBank(cap + 1, Hkv, D, torch.float16, DEV)


def test_invalidate_matches_torch():
    nb, Hkv, D, cap = 500, 2, 64, 64
    host, pool = make_pool(nb, Hkv, D, torch.float32, uva=False)
    lists = DecodeLists(nb, R=4, Hq=4, Hkv=Hkv, lengths=(300, 2000), seed=3, device=DEV)
    ref, fused = bank_pair(cap, Hkv, D, torch.float32, pool)
    run_steps(lists, ref, fused, pool, host, steps=10)
    resident = fused.block_of_slot[:cap][fused.block_of_slot[:cap] >= 0]
    assert resident.numel() > 10
    g = torch.Generator(device=DEV).manual_seed(0)
    for dtype in (torch.int64, torch.int32):
        pick = resident[torch.randperm(resident.numel(), generator=g, device=DEV)[:5]]
        slots = torch.cat(
            [
                pick * CHUNK_SIZE + 7,
                pick * CHUNK_SIZE + 63,  # duplicates
                torch.tensor([-1, -1, 3 * CHUNK_SIZE], device=DEV),
            ]
        )
        ref.invalidate(slots)
        fused.invalidate(slots.to(dtype))
        assert_same(ref, fused, host, order=False)
        assert bool((fused.slot_of_block[pick] == -1).all())
    rows, ok, _ = lists.step()  # admission after invalidation still agrees
    assert torch.equal(
        ref.admit(pool, rows, ok, lists.own_cols), fused.admit(pool, rows, ok, lists.own_cols)
    )
    assert_same(ref, fused, host)


def _kernels_in(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_launches_no_sync_and_metrics():
    """Admission is 3 kernels (with WorkerMetrics fed inside the kernel), invalidate 1; no
    host sync; metrics totals equal the torch path's per-step adds."""
    nb, Hkv, D, cap = 4000, 4, 128, 256
    host, pool = make_pool(nb, Hkv, D, torch.bfloat16, uva=True)
    lists = DecodeLists(
        nb, R=8, Hq=32, Hkv=Hkv, lengths=(500, 6000), seed=7, device=DEV, max_decode=40
    )
    ref, fused = bank_pair(cap, Hkv, D, torch.bfloat16, pool)
    m_ref, m_fused = WorkerMetrics(), WorkerMetrics()
    for i in range(25):
        rows, ok, slots = lists.step()
        ref.invalidate(slots)
        ref_enc = ref.admit(pool, rows, ok, lists.own_cols, m_ref)
        torch.cuda.synchronize()
        if i == 5:
            inv = _kernels_in(lambda s=slots: fused.invalidate(s))
            adm = _kernels_in(lambda r=rows, o=ok: fused.admit(pool, r, o, lists.own_cols, m_fused))
            print(f"\ninvalidate kernels: {inv}\nadmit kernels: {adm}")
            assert len(inv) == 1 and len(adm) <= 3, (inv, adm)
            enc = None
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                fused.invalidate(slots)
                enc = fused.admit(pool, rows, ok, lists.own_cols, m_fused)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if enc is not None:
            assert torch.equal(enc, ref_enc)
        assert_same(ref, fused, host)
    t_ref, t_fused = m_ref.totals(), m_fused.totals()
    for name in ("bank_hits", "bank_misses", "bank_bytes_fetched"):
        assert t_ref[name] == t_fused[name] > 0, name
    assert fused.stats() == ref.stats()


def test_cuda_graph_replay_matches_eager():
    """invalidate + admit captured once, replayed with new lists (fixed shapes, slot
    mapping padded with -1): same tables, rows and metrics as the eager torch path."""
    nb, Hkv, D, cap, T = 3000, 2, 64, 48, 16384
    host, pool = make_pool(nb, Hkv, D, torch.bfloat16, uva=True)
    lists = DecodeLists(
        nb, R=6, Hq=8, Hkv=Hkv, lengths=(300, 3000), seed=11, device=DEV, max_decode=50
    )
    ref, fused = bank_pair(cap, Hkv, D, torch.bfloat16, pool)
    m_ref, m_fused = WorkerMetrics(), WorkerMetrics()

    def padded(slots):
        assert slots.numel() <= T
        out = torch.full((T,), -1, dtype=torch.long, device=DEV)
        out[: slots.numel()] = slots
        return out

    for _ in range(4):  # eager warm-up (also creates the metric accumulators)
        rows, ok, slots = lists.step()
        for bank, m in ((ref, m_ref), (fused, m_fused)):
            bank.invalidate(slots)
            bank.admit(pool, rows, ok, lists.own_cols, m)
    assert_same(ref, fused, host)
    static_rows, static_ok = rows.clone(), ok.clone()
    static_slots = padded(slots)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        fused.invalidate(static_slots)
        static_enc = fused.admit(pool, static_rows, static_ok, lists.own_cols, m_fused)
    torch.cuda.current_stream().wait_stream(side)
    assert_same(ref, fused, host)  # capture ran nothing
    for i in range(30):
        rows, ok, slots = lists.step()
        static_rows.copy_(rows)
        static_ok.copy_(ok)
        static_slots.copy_(padded(slots))
        graph.replay()
        ref.invalidate(slots)
        want = ref.admit(pool, rows, ok, lists.own_cols, m_ref)
        assert torch.equal(static_enc, want), f"replay {i}"
        assert_same(ref, fused, host)
    t_ref, t_fused = m_ref.totals(), m_fused.totals()
    for name in ("bank_hits", "bank_misses", "bank_bytes_fetched"):
        assert t_ref[name] == t_fused[name], name


@pytest.mark.parametrize("R", [1, 16, 64])
def test_admission_time(R):
    """Timing print (no assertion on speed): eager admission per layer and step, fused vs
    torch path, steady state (same lists every step: all hits) and drifting lists."""
    nb, Hq, Hkv, D = 60_000, 32, 4, 128
    _, pool = make_pool(nb, Hkv, D, torch.bfloat16, uva=True)
    lists = DecodeLists(
        nb,
        R=R,
        Hq=Hq,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=22,
        groups=44,
        lengths=(8000, 32000),
        seed=R,
        device=DEV,
        max_decode=1000,
    )
    steps = [lists.step()[:2] for _ in range(10)]
    for cap in (512, 4096):
        for kernels in (True, False):
            bank = DeviceBank(cap, Hkv, D, torch.bfloat16, DEV)
            bank.kernels = kernels
            bank.bind(pool)
            for rows, ok in steps:  # warm-up: admits everything
                bank.admit(pool, rows, ok, lists.own_cols)
            times = {}
            for mode in ("same", "drift"):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                for i in range(20):
                    rows, ok = steps[-1] if mode == "same" else steps[i % len(steps)]
                    bank.admit(pool, rows, ok, lists.own_cols)
                b.record()
                torch.cuda.synchronize()
                times[mode] = a.elapsed_time(b) / 20
            print(
                f"\nadmit R={R} Hq={Hq} Gt={lists.Gt} cap={cap} "
                f"{'fused' if kernels else 'torch'}: {times['same']:.4f} ms/step (same "
                f"lists), {times['drift']:.4f} ms/step (cycling 10 steps' lists)"
            )
