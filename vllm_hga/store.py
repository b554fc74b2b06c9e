"""Where HGA's memory lives (see docs/DESIGN.md, "Ownership").

* vLLM's KV cache page of a block (allocated by vLLM, sized by ``customize_spec``) holds
  only that chunk's summaries: ``[H_kv, 1 + M, D]`` float32 (chunk row, then M groups).
* The host pool (allocated here, one tensor per layer) holds the full K/V of every block,
  addressed by the same vLLM block id: ``[num_blocks, H_kv, 2, 64, D]`` in the model dtype.
  On CUDA it is pinned host memory read and written by the GPU through UVA (zero-copy);
  on CPU it is ordinary memory.
"""

from __future__ import annotations

import torch

from .config import CHUNK_SIZE

def summary_view(kv_cache: torch.Tensor, groups: int, head_size: int) -> torch.Tensor:
    """vLLM's page tensor [num_blocks, H, 1, bytes/itemsize] seen as float32 [nb, H, 1+M, D]."""
    nb, H = kv_cache.shape[0], kv_cache.shape[1]
    return kv_cache.view(torch.float32).view(nb, H, 1 + groups, head_size)


class HostKVPool:
    """Full K/V of every vLLM block, per layer.  One instance per worker process."""

    def __init__(self) -> None:
        self._layers: dict[str, torch.Tensor] = {}
        self._host: dict[str, torch.Tensor] = {}  # pinned backing tensors on CUDA

    def layer(self, name: str, num_blocks: int, num_kv_heads: int, head_size: int,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        pool = self._layers.get(name)
        shape = (num_blocks, num_kv_heads, 2, CHUNK_SIZE, head_size)
        if pool is None or tuple(pool.shape) != shape or pool.dtype != dtype:
            pool = self._allocate(name, shape, dtype, device)
        return pool

    def _allocate(self, name, shape, dtype, device) -> torch.Tensor:
        # vLLM binds a small profiling cache before the real one: re-key on shape.
        self._layers.pop(name, None)
        self._host.pop(name, None)
        if device.type == "cuda":
            host = torch.empty(shape, dtype=dtype).pin_memory()
            from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

            self._host[name] = host
            pool = get_accelerator_view_from_cpu_tensor(host)
        else:
            pool = torch.empty(shape, dtype=dtype, device=device)
        self._layers[name] = pool
        return pool

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._layers.values())


_POOL: HostKVPool | None = None


def host_pool() -> HostKVPool:
    global _POOL
    if _POOL is None:
        _POOL = HostKVPool()
    return _POOL
