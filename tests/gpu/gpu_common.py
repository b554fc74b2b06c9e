"""Shared by the GPU tests: tolerances and the relative error they are checked with."""

from __future__ import annotations

import torch

# ||out - ref|| / ||ref|| bounds by output dtype (fp32 math inside every kernel)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.to(out.device, torch.float64)
    assert not torch.isnan(out).any(), "NaN in output (unwritten or poisoned element)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
