"""The fused CUDA bank admission (csrc/bank_kernels.cuh) on host threads
(tests/emu/bank_emu.cpp) against the torch admission, so the kernels' logic is checked
without a GPU: same tables, counters, LRU order, encoded rows and bank data every step.

The emulator is built with torch.utils.cpp_extension (a C++20 compiler; about a minute the
first time, cached after); the tests skip when it cannot be built.  The admit CTA runs
with 64 threads (more rounds and tiles per step) and once with the real 1024.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bank_lists import DecodeLists, assert_same, run_steps

from vllm_hga.bank import DeviceBank
from vllm_hga.config import BANK_MAX_CHUNKS, CHUNK_SIZE
from vllm_hga.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent

SMS = 2  # emulated multiprocessors: grid-stride loops run several rounds


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    try:
        return load(
            name="hga_bank_emu",
            sources=[str(ROOT / "tests" / "emu" / "bank_emu.cpp")],
            extra_include_paths=[str(ROOT / "csrc")],
            extra_cflags=["-O1", "-std=c++20"],
        )
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, C++20 or ninja
        pytest.skip(f"cannot build the bank kernel emulator: {exc}")


@pytest.fixture
def threads(emu, monkeypatch):
    """DeviceBank's kernel path, on CPU tensors, through the emulator; returns a dict whose
    "n" sets the admit CTA's thread count."""
    from vllm_hga.ops import cuda_ops

    cfg = {"n": 64}

    def admit(pool, bank, rows, token_ok, own, t, enc, sinks, chunk_bytes, fill):
        emu.admit(
            pool,
            bank,
            rows,
            token_ok,
            own[0],
            own[1],
            t["slot_of_block"],
            t["block_of_slot"],
            t["last_use"],
            t["order"],
            t["miss_bits"],
            t["miss_summary"],
            t["meta"],
            t["fill_blocks"],
            t["fill_slots"],
            enc,
            list(sinks),
            chunk_bytes,
            fill,
            cfg["n"],
            SMS,
        )

    monkeypatch.setattr(cuda_ops, "bank_admit", admit)
    monkeypatch.setattr(
        cuda_ops, "bank_invalidate", lambda s, a, b, c: emu.invalidate(s.contiguous(), a, b, c, SMS)
    )
    monkeypatch.setattr(
        cuda_ops, "bank_fill_covered", lambda p, b: p.is_contiguous() and b.is_contiguous()
    )
    return cfg


def banks(cap, Hkv, D, dtype, pool):
    ref = DeviceBank(cap, Hkv, D, dtype, "cpu")
    ref.kernels = False
    fused = DeviceBank(cap, Hkv, D, dtype, "cpu")
    fused.kernels = True  # the kernel path on CPU tensors: the emulator (fixture threads)
    ref.bind(pool)
    fused.bind(pool)
    return ref, fused


def pool_of(nb, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nb, Hkv, 2, CHUNK_SIZE, D, generator=g).to(dtype)


@pytest.mark.parametrize("cap", [3, 40, 1024])
def test_emulated_kernels_match_torch(threads, cap):
    nb, Hkv, D = 3000, 2, 8
    pool = pool_of(nb, Hkv, D, seed=cap)
    lists = DecodeLists(
        nb,
        R=5,
        Hq=8,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=8,
        groups=12,
        lengths=(200, 5000),
        seed=cap,
        max_decode=60,
    )
    ref, fused = banks(cap, Hkv, D, torch.float32, pool)
    s = run_steps(lists, ref, fused, pool, pool, steps=60)
    assert s["hits"] > 0 and s["misses"] > 0
    assert s["admitted"] > cap or cap == 1024
    assert s["dropped"] > 0 or cap == 3


def test_emulated_full_cta_and_metrics(threads):
    """1024 admit threads (the real CTA); WorkerMetrics fed by the kernel (sinks) equals
    the torch path's per-step adds."""
    threads["n"] = 1024
    nb, Hkv, D, cap = 2000, 2, 8, 40
    pool = pool_of(nb, Hkv, D, seed=1)
    lists = DecodeLists(nb, R=4, Hq=8, Hkv=Hkv, lengths=(300, 4000), seed=1, max_decode=40)
    ref, fused = banks(cap, Hkv, D, torch.float32, pool)
    m_ref, m_fused = WorkerMetrics(), WorkerMetrics()
    for _ in range(12):
        rows, ok, slots = lists.step()
        ref.invalidate(slots)
        fused.invalidate(slots)
        want = ref.admit(pool, rows, ok, lists.own_cols, m_ref)
        assert torch.equal(fused.admit(pool, rows, ok, lists.own_cols, m_fused), want)
        assert_same(ref, fused, pool)
    assert fused._sinks[1] is not None  # the kernel added into WorkerMetrics' accumulators
    t_ref, t_fused = m_ref.totals(), m_fused.totals()
    for name in ("bank_hits", "bank_misses", "bank_bytes_fetched"):
        assert t_ref[name] == t_fused[name] > 0, name
    assert fused.stats() == ref.stats()


def test_emulated_many_summary_tiles_and_max_capacity(threads):
    """A pool of 200K blocks (4 tiles of the miss summary at 64 threads) with an expanded
    pool (torch copies; tables only), and a bank of BANK_MAX_CHUNKS slots."""
    nb, Hkv, D = 200_000, 1, 8
    pool = pool_of(1, Hkv, D).expand(nb, -1, -1, -1, -1)
    lists = DecodeLists(
        nb,
        R=16,
        Hq=4,
        Hkv=Hkv,
        sinks=1,
        local=2,
        topk=20,
        groups=30,
        lengths=(2000, 40000),
        seed=2,
        max_decode=100,
    )
    ref, fused = banks(300, Hkv, D, torch.float32, pool)
    assert run_steps(lists, ref, fused, pool, None, steps=8)["misses"] > 0
    nb = 40_000
    pool = pool_of(nb, Hkv, D, torch.float16, seed=3)
    lists = DecodeLists(
        nb, R=12, Hq=4, Hkv=Hkv, topk=30, groups=60, lengths=(3000, 60000), seed=3, max_decode=30
    )
    ref, fused = banks(BANK_MAX_CHUNKS, Hkv, D, torch.float16, pool)
    run_steps(lists, ref, fused, pool, pool, steps=6)
