"""Reader for CIFAR-10's python batches (`cifar-10-batches-py/data_batch_1..5`).

Each batch is a pickle holding "data", uint8 (N, 3072) rows of R, G, B planes of 32x32, and
"labels", N ints. We read them ourselves, so a folder in this layout needs no md5 match.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _entry(entry: dict, key: str, path: Path):
    for k in (key, key.encode()):
        if k in entry:
            return entry[k]
    raise ValueError(
        f"{path} is not a CIFAR-10 batch: no {key!r} key (found {sorted(map(str, entry))})"
    )


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 (N, 3, 32, 32), int64 (N,)."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(_entry(entry, "data", path), dtype=np.uint8)
    labels = np.asarray(_entry(entry, "labels", path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data (N, 3072) and N labels, got data {data.shape} and "
            f"{labels.shape[0]} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_train(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All five training batches of `folder` -> uint8 (50000, 3, 32, 32), int64 (50000,)."""
    parts = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def has_cifar10_train(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CIFAR10_TRAIN_BATCHES)
