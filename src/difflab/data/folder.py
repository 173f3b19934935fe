"""A directory of images of any size (see image_files.py for the labelling and decoding rules).

Images are decoded lazily per batch (folders can be large; num_workers decode in parallel).
`in_memory=True` decodes every image once in setup and keeps uint8 (N, C, H, W) in memory,
the fast path for small folders: about N * C * image_size**2 bytes.
`captions=True` reads each image's captions from sidecar files in setup (data/caption_files.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule
from difflab.data.caption_files import read_caption_files
from difflab.data.image_files import (
    ImageFileIndex,
    ImageFiles,
    check_images_open,
    scan_image_folder,
)
from difflab.data.memory import InMemoryImages

_DECODE_CHUNK = 256


@dataclass(kw_only=True, eq=False)
class ImageFolderDataModule(ImageDataModule):
    """Images below `root`, labelled by top-level subfolder when every image sits in one."""

    root: str | Path  # searched recursively; becomes an absolute Path
    in_memory: bool  # True: decode every image once in setup and keep uint8 in memory

    def __post_init__(self) -> None:
        super().__post_init__()
        self.root = Path(self.root).expanduser().absolute()
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

    def _caption_phrasings(self, full: Dataset) -> list[tuple[str, ...]]:
        """Per image, its captions from `<image>.txt` / root/captions.jsonl (data/caption_files.py)."""
        return read_caption_files(self.root, self.index.paths)


def _decode_all(files: ImageFiles) -> InMemoryImages:
    chunks = [
        files.__getitems__(list(range(start, min(start + _DECODE_CHUNK, len(files)))))
        for start in range(0, len(files), _DECODE_CHUNK)
    ]
    images = torch.cat([x for x, _ in chunks])  # (N, C, H, W) uint8
    return InMemoryImages(images=images, labels=torch.cat([y for _, y in chunks]))
