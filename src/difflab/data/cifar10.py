"""CIFAR-10: 50,000 training images of 32x32 RGB, 10 classes, from the python batches.

Only the five training batches are read; the held-out split for val/loss is taken from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.data.cifar_batches import (
    CIFAR10_FOLDER,
    CIFAR10_TRAIN_BATCHES,
    has_cifar10_train,
    read_cifar10_train,
)
from difflab.data.on_disk import DownloadableDataModule


@dataclass(kw_only=True, eq=False)
class CIFAR10DataModule(DownloadableDataModule):
    """CIFAR-10 from `root/cifar-10-batches-py` (torchvision's layout; it downloads there)."""

    def _torchvision_cls(self) -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    def _find(self) -> Path | None:
        folder = self.root / CIFAR10_FOLDER
        return folder if has_cifar10_train(folder) else None

    def _read(self, found: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return read_cifar10_train(found)

    def _how_to_place(self) -> str:
        return (
            f"place {', '.join(CIFAR10_TRAIN_BATCHES)} (from cifar-10-python.tar.gz) in "
            f"{self.root / CIFAR10_FOLDER}"
        )
