"""Base for datasets whose files live under `root` and that torchvision can download there.

Reading is ours (idx / CIFAR batch readers): torchvision is used only to fetch the files, so
files placed by hand (or by a system package) need no network and no md5 match.
`prepare_data` (rank 0) downloads when the files are absent and `download=True`; `setup` reads
them into memory as uint8 once, resizes to image_size and converts to `channels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule
from difflab.data.fetch import torchvision_download
from difflab.data.errors import DatasetNotFoundError
from difflab.data.memory import InMemoryImages
from difflab.data.transforms import convert_channels, resize_uint8


@dataclass(kw_only=True, eq=False)
class DownloadableDataModule(ImageDataModule):
    """A dataset of 10 classes read from files under `root`, which torchvision can download there."""

    num_classes = 10

    root: str | Path  # becomes an absolute Path
    download: bool  # False: never touch the network; missing files raise naming root

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root).expanduser().absolute()

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
            how = self._how_to_place()
            raise DatasetNotFoundError(
                f"{type(self).__name__}: training files not found under root directory "
                f"{self.root}; {hint}. {how[:1].upper() + how[1:]}, or set "
                f"download=true with network access."
            )
        return self._read(found)

    def _build_dataset(self) -> Dataset:
        images, labels = self._load_uint8()
        images = convert_channels(resize_uint8(images, self.image_size), self.channels)
        return InMemoryImages(images=images, labels=labels)
