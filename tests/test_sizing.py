"""Device bank sizing (sizing.py) and the bank_chunks / bank_max_chunks knobs."""

import pytest

from vllm_hga.config import BANK_MAX_CHUNKS, HGAConfig, HGAConfigError
from vllm_hga.sizing import (
    auto_bank_budget,
    bank_chunks_for,
    check_explicit_bank_fits,
    chunk_bytes,
    chunks_needed,
)

GiB = 2**30
SHAPE = dict(num_layers=48, num_kv_heads=4, head_size=128, dtype_bytes=2)  # 128 KiB a chunk


def test_chunk_bytes():
    assert chunk_bytes(4, 128, 2) == 2 * 64 * 4 * 128 * 2


def test_fills_free_memory_when_contexts_need_more():
    chunks = bank_chunks_for(48 * GiB, **SHAPE, max_model_len=131072, max_num_seqs=16)
    assert chunks == GiB // chunk_bytes(4, 128, 2) - 1  # one spare slot per layer
    used = SHAPE["num_layers"] * (chunks + 1) * chunk_bytes(4, 128, 2)
    assert used <= 48 * GiB


def test_never_more_than_the_contexts_need():
    assert (
        bank_chunks_for(100 * GiB, **SHAPE, max_model_len=8192, max_num_seqs=2)
        == chunks_needed(8192, 2)
        == 256
    )
    assert chunks_needed(100, 1) == 2  # a partial chunk counts whole


def test_respects_cap_and_kernel_limit():
    assert (
        bank_chunks_for(100 * GiB, **SHAPE, max_model_len=131072, max_num_seqs=16, cap=100) == 100
    )
    huge = bank_chunks_for(10**6 * GiB, **SHAPE, max_model_len=262144, max_num_seqs=256)
    assert huge == BANK_MAX_CHUNKS


def test_no_memory_no_bank():
    assert bank_chunks_for(0, **SHAPE, max_model_len=8192, max_num_seqs=1) == 0
    assert bank_chunks_for(1000, **SHAPE, max_model_len=8192, max_num_seqs=1) == 0


def test_budget_leaves_utilization_headroom_and_reserve():
    assert abs(auto_bank_budget(100 * GiB, 140 * GiB, 0.9) - (100 - 28) * GiB) <= 1
    assert auto_bank_budget(GiB, 140 * GiB, 0.9) == 0


def test_explicit_size_that_does_not_fit_is_a_clear_error():
    check_explicit_bank_fits(512, 10 * GiB, **SHAPE)
    with pytest.raises(HGAConfigError, match="bank_chunks=32768 needs .* GiB"):
        check_explicit_bank_fits(32768, 10 * GiB, **SHAPE)


def test_config_knobs():
    assert HGAConfig().bank_chunks == "auto"
    assert HGAConfig().bank_auto("cuda") and not HGAConfig().bank_auto("cpu")
    assert HGAConfig().bank_size("cpu") == 0
    assert HGAConfig(bank_chunks=64).bank_size("cuda") == 64
    assert HGAConfig(bank_max_chunks=128).bank_max_chunks == 128
    for bad in ("big", True, -3, BANK_MAX_CHUNKS + 1):
        with pytest.raises(HGAConfigError, match="bank_chunks"):
            HGAConfig(bank_chunks=bad)
    for bad in ("x", -1, False):
        with pytest.raises(HGAConfigError, match="bank_max_chunks"):
            HGAConfig(bank_max_chunks=bad)
