"""Configuration and start-up checks: bad input fails early, with the reason and the fix."""

from __future__ import annotations

import dataclasses
import os
import types

import pytest

from devkit import bad_input
from vllm_hga.config import MAX_CHUNKS, MAX_GROUPS, HGAConfig, HGAConfigError
from vllm_hga.startup import unsupported_on_device


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
    "row", [r for r in bad_input.rows("config") if r.hga is not None], ids=lambda r: r.id
)
def test_bad_values_are_refused_with_reason(row):
    with pytest.raises(HGAConfigError) as err:
        HGAConfig.from_mapping(row.hga)
    assert row.answer in str(err.value)


def test_preset_yaml_errors_say_where_not_what(tmp_path):
    """A broken preset file is named with the line of the error; its content is not
    echoed (a YAML error message quotes the offending lines)."""
    preset = tmp_path / "my.yaml"
    preset.write_text("hga:\n\tsecret_token: 42\n")  # a tab cannot start a YAML token
    with pytest.raises(HGAConfigError) as err:
        HGAConfig.from_mapping({"preset": str(preset)})
    assert bad_input.row("preset-bad-yaml").answer in str(err.value)
    assert str(preset) in str(err.value) and "secret_token" not in str(err.value)
    not_yaml = tmp_path / "notes.txt"
    not_yaml.write_text("sink_chunks: 3\n")
    with pytest.raises(HGAConfigError, match="not found"):  # only .yaml files are presets
        HGAConfig.from_mapping({"preset": str(not_yaml)})
    good = tmp_path / "mine.yaml"
    good.write_text("hga:\n  sink_chunks: 3\n")
    assert HGAConfig.from_mapping({"preset": str(good)}).sink_chunks == 3


def test_config_bounds_admit_the_shipped_presets():
    full = HGAConfig.from_mapping({"preset": "full"})
    assert full.topk_chunks <= MAX_CHUNKS and full.topk_groups <= MAX_GROUPS
    assert HGAConfig.from_mapping({"host_kv_bytes": "1TiB"}).host_kv_bytes == 2**40


@pytest.mark.parametrize(
    "hga, head_size, refused",
    [
        ({"topk_chunks": 64, "topk_groups": 128}, 128, None),
        ({"topk_chunks": 100}, 64, "cuda-topk"),
        ({"preset": "full"}, 64, "cuda-topk"),
        ({}, 96, "cuda-head-size"),
    ],
)
def test_cuda_limits_are_refused_at_start_up(hga, head_size, refused):
    """What the CUDA kernels were not built for (csrc/routing.cu kMaxTopkChunks, the head
    sizes of HGA_DISPATCH_HEAD) is refused at start-up on CUDA, not at the first decode;
    on CPU the torch path serves it."""
    cfg = HGAConfig.from_mapping(hga)
    reasons = unsupported_on_device(cfg, "cuda", head_size)
    if refused is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and bad_input.row(refused).answer in reasons[0]
    assert unsupported_on_device(cfg, "cpu", head_size) == []


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


@pytest.mark.parametrize("row", bad_input.rows("engine"), ids=lambda r: r.id)
def test_engine_start_refuses_bad_setups(row):
    with pytest.raises(Exception) as err:
        engine_config(**row.engine)
    assert row.answer in str(err.value)


def test_cuda_engine_config_refuses_the_full_preset():
    """configure_engine, on a real vLLM config of the embedded model, as on CUDA."""
    from vllm_hga.startup import configure_engine

    cfg = engine_config()
    cfg.device_config.device_type = "cuda"
    cfg.additional_config = {"hga": {"preset": "full"}}
    with pytest.raises(HGAConfigError) as err:
        configure_engine(cfg)
    assert bad_input.row("cuda-topk").answer in str(err.value)


def test_hga_with_the_platform_hook_off_is_refused():
    """VLLM_HGA_PLATFORM=0: asking for HGA is refused at start-up (vLLM's CPU platform
    would serve its own attention), other backends start as usual.  A fresh process: the
    platform is resolved once per process."""
    import subprocess
    import sys

    from vllm_hga.platform_hook import platform_class

    assert platform_class("cpu", True) == "vllm_hga.platform.HGACpuPlatform"
    assert platform_class("cpu", False) == "vllm_hga.platform.HGAGuardCpuPlatform"
    assert platform_class("cuda", True) == "vllm_hga.platform.HGACudaPlatform"
    assert platform_class("cuda", False) is None  # the backend refuses (validate_configuration)
    script = (
        "import sys; from test_config import engine_config\n"
        "print(type(engine_config(attention_backend='CPU_ATTN')).__name__)\n"
        "try:\n    engine_config()\nexcept Exception as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "VLLM_HGA_PLATFORM": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "VllmConfig" in out.stdout, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and bad_input.row("platform-hook-off").answer in out.stdout


def test_other_backends_are_untouched():
    cfg = engine_config(attention_backend="CPU_ATTN")
    assert cfg.cache_config.block_size != 64 or cfg.cache_config.num_gpu_blocks_override is None


def test_cpu_engine_turns_off_onednn_global_primitive_cache(monkeypatch):
    """HGA on CPU sets ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 for the workers it spawns (the
    soak's worker heap grew with it at oneDNN's default); a value the user set is kept, and
    other backends are left alone."""
    from vllm_hga.metrics import RAY_CARRY
    from vllm_hga.startup import ONEDNN_CACHE_ENV

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    monkeypatch.delenv(RAY_CARRY, raising=False)
    engine_config(attention_backend="CPU_ATTN")
    assert ONEDNN_CACHE_ENV not in os.environ
    engine_config()
    assert os.environ[ONEDNN_CACHE_ENV] == "0"
    assert ONEDNN_CACHE_ENV in os.environ[RAY_CARRY].split(",")
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "256")
    engine_config()
    assert os.environ[ONEDNN_CACHE_ENV] == "256"
