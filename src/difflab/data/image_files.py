"""A directory tree of image files: finding them, labelling them, decoding them with PIL.

Rules:
- files are found recursively; extensions (any case): IMAGE_EXTENSIONS; other files and hidden
  files or folders (name starting with ".") are ignored;
- labels: when every image sits below a top-level subfolder, label = index of that subfolder's
  name in sorted order (num_classes = number of such subfolders); when any image sits directly
  in the root, the folder is unlabelled (every label 0, num_classes None);
- decoding: convert to "L" (channels=1) or "RGB" (channels=3), resize the shorter side to
  image_size and center-crop (PIL bicubic, which antialiases when shrinking).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from difflab.data.errors import DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageFileIndex:
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...] | None  # None: unlabelled folder


def _image_files(root: Path) -> list[Path]:
    found = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found += [
            Path(folder, f) for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def scan_image_folder(root: Path) -> ImageFileIndex:
    """Index the images below `root`; raises naming `root` when it is missing or has none."""
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"image folder root={root} {what}; give an existing directory")
    paths = _image_files(root)
    if not paths:
        raise DatasetNotFoundError(
            f"image folder root={root} contains no images; allowed extensions (any case, "
            f"searched recursively): {', '.join(IMAGE_EXTENSIONS)}"
        )
    top = [p.relative_to(root).parts[0] for p in paths]
    if any(p.parent == root for p in paths):
        return ImageFileIndex(paths=tuple(paths), labels=(0,) * len(paths), classes=None)
    classes = tuple(sorted(set(top)))
    index = {name: i for i, name in enumerate(classes)}
    return ImageFileIndex(paths=tuple(paths), labels=tuple(index[t] for t in top), classes=classes)


def check_images_open(paths: tuple[Path, ...]) -> None:
    """Open each header with PIL (cheap: no pixel decoding); raise naming the first bad file."""
    for path in paths:
        try:
            with Image.open(path):  # parses the header only
                pass
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(
                f"image file {path} cannot be opened by PIL ({type(err).__name__}: {err}); "
                f"remove it or give it an extension outside {IMAGE_EXTENSIONS}"
            ) from err


def load_image(path: Path, *, image_size: int, channels: int) -> torch.Tensor:
    """One file -> uint8 (channels, image_size, image_size)."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as err:
        raise OSError(f"cannot decode image file {path}: {err}") from err
    array = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W) or (H, W, 3)
    return array.unsqueeze(0) if channels == 1 else array.permute(2, 0, 1).contiguous()


class ImageFiles(Dataset):
    """Decodes files lazily, a batch per `__getitems__` call (in a worker when num_workers > 0)."""

    def __init__(self, *, index: ImageFileIndex, image_size: int, channels: int) -> None:
        self.index = index
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.index.paths[i], image_size=self.image_size, channels=self.channels)
        return image, torch.tensor(self.index.labels[i], dtype=torch.int64)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[i] for i in indices]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
