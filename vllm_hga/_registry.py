"""Registers the name ``HGA`` with vLLM's attention-backend registry.

Kept import-light on purpose: it runs from the platform-plugin hook, before vLLM has
resolved its platform, so it may import nothing that touches ``current_platform``.
"""

HGA_NAME = "HGA"
HGA_BACKEND_PATH = "vllm_hga.backend.HGAAttentionBackend"


def ensure_registered() -> None:
    """Idempotent: vLLM loads plugins once per process, and in every process it spawns."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if HGA_NAME not in AttentionBackendEnum.__members__:
        register_backend(HGA_NAME, HGA_BACKEND_PATH)
