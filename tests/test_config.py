"""Configuration and start-up checks: bad input fails early, with the reason and the fix."""

from __future__ import annotations

import dataclasses
import types

import pytest

from vllm_hga.config import HGAConfig, HGAConfigError


def test_paper_preset_is_the_papers():
    cfg = HGAConfig.from_mapping({"preset": "paper"})
    assert (cfg.sink_chunks, cfg.local_chunks, cfg.topk_chunks, cfg.topk_groups) == (2, 8, 20, 32)
    assert cfg.groups_per_query == 16
    assert (cfg.chunk_score, cfg.group_score) == ("summary", "mean")
    assert cfg.keys_per_query_bound == (2 + 8 + 1) * 64 + 16 * 16


def test_defaults_spend_the_papers_budget_differently():
    """The defaults (docs/QUALITY.md, "Choice of the defaults") keep the paper's per-query
    key budget, so their density equals the paper preset's at every length."""
    from vllm_hga.routing import keys_seen

    cfg, paper = HGAConfig(), HGAConfig.from_mapping({"preset": "paper"})
    assert (cfg.sink_chunks, cfg.local_chunks, cfg.topk_chunks, cfg.topk_groups) == (1, 2, 22, 88)
    assert cfg.groups_per_query == 44
    assert (cfg.chunk_score, cfg.group_score) == ("max_group", "sketch")
    assert cfg.keys_per_query_bound == paper.keys_per_query_bound == 960
    # every query position attends the same number of keys under both (so equal density)
    assert [keys_seen(p, cfg) for p in range(8192)] == [keys_seen(p, paper) for p in range(8192)]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_every_device_gets_the_same_default_routing(device_type):
    """One algorithm on every device: the engine's device never changes the group_score
    (CUDA kernels read sketch pages); a mapping or preset that names one keeps it."""

    def engine(hga):
        vllm_config = types.SimpleNamespace(
            additional_config={"hga": hga},
            device_config=types.SimpleNamespace(device_type=device_type),
        )
        return HGAConfig.from_vllm_config(vllm_config)

    assert engine({}).group_score == HGAConfig().group_score == "sketch"
    assert engine({"topk_groups": 64}).group_score == "sketch"
    assert engine({"group_score": "mean_std"}).group_score == "mean_std"
    assert engine({"preset": "paper"}).group_score == "mean"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"topk_chunks": 0}, "topk_chunks must be an integer >= 1"),
        ({"sink_chunks": -1}, "sink_chunks must be an integer >= 0"),
        ({"sink_chunks": 0, "local_chunks": 0}, "sink_chunks + local_chunks must be >= 1"),
        ({"groups_per_query": 100}, "cannot exceed topk_groups"),
        ({"topk_chunks": 2, "topk_groups": 9}, "exceeds the 8 groups"),
        ({"chunk_size": 128}, "chunk_size must be 64"),
        ({"rope_threshold": -1}, "rope_threshold must be a number >= 0"),
        ({"chunk_score": "best"}, "chunk_score must be"),
        ({"host_kv_bytes": "lots"}, "is not a size"),
        ({"disk_dir": "/tmp"}, "disk_dir and disk_kv_bytes go together"),
        ({"topk": 3}, "unknown key(s) ['topk']"),
        ({"preset": "nope"}, "preset 'nope' not found"),
        ({"cuda_graphs": "yes"}, "cuda_graphs must be true or false"),
    ],
)
def test_bad_values_are_refused_with_reason(values, message):
    with pytest.raises(HGAConfigError) as err:
        HGAConfig.from_mapping(values)
    assert message in str(err.value)


def test_sizes_parse_and_overrides_win_over_preset():
    cfg = HGAConfig.from_mapping(
        {"preset": "paper", "topk_chunks": 30, "host_kv_bytes": "1.5GiB", "dense_layers": [1, 0, 1]}
    )
    assert cfg.topk_chunks == 30 and cfg.topk_groups == 32
    assert cfg.host_kv_bytes == int(1.5 * 2**30)
    assert cfg.dense_layers == (0, 1)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HGAConfig().topk_chunks = 3  # type: ignore[misc]


# ---------------------------------------------------------------- with vLLM's real config
vllm = pytest.importorskip("vllm")


def engine_config(**kw):
    """vLLM's own config builder; it runs our platform hook's start-up checks."""
    from vllm.engine.arg_utils import EngineArgs

    from devkit.model import embedded_model_dir

    args = dict(
        model=str(embedded_model_dir()),
        attention_backend="HGA",
        max_model_len=8192,
        kv_cache_memory_bytes=1 << 30,
    )
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_hga_engine_config_gets_block_64_and_host_sized_block_count():
    from vllm_hga.startup import planned_capacity

    cfg = engine_config()
    assert cfg.cache_config.block_size == 64
    host_block = 30 * 3 * 2 * 64 * 64 * 2  # layers x kv heads x K,V x 64 tokens x D x bf16
    assert planned_capacity(cfg).num_blocks == (1 << 30) // host_block
    # the HGA worker caps vLLM's count at the device budget (an override would not)
    assert cfg.parallel_config.worker_cls == "vllm_hga.worker.HGACpuWorker"
    assert cfg.cache_config.num_gpu_blocks_override is None


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(block_size=32), "HGA needs --block-size 64"),
        (dict(additional_config={"hga": {"topk_chunks": -2}}), "topk_chunks must be"),
        (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8 is not supported"),
        (dict(kv_cache_memory_bytes=50 << 20), "needs 129 blocks"),
        (dict(additional_config={"hga": {"host_kv_bytes": "100TiB"}}), "only"),
    ],
)
def test_engine_start_refuses_bad_setups(kw, message):
    with pytest.raises(Exception) as err:
        engine_config(**kw)
    assert message in str(err.value)


def test_other_backends_are_untouched():
    cfg = engine_config(attention_backend="CPU_ATTN")
    assert cfg.cache_config.block_size != 64 or cfg.cache_config.num_gpu_blocks_override is None
