"""Pixel conversions shared by every dataset: uint8 storage <-> model range [-1, 1].

Images are stored as uint8 (N, C, H, W) and converted per batch, so memory stays at one byte per
pixel and the float conversion costs one vectorised op per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALLOWED_CHANNELS = (1, 3)
_RESIZE_CHUNK = 4096  # images resized per interpolate call, bounds the float32 copy in memory


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1), any shape."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got dtype {x.dtype}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255]; values outside [-1, 1] are clamped, any shape."""
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expects a floating point tensor, got dtype {x.dtype}")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_channels(channels: int) -> None:
    if channels not in ALLOWED_CHANNELS:
        raise ValueError(f"channels={channels!r} is not supported; allowed: {ALLOWED_CHANNELS}")


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C_in, H, W) with C_in in {1, 3} -> uint8 (N, channels, H, W).

    Grey -> RGB repeats the plane; RGB -> grey uses ITU-R 601-2 luma, as PIL's convert("L").
    """
    check_channels(channels)
    c_in = images.shape[1]
    if c_in == channels:
        return images
    if c_in == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (images.to(torch.float32) * weights).sum(dim=1, keepdim=True)
    return grey.round().clamp(0, 255).to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = []
    for chunk in images.split(_RESIZE_CHUNK):
        resized = F.interpolate(
            chunk.to(torch.float32), size=(size, size), mode="bilinear",
            align_corners=False, antialias=True,
        )
        chunks.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)


class BatchToModelRange:
    """collate_fn: (uint8 (B, C, H, W), int64 (B,)[, captions]) -> (float32 in [-1, 1], int64[, captions]).

    Random flips are not drawn here (a global RNG draw in a collate_fn depends on prefetching and
    worker seeding): the train sampler decides them from (seed, epoch, index), see data/base.py.
    """

    def __call__(self, batch: tuple | list[tuple[torch.Tensor, int]]) -> tuple:
        if isinstance(batch, list):  # a dataset without __getitems__: one (image, label) per item
            batch = torch.stack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch])
        images, labels, *captions = batch  # captions (a list[str]) with data.captions=true
        return (to_model_range(images), labels, *captions)
