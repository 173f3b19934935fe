"""Base for datasets whose files live under `root` and that torchvision can download there.

Reading is ours (idx / CIFAR batch readers): torchvision is used only to fetch the files, so
files placed by hand (or by a system package) need no network and no md5 match.
`prepare_data` (rank 0) downloads when the files are absent and `download=True`; `setup` reads
them into memory as uint8 once, resizes to image_size and converts to `channels`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule
from difflab.data.fetch import torchvision_download
from difflab.data.errors import DatasetNotFoundError
from difflab.data.memory import InMemoryImages
from difflab.data.transforms import convert_channels, resize_uint8


class DownloadableDataModule(ImageDataModule):
    num_classes = 10

    def __init__(
        self,
        *,
        root: str | Path,
        download: bool,
        image_size: int,
        channels: int,
        batch_size: int,
        num_workers: int,
        val_fraction: float,
        seed: int,
        hflip: bool,
        pin_memory: bool | None,
    ) -> None:
        super().__init__(
            image_size=image_size, channels=channels, batch_size=batch_size,
            num_workers=num_workers, val_fraction=val_fraction, seed=seed, hflip=hflip,
            pin_memory=pin_memory,
        )
        self.root = Path(root).expanduser().absolute()
        self.download = download

    # --- what a subclass provides -----------------------------------------------------------
    def _torchvision_cls(self) -> type:
        raise NotImplementedError

    def _find(self) -> object | None:
        """Locate the training files; None when absent."""
        raise NotImplementedError

    def _read(self, found: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Files from `_find` -> uint8 (N, C, H, W), int64 (N,)."""
        raise NotImplementedError

    def _how_to_place(self) -> str:
        """Where to put the files by hand, as a sentence fragment naming the root directory."""
        raise NotImplementedError

    # --- shared flow -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and self._find() is None:
            torchvision_download(
                self._torchvision_cls(), root=self.root, how_to_place=self._how_to_place()
            )

    def _load_uint8(self) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._find()
        if found is None:
            hint = (
                "prepare_data() downloads them (the Trainer calls it)" if self.download
                else "download=false, so no download was attempted"
            )
            raise DatasetNotFoundError(
                f"{type(self).__name__}: training files not found under root directory "
                f"{self.root}; {hint}. {self._how_to_place().capitalize()}, or set "
                f"download=true with network access."
            )
        return self._read(found)

    def _build_dataset(self) -> Dataset:
        images, labels = self._load_uint8()
        images = convert_channels(resize_uint8(images, self.image_size), self.channels)
        return InMemoryImages(images=images, labels=labels)
