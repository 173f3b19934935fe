"""Image conventions of the metrics room: uint8 tensors (B, C, H, W) with C in {1, 3}."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALLOWED_CHANNELS = (1, 3)


def check_images(images: Tensor) -> None:
    """Raise unless `images` is a uint8 tensor (B, C, H, W) with C = 1 or 3."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"metrics expect uint8 images in [0, 255], got {got}; "
            "convert float images in [-1, 1] with difflab.data.to_uint8"
        )
    if images.dim() != 4 or images.shape[1] not in ALLOWED_CHANNELS:
        raise ValueError(
            f"metrics expect images shaped (B, C, H, W) with C in {ALLOWED_CHANNELS}, "
            f"got shape {tuple(images.shape)}"
        )


def to_rgb(images: Tensor) -> Tensor:
    """Repeat a grey channel three times; RGB passes through.  # (B, 3, H, W)"""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of float images to (size, size) with antialiasing; no-op when already there."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
