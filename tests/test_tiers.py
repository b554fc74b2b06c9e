"""Memory tiers: summary-only device pages, the host pool, the NVMe tier, capacity, metrics."""

from __future__ import annotations

import os

import pytest
import torch
from layer_harness import PagedRun, run_requests

from devkit import reference as ref
from vllm_hga.config import HGAConfig, HGAConfigError
from vllm_hga.metrics import WorkerMetrics, density
from vllm_hga.startup import check_disk_dir
from vllm_hga.store import map_file

# float64 pages (exact comparisons) hold mean / mean_std summaries; sketch pages are
# float32 bit fields (tests/test_sketch.py covers them)
SPARSE = HGAConfig(
    sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8, group_score="mean_std"
)


def test_device_page_holds_only_summaries():
    vllm = pytest.importorskip("vllm")  # noqa: F841
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_hga.backend import HGAAttentionBackend

    for kv_heads, head, dtype in [
        (3, 64, torch.bfloat16),
        (4, 128, torch.bfloat16),
        (8, 128, torch.float16),
    ]:
        dense = FullAttentionSpec(block_size=64, num_kv_heads=kv_heads, head_size=head, dtype=dtype)
        hga = HGAAttentionBackend.customize_spec(dense)
        # one state per block: [chunk | 4 groups] x head_size float32 per KV head
        assert hga.page_size_bytes == kv_heads * 5 * head * 4
        assert dense.page_size_bytes / hga.page_size_bytes == pytest.approx(12.8)


def test_nvme_tier_gives_identical_outputs_and_leaves_no_files(tmp_path):
    lengths = [300, 1500]
    outs = []
    for disk in (False, True):
        run = PagedRun(lengths, SPARSE, 6, 2, dtype=torch.float64, seed=21)
        run.summ = run.summ.double()
        if disk:
            mapped = map_file(str(tmp_path), "layers.0", tuple(run.pool.shape), run.pool.dtype)
            assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped
            run.pool = mapped
        outs.append(run_requests(run, lengths, prefill_chunk=400, decode_tail=5))
    for r in range(len(lengths)):
        assert torch.equal(outs[0][r], outs[1][r])


def test_decode_working_set_does_not_grow_with_context():
    """K/V read per decode token is bounded by the budget, whatever the context length."""
    cfg = HGAConfig()
    per_token = []
    for S in (2048, 4096, 8192):
        run = PagedRun([S], cfg, 4, 2, seed=S)
        run.layer.metrics = WorkerMetrics()
        run.step({0: S - 4})
        before = run.layer.metrics.totals()
        for _ in range(4):
            run.step({0: 1})
        after = run.layer.metrics.totals()
        keys = (after["keys_attended"] - before["keys_attended"]) / 4
        per_token.append(after["kv_bytes_read"] - before["kv_bytes_read"])
        assert keys <= 4 * cfg.keys_per_query_bound  # 4 query heads
    assert max(per_token) - min(per_token) <= 0.05 * max(per_token), per_token


def test_metrics_count_density_like_the_reference():
    S = 1500
    run = PagedRun([S], SPARSE, 4, 2, dtype=torch.float64, seed=3)
    run.summ = run.summ.double()
    run.layer.metrics = WorkerMetrics()
    run_requests(run, [S], prefill_chunk=500, decode_tail=3)
    totals = run.layer.metrics.totals()
    _, mask = ref.hga_attention(run.q[0], run.k[0], run.v[0], 0, run.rope, SPARSE)
    assert density(totals) == pytest.approx(ref.density(mask, 0), rel=1e-12)
    assert totals["query_tokens"] == S
    assert totals["summary_bytes_written"] == (S // 64) * 2 * 5 * 64 * 4


def test_disk_dir_errors_are_clear(tmp_path):
    with pytest.raises(HGAConfigError, match="does not exist"):
        check_disk_dir(str(tmp_path / "missing"), 1 << 20)
    with pytest.raises(HGAConfigError, match="GiB free but disk_kv_bytes"):
        check_disk_dir(str(tmp_path), 1 << 60)
    check_disk_dir(str(tmp_path), 1 << 20)  # fine


def test_full_disk_fails_when_the_file_is_reserved(tmp_path):
    """posix_fallocate reserves the whole tier up front: no ENOSPC in the middle of a request."""
    import resource
    import signal

    code = os.fork()
    if code == 0:  # child: a 1 MiB file-size limit stands in for a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            map_file(str(tmp_path), "l0", (64, 2, 2, 64, 64), torch.bfloat16)  # 2 MiB
        except OSError as e:
            os._exit(0 if "cannot reserve" in str(e) and not os.listdir(tmp_path) else 2)
        os._exit(1)
    _, status = os.waitpid(code, 0)
    assert os.WEXITSTATUS(status) == 0


def test_nvme_file_refuses_a_symlink_at_its_name(tmp_path):
    """A name that already exists in disk_dir (here a symlink to another user's file) is
    refused, never followed."""
    from devkit.bad_input import row

    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    name = tmp_path / f"vllm-hga-{os.getpid()}-layers.0.kv"
    name.symlink_to(victim)
    with pytest.raises(OSError) as err:
        map_file(str(tmp_path), "layers.0", (1, 1, 2, 64, 64), torch.float32)
    assert row("disk-file-exists").answer in str(err.value)
    assert victim.read_bytes() == b"not yours" and name.is_symlink()


def test_nvme_file_is_mapped_through_its_own_descriptor(tmp_path, monkeypatch):
    """A symlink swapped in between creating the tier's file and mapping it (simulated
    right after the space is reserved) must not make the tier map the other file: it
    maps the file it created, refuses to go on, and leaves the other file untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    modes = []
    reserve = os.posix_fallocate

    def reserve_then_swap(fd, offset, length):
        reserve(fd, offset, length)
        (path,) = [p for p in tmp_path.iterdir() if p.name.endswith(".kv")]
        modes.append(path.stat().st_mode & 0o777)
        path.unlink()
        path.symlink_to(victim)

    monkeypatch.setattr(os, "posix_fallocate", reserve_then_swap)
    with pytest.raises(OSError, match="was replaced while the NVMe tier created it"):
        map_file(str(tmp_path), "layers.0", (1, 1, 2, 64, 64), torch.float32)
    assert modes == [0o600]
    assert victim.read_bytes() == b"not yours"


def test_engine_config_sizes_blocks_from_the_disk_budget(tmp_path):
    pytest.importorskip("vllm")
    from test_config import engine_config

    cfg = engine_config(
        additional_config={"hga": {"disk_dir": str(tmp_path), "disk_kv_bytes": "256MiB"}}
    )
    from vllm_hga.startup import planned_capacity

    host_block = 30 * 3 * 2 * 64 * 64 * 2
    assert planned_capacity(cfg).num_blocks == (256 << 20) // host_block
    with pytest.raises(Exception, match="does not exist"):
        engine_config(
            additional_config={"hga": {"disk_dir": str(tmp_path / "nope"), "disk_kv_bytes": "1GiB"}}
        )


def test_nvme_tier_on_cuda_is_refused_at_start_up_with_the_fix(tmp_path):
    from vllm_hga.config import HGAConfig
    from vllm_hga.startup import unsupported_tiers

    cfg = HGAConfig(disk_dir=str(tmp_path), disk_kv_bytes=1 << 30)
    assert unsupported_tiers(cfg, "cpu") == []
    (reason,) = unsupported_tiers(cfg, "cuda")
    assert "CPU only" in reason and "host_kv_bytes" in reason
    assert unsupported_tiers(HGAConfig(), "cuda") == []


# ---------------------------------------------------------------- the engine's owner (tiers.py)
def test_engine_tiers_allocate_once_reuse_and_free_at_shutdown():
    from vllm_hga.tiers import EngineTiers

    tiers = EngineTiers(HGAConfig())
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    p0 = tiers.layer_pool("layers.0", 8, 2, 64, bf16, cpu)
    p1 = tiers.layer_pool("layers.1", 8, 2, 64, bf16, cpu)
    assert tiers.layer_pool("layers.0", 8, 2, 64, bf16, cpu) is p0  # reused across steps
    assert p0.data_ptr() != p1.data_ptr()  # one tensor per layer
    assert tiers.metrics.totals()["host_pool_bytes"] == p0.nbytes + p1.nbytes
    # vLLM binds a small profiling cache first: another block count replaces the layer
    bigger = tiers.layer_pool("layers.0", 16, 2, 64, bf16, cpu)
    assert bigger.shape[0] == 16 and tiers.nbytes()["pool"] == bigger.nbytes + p1.nbytes
    bank = tiers.device_bank("layers.0", 4, 2, 64, bf16, cpu)
    assert tiers.device_bank("layers.0", 4, 2, 64, bf16, cpu) is bank
    sc = tiers.prefill_scratch(10, 2, 64, bf16, cpu)
    assert tiers.prefill_scratch(3, 2, 64, bf16, cpu) is sc  # shared by all layers
    assert tiers.prefill_scratch(20, 2, 64, bf16, cpu).max_chunks == 20  # grown
    tiers.shutdown()
    assert tiers.nbytes() == {"pool": 0, "banks": 0, "scratch": 0}
    assert tiers.metrics.totals()["host_pool_bytes"] == 0
    with pytest.raises(RuntimeError, match="shut down"):
        tiers.layer_pool("layers.0", 8, 2, 64, bf16, cpu)


def test_pool_past_its_budget_raises_with_the_knob_to_change():
    from vllm_hga.store import HostKVPool

    block = 2 * 2 * 64 * 64 * 2  # one block of one layer: H_kv 2, K+V, 64 tokens, D 64, bf16
    pool = HostKVPool(budget_bytes=2 * 8 * block)
    pool.layer("layers.0", 8, 2, 64, torch.bfloat16, torch.device("cpu"))
    pool.layer("layers.1", 8, 2, 64, torch.bfloat16, torch.device("cpu"))  # exactly full
    with pytest.raises(MemoryError, match="over host_kv_bytes"):
        pool.layer("layers.2", 8, 2, 64, torch.bfloat16, torch.device("cpu"))


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(name in line for line in f)


def test_shutdown_unmaps_the_nvme_tier(tmp_path):
    import gc

    from vllm_hga.tiers import EngineTiers

    tiers = EngineTiers(HGAConfig(disk_dir=str(tmp_path), disk_kv_bytes=1 << 30))
    tiers.layer_pool("layers.0", 8, 2, 64, torch.bfloat16, torch.device("cpu"))
    name = f"vllm-hga-{os.getpid()}-layers.0.kv"
    assert _mapped(name) and os.listdir(tmp_path) == []  # mapped, already unlinked
    assert tiers.metrics.totals()["disk_pool_bytes"] > 0
    tiers.shutdown()
    gc.collect()
    assert not _mapped(name)


def test_each_engine_gets_its_own_tiers_and_they_go_with_it(tmp_path):
    """Two engines in one process (the reliability issue: a process-wide pool whose first
    caller decided the tier): each engine's config finds its own tiers, with its own
    settings, and collecting the config shuts them down."""
    pytest.importorskip("vllm")
    import gc

    from test_config import engine_config

    from vllm_hga.tiers import tiers_for

    ram = engine_config()
    disk = engine_config(
        additional_config={"hga": {"disk_dir": str(tmp_path), "disk_kv_bytes": "256MiB"}}
    )
    first = tiers_for(ram)
    assert tiers_for(ram) is first  # builder and layers of one engine share it
    second = tiers_for(disk)
    assert second is not first and second.metrics is not first.metrics
    assert first.pool.disk_dir is None and second.pool.disk_dir == str(tmp_path)
    first.layer_pool("layers.0", 8, 2, 64, torch.bfloat16, torch.device("cpu"))
    del ram
    gc.collect()
    assert first.closed and first.nbytes()["pool"] == 0
    assert not second.closed
