"""Test-only objects that CLI runs load through Hydra `_target_` (the tests put this folder on
PYTHONPATH): a per-rank weight dump, a signal at a chosen step, a net that turns NaN."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from difflab.nets.unet import UNet


class RankWeights(pl.Callback):
    """At the end of training every rank saves its weights (net, EMA) and the sizes of its batches to out_dir/rank<r>.pt."""

    def __init__(self, *, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batch_sizes: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self.batch_sizes.append(int(batch[0].shape[0]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "world_size": trainer.world_size, "step": trainer.global_step,
                    "batch_sizes": self.batch_sizes}, self.out_dir / f"rank{trainer.global_rank}.pt")


class SignalAtStep(pl.Callback):
    """Send `signal_name` to this process when the batch of global step `step` starts: it lands inside
    that step, as SLURM's warning before a preemption may."""

    def __init__(self, *, step: int, signal_name: str = "USR2") -> None:
        self.step, self.signum = step, signal.Signals[f"SIG{signal_name}"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class DumpOnException(pl.Callback):
    """When training raises, save the in-memory net and EMA weights to `path` (to check they stayed finite)."""

    def __init__(self, *, path: str) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path)


class NaNAfterUNet(UNet):
    """The difflab U-Net whose output becomes NaN from its (nan_after + 1)-th training forward on;
    evaluation-mode calls (validation, sample grids) are not counted and stay finite."""

    def __init__(self, *, nan_after: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_after, self.calls = nan_after, 0

    def forward(self, x, t, cond=None):
        out = super().forward(x, t, cond)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.nan_after:
                return out * float("nan")
        return out


class SnapshotFiles(pl.Callback):
    """Copy the files of src_dir to dst_dir when the batch of global step `step` starts."""

    def __init__(self, *, step: int, src_dir: str, dst_dir: str) -> None:
        self.step, self.src_dir, self.dst_dir = step, Path(src_dir), Path(dst_dir)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.dst_dir.mkdir(parents=True, exist_ok=True)
            for f in self.src_dir.iterdir():
                (self.dst_dir / f.name).write_bytes(f.read_bytes())
