"""Thresholding of the x0 estimate: static clipping and Imagen's dynamic thresholding (one place for both)."""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """s = max(1, quantile_p |x0|) per sample, x0 -> clamp(x0, -s, s) / s (Saharia et al. 2022, Imagen, Sec. 2.3)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_percentile={percentile!r} must be in (0, 1]; Imagen uses 0.995")
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)  # (B,)
    s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def check_dynamic_percentile(percentile: float | None) -> None:
    """None (off) or a number in (0, 1]."""
    if percentile is not None and (isinstance(percentile, bool) or not 0.0 < float(percentile) <= 1.0):
        raise ValueError(f"dynamic_percentile={percentile!r} must be in (0, 1] (Imagen: 0.995) or null for none")


def threshold_x0(x0: Tensor, *, clip_x0: bool, dynamic_percentile: float | None) -> Tensor:
    """Dynamic thresholding when a percentile is set (it takes precedence), else clamp to [-1, 1] if clip_x0."""
    if dynamic_percentile is not None:
        return dynamic_threshold(x0, dynamic_percentile)
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0
