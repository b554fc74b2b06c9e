"""What HGA needs to know about a model's rotary position embedding.

vLLM hands attention backends keys with RoPE already applied.  HGA's low-frequency
summary pairs are defined on *pre*-RoPE keys ("sum raw keys, rotate at the span's
middle"), which we recover exactly in rotated space:

    RoPE(sum_t k_raw_t, anchor) = sum_t R((anchor - p_t) * f_i) k_rope_t      (per pair i)

So all we need per rotary pair is its angular frequency f_i (scaling such as linear,
NTK, llama3 or YaRN only changes f_i; YaRN's magnitude factor cancels in the relative
rotation), the rotary dimension and the pairing layout (NeoX "rotate half" or GPT-J
interleaved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeSpec:
    head_size: int
    rotary_dim: int
    neox_style: bool  # True: pair i = (i, i + rotary_dim/2); False: (2i, 2i + 1)
    inv_freq: tuple[float, ...]  # rotary_dim // 2 angular frequencies, radians per position

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_size:
            raise ValueError(f"bad rotary_dim {self.rotary_dim} for head_size {self.head_size}")
        if len(self.inv_freq) != self.rotary_dim // 2:
            raise ValueError("inv_freq must hold rotary_dim // 2 frequencies")

    @classmethod
    def default(
        cls,
        head_size: int,
        theta: float = 10000.0,
        rotary_dim: int | None = None,
        neox_style: bool = True,
    ) -> RopeSpec:
        rd = rotary_dim or head_size
        freqs = tuple(theta ** (-(2.0 * i) / rd) for i in range(rd // 2))
        return cls(head_size, rd, neox_style, freqs)

    def pair_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the two components of each rotary pair."""
        half = self.rotary_dim // 2
        i = torch.arange(half)
        if self.neox_style:
            return i, i + half
        return 2 * i, 2 * i + 1

    def high_frequency(self, chunk_size: int, threshold: float) -> torch.Tensor:
        """Bool [rotary_dim//2]: pairs that turn more than `threshold` rad across a chunk."""
        f = torch.tensor(self.inv_freq, dtype=torch.float64)
        return (chunk_size - 1) * f > threshold

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x[..., T, H, D] by positions[T] (used by tests to make post-RoPE keys)."""
        return rotate(x, positions.to(torch.float64), self)


def rotate(
    x: torch.Tensor, angles_pos: torch.Tensor, spec: RopeSpec, pair_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate rotary pairs of x [T, H, D] by angle pos[T] * f_i, only where pair_mask.

    Computed in float64 and cast back, so relative rotations stay exact to rounding.
    """
    a_idx, b_idx = spec.pair_index()
    f = torch.tensor(spec.inv_freq, dtype=torch.float64, device=x.device)
    ang = angles_pos.to(torch.float64, copy=False).reshape(-1, 1) * f  # [T, P]
    if pair_mask is not None:
        ang = ang * pair_mask.to(ang.device)
    cos = torch.cos(ang).unsqueeze(1)  # [T, 1, P]
    sin = torch.sin(ang).unsqueeze(1)
    out = x.to(torch.float64).clone()
    a = out[..., a_idx.to(x.device)]
    b = out[..., b_idx.to(x.device)]
    out[..., a_idx.to(x.device)] = a * cos - b * sin
    out[..., b_idx.to(x.device)] = a * sin + b * cos
    return out.to(x.dtype)


def spec_from_vllm_rope(rope: torch.nn.Module, head_size: int) -> RopeSpec:
    """Read the frequencies back from a vLLM RotaryEmbedding's cos/sin cache.

    The cache row for position 1 holds (m cos f_i, m sin f_i) with f_i <= 1 rad, so
    atan2 recovers f_i without wrap-around, whatever scaling built it.
    """
    cache = rope.cos_sin_cache.detach().to(torch.float64)
    rotary_dim = int(rope.rotary_dim)
    half = rotary_dim // 2
    cos1, sin1 = cache[1, :half], cache[1, half:rotary_dim]
    freqs = torch.atan2(sin1, cos1)
    if torch.any(freqs <= 0) or torch.any(freqs > math.pi):
        raise ValueError("unexpected RoPE cache: frequencies outside (0, pi]")
    return RopeSpec(head_size, rotary_dim, bool(rope.is_neox_style), tuple(float(v) for v in freqs))
