"""Thin subclasses of vLLM's CPU and CUDA platforms that make ``--attention-backend HGA`` work.

They behave exactly like the built-in platform unless HGA is selected.  Then they
  * validate the model and the HGA config at start-up (clear errors, no weights loaded),
  * fix the block size to 64 and cap the block count to what the host tier holds,
  * on CPU, return HGA from backend selection (the CPU platform ignores the choice).
"""

from __future__ import annotations

from ._lazy import build_subclass


class HGAPlatformMixin:
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)  # type: ignore[misc]
        from .startup import configure_engine

        configure_engine(vllm_config)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", "") == "HGA":
            backend = selected_backend.get_class()
            capability = cls.get_device_capability() if cls.device_type == "cuda" else None
            reasons = backend.validate_configuration(
                device_capability=capability, **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError("HGA backend cannot run this layer: " + "; ".join(reasons))
            return selected_backend.get_path()
        return super().get_attn_backend_cls(  # type: ignore[misc]
            selected_backend, attn_selector_config, num_heads
        )


class HGAGuardMixin:
    """``VLLM_HGA_PLATFORM=0`` on CPU: vLLM's platform exactly, except that selecting HGA
    is refused (the CPU platform would ignore it and serve its own attention)."""

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)  # type: ignore[misc]
        from .config import HGAConfigError
        from .platform_hook import HOOK_OFF_REASON
        from .startup import is_hga_selected

        if is_hga_selected(vllm_config):
            raise HGAConfigError(f"HGA cannot serve this configuration: {HOOK_OFF_REASON}")


def is_hga_platform(platform) -> bool:
    """Whether `platform` (vLLM's current_platform) runs HGA's start-up checks."""
    return isinstance(platform, HGAPlatformMixin)


_PLATFORMS = {
    "HGACpuPlatform": (HGAPlatformMixin, "vllm.platforms.cpu", "CpuPlatform"),
    "HGACudaPlatform": (HGAPlatformMixin, "vllm.platforms.cuda", "CudaPlatform"),
    "HGAGuardCpuPlatform": (HGAGuardMixin, "vllm.platforms.cpu", "CpuPlatform"),
}


def __getattr__(name: str):
    return build_subclass(globals(), name, _PLATFORMS)
