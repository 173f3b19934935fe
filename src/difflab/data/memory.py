"""A dataset over images decoded once and held in memory as one uint8 tensor."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) with int64 labels (N,).

    `__getitems__` lets the DataLoader fetch a whole batch with one index op instead of
    B item calls and a stack; BatchToModelRange then converts that batch.
    """

    def __init__(self, *, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got dtype {images.dtype} "
                f"shape {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx]  # (B, C, H, W) uint8, (B,) int64
