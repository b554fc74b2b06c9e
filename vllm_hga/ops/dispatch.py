"""The one place that decides CUDA kernels or torch for a layer (and for CUDA graphs).

``kernel_blockers`` lists why the kernels cannot serve a layer; ``ops_for`` turns an empty
list into ``CudaOps`` and anything else into ``TorchOps``.  Layers call it once, at
construction, so no op checks its inputs again per call.
"""

from __future__ import annotations

import torch

from ..config import HGAConfig
from . import cuda_ops
from .cuda_ops import CudaOps
from .torch_ops import TorchOps


def kernel_blockers(
    cfg: HGAConfig,
    device: torch.device | str,
    dtype: torch.dtype | None,
    head_size: int,
    built: bool | None = None,
) -> list[str]:
    """Why the CUDA kernels cannot run this layer (empty: they can).

    dtype None: the model dtype is not known to the caller (tests); it is then not checked.
    built: whether the extension loads on a visible GPU; None finds out, a bool lets a
    caller ask about the configuration alone.
    """
    device = torch.device(device)
    reasons = []
    if device.type != "cuda":
        reasons.append(f"tensors on {device.type}, not CUDA")
    elif not (cuda_ops.available() if built is None else built):
        why = cuda_ops.IMPORT_ERROR or "no CUDA device visible"
        reasons.append(f"no CUDA kernels (vllm_hga._C) on a GPU: {why}")
    if dtype is not None and dtype not in cuda_ops.DTYPES:
        reasons.append(f"no kernels for {dtype}")
    if head_size not in cuda_ops.HEAD_SIZES:
        reasons.append(f"no kernels for head size {head_size} (built: {cuda_ops.HEAD_SIZES})")
    if cfg.group_score not in cuda_ops.KERNEL_GROUP_SCORES:
        reasons.append(f"group_score {cfg.group_score} routes in torch (no kernels read it yet)")
    if cfg.topk_chunks > cuda_ops.MAX_TOPK_CHUNKS:
        reasons.append(f"topk_chunks > {cuda_ops.MAX_TOPK_CHUNKS}")
    return reasons


def ops_for(
    cfg: HGAConfig, device: torch.device | str, dtype: torch.dtype | None, head_size: int
) -> TorchOps:  # CudaOps is a TorchOps
    """CudaOps where the kernels serve this layer, else TorchOps (same methods)."""
    if kernel_blockers(cfg, device, dtype, head_size):
        return TorchOps()
    return CudaOps()
