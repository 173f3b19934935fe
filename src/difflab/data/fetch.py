"""Fetching a torchvision dataset's files, with a socket timeout and an error saying what to do."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difflab.data.errors import DatasetNotFoundError

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a blocked network fails instead of hanging


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_download(dataset_cls: type, *, root: Path, how_to_place: str) -> None:
    """Let torchvision fetch (and md5-check) the training files of `dataset_cls` into `root`."""
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            dataset_cls(root=str(root), train=True, download=True)
    except (RuntimeError, OSError) as err:
        raise DatasetNotFoundError(
            f"could not download {dataset_cls.__name__} into root directory {root} "
            f"({type(err).__name__}: {str(err).strip()[:300]}). Without network access, "
            f"{how_to_place}, or set download=false to skip the download attempt."
        ) from err
