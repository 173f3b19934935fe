"""Snapshots of the power-function EMA profiles during training, for post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3.2).

With `module.ema=power` rank zero writes <dirpath>/step-<step>.pt every N optimizer steps (by default N makes
about `num_snapshots` over the run) and at the end of training: the module's public `ema_snapshot()`, float32
tensors and plain containers (torch.load(weights_only=True) reads it), through the trainer's checkpoint IO (an
atomic write with difflab's AtomicCheckpointIO). The profiles are identical on every rank (they average the
all-reduced net). With `module.ema=constant` the callback does nothing.

Exact resume: the profiles travel in the checkpoint (module state) and N follows from the run's length, so a
resumed run snapshots the same steps. On a resume the snapshots after the resumed step are removed (the
abandoned continuation wrote them; they are written again), and a snapshot due at the resumed step that the
interrupted run did not write is written from the restored profiles.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("difflab")

SNAPSHOT_NAME = re.compile(r"step-(\d+)\.pt")


def snapshot_path(dirpath: str | Path, step: int) -> Path:
    """<dirpath>/step-<step, 7 digits>.pt"""
    return Path(dirpath) / f"step-{step:07d}.pt"


def snapshot_steps(dirpath: str | Path) -> dict[int, Path]:
    """{step: path} of the snapshot files in dirpath (none when it does not exist)."""
    found = {}
    for path in Path(dirpath).glob("step-*.pt"):
        if (m := SNAPSHOT_NAME.fullmatch(path.name)) and path.is_file():
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


class EMASnapshots(pl.Callback):
    """Every N optimizer steps and at the end of training, rank zero writes the power-function EMA profiles."""

    def __init__(self, *, dirpath: str, every_n_steps: int | None = None, num_snapshots: int = 50) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps={every_n_steps!r} is not allowed; an integer >= 1, or null (about "
                             "num_snapshots over the run)")
        if isinstance(num_snapshots, bool) or not isinstance(num_snapshots, int) or num_snapshots < 2:
            raise ValueError(f"num_snapshots={num_snapshots!r} is not allowed; an integer >= 2 (EDM2-style "
                             "reconstruction needs snapshots spread over the run; ~50 is plenty)")
        self.dirpath, self.every_n_steps, self.num_snapshots = Path(dirpath), every_n_steps, num_snapshots
        self.every = 0  # resolved at each fit from the run's length: a resumed run gets the same N
        self.active = False
        self._written = -1

    def resolve_every(self, trainer: pl.Trainer) -> int:
        """every_n_steps, or the run's optimizer steps / num_snapshots (rounded up)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError("callbacks.ema_snapshots cannot tell how long this run is (trainer.max_steps=-1 and no "
                             "epoch limit); set callbacks.ema_snapshots.every_n_steps")
        return max(1, math.ceil(total / self.num_snapshots))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = getattr(pl_module, "power_ema", None) is not None
        if not self.active:
            return
        self.every = self.resolve_every(trainer)
        step = trainer.global_step
        if trainer.is_global_zero:
            stale = [p for s, p in snapshot_steps(self.dirpath).items() if s > step]
            for path in stale:
                path.unlink()
            if stale:
                log.warning("EMA snapshots: removed %d snapshot(s) after step %d in %s (another continuation of "
                            "this run wrote them)", len(stale), step, self.dirpath)
        log.info("EMA snapshots: profiles sigma_rel=%s every %d steps into %s",
                 list(pl_module.power_ema.sigma_rels), self.every, self.dirpath)
        if step > 0 and step % self.every == 0 and not snapshot_path(self.dirpath, step).is_file():
            self._write(trainer, pl_module)  # the interrupted run saved its checkpoint but not this snapshot

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.active and step > 0 and step % self.every == 0 and step != self._written:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and not trainer.interrupted and trainer.global_step > 0 and trainer.global_step != self._written:
            self._write(trainer, pl_module)  # the final weights, whatever the spacing

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = step = trainer.global_step
        if trainer.is_global_zero:
            path = snapshot_path(self.dirpath, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(pl_module.ema_snapshot(), path)
