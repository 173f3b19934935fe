"""Checkpoint writing that never leaves a half-written file in place of a good one."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


# Globals a difflab checkpoint may hold beyond tensors and plain containers. Nothing so far:
# configs are stored as plain containers, RNG states as tensors and tuples (difflab.lit.resume).
SAFE_GLOBALS: list[Any] = []


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects that loading would have to execute."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or not a torch checkpoint at all."""


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True): tensors and plain containers only, never pickled code;
    a truncated or foreign file is refused by name (CorruptCheckpointError) and left as it is."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as err:  # zip reader: "failed finding central directory", short reads
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CorruptCheckpointError(
            f"checkpoint {str(path)!r} ({size} bytes) is truncated or not a torch checkpoint: "
            f"{str(err).splitlines()[0]}. difflab writes checkpoints atomically, so a file cut short comes "
            "from elsewhere (a copy or download); use another checkpoint, e.g. a best-*.ckpt of the same run"
        ) from err
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n\n")[-1].strip().splitlines()
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it holds pickled Python objects (not just tensors "
            f"and plain containers) whose loading would execute code [{'; '.join(reason[:2])}]. difflab "
            "checkpoints never contain such objects; only load files you trust through other means."
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a hidden temporary file in the same directory, then os.replace it over the target;
    load with weights_only=True (the resume path never executes pickled code).

    Lightning's own save truncates the target before writing, so a kill during a save of
    last.ckpt can destroy the previous good checkpoint; a rename within a directory is atomic.
    """

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):  # remote filesystems: Lightning's loader, still weights_only
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load(path, map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote filesystems: keep Lightning's behaviour
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
