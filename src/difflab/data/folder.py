"""A directory of images of any size (see image_files.py for the labelling and decoding rules).

Images are decoded lazily per batch (folders can be large; num_workers decode in parallel).
`in_memory=True` decodes every image once in setup and keeps uint8 (N, C, H, W) in memory,
the fast path for small folders: about N * C * image_size**2 bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule
from difflab.data.image_files import (
    ImageFileIndex,
    ImageFiles,
    check_images_open,
    scan_image_folder,
)
from difflab.data.memory import InMemoryImages

_DECODE_CHUNK = 256


class ImageFolderDataModule(ImageDataModule):
    """Images below `root`, labelled by top-level subfolder when every image sits in one."""

    def __init__(
        self,
        *,
        root: str | Path = "data/images",
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.05,
        seed: int = 0,
        hflip: bool = True,
        in_memory: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size, channels=channels, batch_size=batch_size,
            num_workers=num_workers, val_fraction=val_fraction, seed=seed, hflip=hflip,
            pin_memory=pin_memory,
        )
        self.root = Path(root).expanduser().absolute()
        self.in_memory = in_memory
        self._index: ImageFileIndex | None = None

    @property
    def index(self) -> ImageFileIndex:
        """The scanned file list (scanned on first use; raises naming root if missing or empty)."""
        if self._index is None:
            self._index = scan_image_folder(self.root)
        return self._index

    @property
    def num_classes(self) -> int | None:
        classes = self.index.classes
        return None if classes is None else len(classes)

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.index.classes

    def _build_dataset(self) -> Dataset:
        check_images_open(self.index.paths)
        files = ImageFiles(index=self.index, image_size=self.image_size, channels=self.channels)
        return _decode_all(files) if self.in_memory else files


def _decode_all(files: ImageFiles) -> InMemoryImages:
    chunks = [
        files.__getitems__(list(range(start, min(start + _DECODE_CHUNK, len(files)))))
        for start in range(0, len(files), _DECODE_CHUNK)
    ]
    images = torch.cat([x for x, _ in chunks])  # (N, C, H, W) uint8
    return InMemoryImages(images=images, labels=torch.cat([y for _, y in chunks]))
