"""Sinusoidal embeddings of the diffusion time (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t as in Ho et al. 2020's code (`get_timestep_embedding`).

    Frequencies are w_i = exp(-log(max_period) * i / (half - 1)), i = 0..half-1, half = dim // 2,
    so they span exactly [1/max_period, 1]; the output is [sin(t w), cos(t w)] (sin half first),
    zero-padded by one column when dim is odd. This matches the original TF code and diffusers'
    DDPM configuration (flip_sin_to_cos=False, downscale_freq_shift=1). t may be integer or float
    (continuous-time callers usually pass 1000 * t or a log-sigma), shape (B,); the result is
    float32 of shape (B, dim).
    """
    if dim < 4:
        raise ValueError(f"timestep_embedding dim={dim} is too small; use dim >= 4")
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)  # (half,)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # (B, dim)
    return emb


class SinusoidalEmbedding(nn.Module):
    """Module wrapper of `timestep_embedding` (Ho et al. 2020); no parameters."""

    def __init__(self, *, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"SinusoidalEmbedding dim={dim} is too small; use dim >= 4")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim, max_period=self.max_period)  # (B, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}"
