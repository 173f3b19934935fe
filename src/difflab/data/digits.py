"""scikit-learn's handwritten digits: the embedded default dataset, no download needed."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(kw_only=True, eq=False)
class DigitsDataModule(ImageDataModule):
    """sklearn digits resized (bilinear, antialiased) to image_size; 10 classes."""

    num_classes = 10
    caption_set = "digits"  # data.captions=true: "a handwritten seven", "the digit 7", ...

    def _build_dataset(self) -> Dataset:
        images, labels = load_digits_uint8()
        images = convert_channels(resize_uint8(images, self.image_size), self.channels)
        return InMemoryImages(images=images, labels=labels)
