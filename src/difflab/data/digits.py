"""scikit-learn's handwritten digits: the embedded default dataset, no download needed."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule
from difflab.data.memory import InMemoryImages
from difflab.data.transforms import convert_channels, resize_uint8


@lru_cache(maxsize=1)
def _load_digits_cached() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32)  # (N, 8, 8) in [0, 16]
    images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return images, torch.from_numpy(bunch.target).to(torch.int64)


def load_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 real 8x8 digits of `sklearn.datasets.load_digits`: uint8 (N, 1, 8, 8), int64 (N,).

    Values 0..16 are scaled to 0..255 (x * 255 / 16, rounded). Parsed once per process.
    """
    images, labels = _load_digits_cached()
    return images.clone(), labels.clone()


class DigitsDataModule(ImageDataModule):
    """sklearn digits resized (bilinear, antialiased) to image_size; 10 classes.

    num_workers defaults to 0: the whole set is ~0.5 MB in memory and a batch is one index op,
    so worker processes would cost more to start than they save.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        image_size: int = 16,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        hflip: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size, channels=channels, batch_size=batch_size,
            num_workers=num_workers, val_fraction=val_fraction, seed=seed, hflip=hflip,
            pin_memory=pin_memory,
        )

    def _build_dataset(self) -> Dataset:
        images, labels = load_digits_uint8()
        images = convert_channels(resize_uint8(images, self.image_size), self.channels)
        return InMemoryImages(images=images, labels=labels)
