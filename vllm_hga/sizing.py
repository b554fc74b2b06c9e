"""Device bank sizing: how many chunks of K/V per layer the device working set holds.

With ``bank_chunks: auto`` the bank takes the device memory a dense engine would have given
its KV cache, so a context that dense attention could hold never crosses PCIe at decode.
Pure functions here; ``tiers.EngineTiers.bank_chunks`` calls them once, on the profiling
forward that allocates the first bank, before any bank memory is taken.
"""

from __future__ import annotations

from .config import BANK_MAX_CHUNKS, CHUNK_SIZE, HGAConfigError

# Part of the device kept out of the bank on top of what gpu_memory_utilization leaves:
# vLLM's profiling forward still has to fit its activations, CUDA graphs and the summary
# KV cache after the banks are allocated.
AUTO_BANK_RESERVE_FRACTION = 0.10


def chunk_bytes(num_kv_heads: int, head_size: int, dtype_bytes: int) -> int:
    """Bytes of one bank slot of one layer: K and V of one chunk, all KV heads."""
    return 2 * CHUNK_SIZE * num_kv_heads * head_size * dtype_bytes


def chunks_needed(max_model_len: int, max_num_seqs: int) -> int:
    """Chunks per layer that hold every running context whole (more is never read)."""
    return max_num_seqs * -(-max_model_len // CHUNK_SIZE)


def bank_chunks_for(
    free_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    dtype_bytes: int,
    max_model_len: int,
    max_num_seqs: int,
    cap: int | None = None,
) -> int:
    """Chunks per layer an automatic bank gets from `free_bytes` shared by `num_layers`."""
    if num_layers <= 0 or free_bytes <= 0:
        return 0
    per_layer = free_bytes // num_layers
    fit = per_layer // chunk_bytes(num_kv_heads, head_size, dtype_bytes) - 1  # +1 spare slot
    limit = min(chunks_needed(max_model_len, max_num_seqs), BANK_MAX_CHUNKS)
    if cap is not None:
        limit = min(limit, cap)
    return max(0, min(fit, limit))


def check_explicit_bank_fits(
    chunks: int,
    free_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    dtype_bytes: int,
) -> None:
    """Raise a clear error when an explicit `bank_chunks` does not fit in `free_bytes`."""
    need = num_layers * (chunks + 1) * chunk_bytes(num_kv_heads, head_size, dtype_bytes)
    if chunks > 0 and need > free_bytes:
        raise HGAConfigError(
            f"hga config: bank_chunks={chunks} needs {need / 2**30:.2f} GiB of device memory "
            f"for {num_layers} layers but only {free_bytes / 2**30:.2f} GiB are free. "
            'Set bank_chunks lower, or to "auto" to size it from free memory.'
        )


def auto_bank_budget(free_bytes: int, total_bytes: int, gpu_memory_utilization: float) -> int:
    """Device bytes the banks of all layers may take, out of what is free now."""
    unusable = int(total_bytes * (1.0 - gpu_memory_utilization + AUTO_BANK_RESERVE_FRACTION))
    return max(0, free_bytes - unusable)
