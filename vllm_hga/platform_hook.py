"""Entry point of the ``vllm.platform_plugins`` group.

Why a platform plugin and not only a general plugin: vLLM starts its engine core and
workers with *spawn* and pickles the config, whose attention backend is an enum member
that unpickles by value.  Platform plugins run when the child first resolves
``current_platform`` (while importing the engine modules, before the config is
unpickled), so registering here makes ``HGA`` known in time.

The same hook installs a thin subclass of the built-in platform (CPU or CUDA) that
routes ``--attention-backend HGA`` to our backend (the CPU platform otherwise ignores
the selection) and fixes the block size and block count HGA needs.  Set
``VLLM_HGA_PLATFORM=0`` to keep vLLM's own platform class (HGA then works on CUDA only).
"""

import os


def platform_plugin() -> str | None:
    from ._registry import ensure_registered

    ensure_registered()
    if os.environ.get("VLLM_HGA_PLATFORM", "1") == "0":
        return None
    from vllm.platforms import cpu_platform_plugin, cuda_platform_plugin

    if cuda_platform_plugin() is not None:
        return "vllm_hga.platform.HGACudaPlatform"
    if cpu_platform_plugin() is not None:
        return "vllm_hga.platform.HGACpuPlatform"
    return None
