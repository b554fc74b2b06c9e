"""Entry point of the ``vllm.platform_plugins`` group.

Why a platform plugin and not only a general plugin: vLLM starts its engine core and
workers with *spawn* and pickles the config, whose attention backend is an enum member
that unpickles by value.  Platform plugins run when the child first resolves
``current_platform`` (while importing the engine modules, before the config is
unpickled), so registering here makes ``HGA`` known in time.

The same hook installs a thin subclass of the built-in platform (CPU or CUDA) that
routes ``--attention-backend HGA`` to our backend (the CPU platform otherwise ignores
the selection) and fixes the block size and block count HGA needs.

``VLLM_HGA_PLATFORM=0`` keeps vLLM's own platform behaviour, and HGA cannot be served
then: HGA's start-up checks and sizing do not run.  Asking for it anyway is refused at
start-up, never served as dense attention: on CPU (whose platform would silently pick its
own backend) by a guard subclass that only refuses ``--attention-backend HGA``; on CUDA
(whose platform honours the selection) by ``HGAAttentionBackend.validate_configuration``.
"""

import os

ENV_SWITCH = "VLLM_HGA_PLATFORM"

HOOK_OFF_REASON = (
    f"--attention-backend HGA was selected but {ENV_SWITCH}=0 turned HGA's platform hook "
    "off, and HGA's start-up checks and sizing (block size 64, host-tier block count) run "
    "in that hook; vLLM's own platform would serve another attention backend instead. "
    f"Unset {ENV_SWITCH} (or set it to 1) to serve HGA, or drop --attention-backend HGA."
)


def platform_plugin() -> str | None:
    from ._registry import ensure_registered

    ensure_registered()
    from vllm.platforms import cpu_platform_plugin, cuda_platform_plugin

    if cuda_platform_plugin() is not None:
        device = "cuda"
    elif cpu_platform_plugin() is not None:
        device = "cpu"
    else:
        device = None
    return platform_class(device, hook_enabled())


def hook_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def platform_class(device: str | None, enabled: bool) -> str | None:
    """The platform class to install for this device, None for vLLM's own."""
    if device == "cuda":
        # off: vLLM's CudaPlatform asks the HGA backend to validate itself, and it refuses
        return "vllm_hga.platform.HGACudaPlatform" if enabled else None
    if device == "cpu":
        # off: the CPU platform ignores --attention-backend, so only a guard can refuse
        return (
            "vllm_hga.platform.HGACpuPlatform"
            if enabled
            else "vllm_hga.platform.HGAGuardCpuPlatform"
        )
    return None
