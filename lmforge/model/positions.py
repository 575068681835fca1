"""Position information: rotary embeddings (RoPE), sinusoidal and learned absolute embeddings.

RoPE convention: "rotate half" (the HF Llama layout). Dimension i of a head is paired with
dimension i + D/2 and the pair is rotated by angle pos · theta^(-2i/D). The original RoFormer pairs
adjacent dimensions (2i, 2i+1); both are the same function up to a fixed permutation of the q/k
projection rows, and choosing HF's layout means HF checkpoints import without permuting weights.

Llama-3.1 frequency scaling (`RopeScaling`) stretches the low frequencies for long contexts, so
Llama 3.x checkpoints import exactly.

Positions are explicit tensors (any integers, per row), so packed sequences can restart positions
at each document and decoding with a cache can continue from an offset. NoPE is simply not calling
`apply_rope` (see `ModelConfig.layer_pattern`). Learned absolute positions are an `Embedding` in
transformer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class RopeScaling:
    """Llama-3.1 RoPE scaling: frequencies whose wavelength exceeds original_context_length /
    low_freq_factor are divided by `factor`, those shorter than original_context_length /
    high_freq_factor are kept, and the band between is interpolated smoothly."""

    kind: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


def rope_inv_freq(dim: int, theta: float, device=None, dtype=torch.float32,
                  scaling: RopeScaling | None = None) -> torch.Tensor:
    """theta^(-2i/dim) for i in [0, dim/2), optionally rescaled (`RopeScaling`)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim))
    if scaling is None:
        return inv
    s = scaling
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_context_length / s.low_freq_factor
    high_wavelen = s.original_context_length / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype=torch.float32,
                 scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles: positions [...] -> two tensors [..., dim/2] (float32,
    or float64 when asked: float32 angles at position p are off by ~p·6e-8 radians)."""
    inv = rope_inv_freq(dim, theta, positions.device, dtype, scaling)
    angles = positions.to(dtype).unsqueeze(-1) * inv
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
               scaling: RopeScaling | None = None) -> torch.Tensor:
    """Rotate x [B, H, T, D] (or [B, T, D]) by its positions [B, T] or [T].

    Each pair (x_i, x_{i+D/2}) becomes (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin).
    Pass `cos_sin` (from rope_cos_sin) to reuse them across layers. Computed in float32 (float64
    for float64 inputs).
    """
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, d, theta, dtype, scaling)
    if x.dim() == 4:  # [B, H, T, D]: broadcast the angles over heads
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    xf = x.to(dtype)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. absolute encodings: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(...).

    positions [...] -> float32 [..., dim]."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    inv = torch.exp(-math.log(base) * torch.arange(0, dim, 2, device=positions.device,
                                                     dtype=torch.float32) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv
    return torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)
