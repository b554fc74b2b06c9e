"""The start-up capacity plan (startup.py) and the pools it sizes (tiers.py, store.py).

Configs come from vLLM's own builder (``EngineArgs.create_engine_config``), which runs our
platform hook exactly as `vllm serve` does; no engine is started here (tests/test_parallel.py
starts real ones).
"""

from __future__ import annotations

import os
import pickle

import psutil
import pytest
import torch

pytest.importorskip("vllm")
from test_config import engine_config  # noqa: E402

from vllm_hga.config import HGAConfigError  # noqa: E402
from vllm_hga.startup import planned_capacity  # noqa: E402

GiB = 2**30
BF16_BLOCK = 30 * 3 * 2 * 64 * 64 * 2  # SmolLM2-135M: layers x KV heads x K,V x 64 x D x 2 B


def hga(**kw) -> dict:
    return {"additional_config": {"hga": kw}}


def engine_process_view(cfg):
    """What vLLM's engine process does with the config: unpickle it, then (after its
    workers hold their memory) run ``__post_init__`` and so the platform check again."""
    clone = pickle.loads(pickle.dumps(cfg))
    clone.__post_init__()
    return clone


def test_plan_is_made_once_and_the_engine_process_keeps_it():
    """The default budget follows the RAM available, and an explicit one is checked against
    it; memory taken between the two checks (by the engine's own pools) must change
    neither the block count nor the verdict."""
    default = engine_config(kv_cache_memory_bytes=None, max_model_len=1024)
    near_limit = engine_config(
        max_model_len=1024,
        **hga(host_kv_bytes=int(psutil.virtual_memory().available) - GiB // 2),
    )
    planned = [planned_capacity(c) for c in (default, near_limit)]
    ballast = torch.ones(GiB // 4, dtype=torch.float32)  # 1 GiB held, as a pool would be
    try:
        again = [engine_process_view(c) for c in (default, near_limit)]
    finally:
        del ballast
    for before, after in zip(planned, again):
        assert planned_capacity(after) == before
        assert after.cache_config.num_gpu_blocks_override is None  # the HGA worker caps it


def test_plan_is_remade_when_its_inputs_change():
    cfg = engine_config(max_model_len=1024)
    cfg.model_config.max_model_len = 2048
    assert planned_capacity(engine_process_view(cfg)).inputs[4] == 2048


def test_tensor_and_pipeline_ranks_each_hold_their_share_and_the_node_pays_all():
    """TP 3: each rank keeps 1 of the 3 KV heads; PP 2: each stage 15 of the 30 layers.
    The per-rank budget buys blocks of the rank's size; the node holds every rank's pool."""
    one = planned_capacity(engine_config(max_model_len=1024))
    for kw, share, ranks in [
        (dict(tensor_parallel_size=3), 3, 3),
        (dict(pipeline_parallel_size=2), 2, 2),
    ]:
        cap = planned_capacity(engine_config(max_model_len=1024, **kw))
        assert cap.host_bytes_per_block == BF16_BLOCK // share
        assert cap.node_bytes_per_block == BF16_BLOCK
        assert cap.ranks_per_node == ranks
        assert cap.num_blocks == (1 << 30) // (BF16_BLOCK // share)
        assert cap.node_pool_bytes == cap.num_blocks * BF16_BLOCK
        assert cap.node_pool_bytes > one.node_pool_bytes  # three (two) ranks of 1 GiB


def test_ranks_that_together_exceed_the_node_ram_are_refused_with_the_numbers():
    per_rank = int(psutil.virtual_memory().available * 0.4)  # one rank fits, three do not
    assert planned_capacity(engine_config(max_model_len=1024, **hga(host_kv_bytes=per_rank)))
    with pytest.raises(Exception) as err:  # vLLM wraps the platform's error in its own
        engine_config(max_model_len=1024, tensor_parallel_size=3, **hga(host_kv_bytes=per_rank))
    text = str(err.value)
    assert "3 rank(s)" in text and "GiB of RAM is available" in text and "host_kv_bytes" in text


def kv_cache_config(num_blocks: int, layers: int = 2):
    """vLLM's own KV cache config for `layers` HGA layers (SmolLM2's shape per layer)."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )

    spec = FullAttentionSpec(block_size=64, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )


def test_pools_are_allocated_at_start_up_to_exactly_the_planned_bytes():
    from vllm_hga.config import HGAConfig
    from vllm_hga.tiers import EngineTiers

    tiers = EngineTiers(HGAConfig())
    tiers.reserve_pools(kv_cache_config(40), "cpu")
    per_layer = 40 * 3 * 2 * 64 * 64 * 2
    assert tiers.pool.nbytes() == 2 * per_layer
    assert tiers.metrics.totals()["host_pool_bytes"] == 2 * per_layer
    first = tiers.layer_pool("model.layers.0.self_attn.attn", 40, 3, 64, torch.bfloat16, "cpu")
    assert first.shape == (40, 3, 2, 64, 64)  # the first forward finds it allocated
    tiers.shutdown()


def test_a_pool_that_does_not_fit_refuses_at_start_up_with_the_numbers(tmp_path):
    from vllm_hga.config import HGAConfig
    from vllm_hga.tiers import EngineTiers

    too_many = int(psutil.virtual_memory().available // (3 * 2 * 64 * 64 * 2)) + 1
    tiers = EngineTiers(HGAConfig())
    with pytest.raises(HGAConfigError, match=r"rank 2 cannot allocate .* GiB of available RAM"):
        tiers.reserve_pools(kv_cache_config(too_many, layers=1), "cpu", rank=2)
    assert tiers.pool.nbytes() == 0  # refused before anything was allocated

    free = psutil.disk_usage(str(tmp_path)).free
    disk = EngineTiers(HGAConfig(disk_dir=str(tmp_path), disk_kv_bytes=1 << 50))
    blocks = free // (3 * 2 * 64 * 64 * 2) + 1
    with pytest.raises(HGAConfigError, match="of free space in"):
        disk.reserve_pools(kv_cache_config(blocks, layers=1), "cpu")
    assert list(tmp_path.iterdir()) == []


def test_metrics_directory_reaches_ray_workers(monkeypatch):
    """vLLM copies to Ray workers only the variables it knows; ours is added to its list."""
    from vllm_hga.metrics import ENV_DIR, RAY_CARRY, carry_to_ray_workers

    monkeypatch.setenv(RAY_CARRY, "FOO")
    carry_to_ray_workers(ENV_DIR)
    carry_to_ray_workers(ENV_DIR)
    assert os.environ[RAY_CARRY] == f"FOO,{ENV_DIR}"
