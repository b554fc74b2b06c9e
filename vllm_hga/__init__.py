"""vllm-hga: Hierarchical Global Attention as a vLLM attention backend.

``vllm serve MODEL --attention-backend HGA`` selects it once this package is installed.
"""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (runs in every vLLM process)."""
    from ._registry import ensure_registered

    ensure_registered()
