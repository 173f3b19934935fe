"""Checkpoints beyond Lightning's epoch-end ones: every N steps or every so much training time, and a
SLURM preemption checkpoint taken at a step boundary.

Lightning's SLURM handler saves `hpc_ckpt_<n>.ckpt` inside the signal handler, wherever the signal
lands (mid-forward, between the optimizer step and the EMA update, ...), so the run resumed from it
is not the run that was interrupted. `RequeueOnSignal` only notes the signal; the checkpoint is taken
at the end of the current training step (all processes at the same step), then the job is requeued.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger("difflab")


def parse_interval(value: str | int | float | timedelta | None) -> timedelta | None:
    """'DD:HH:MM:SS' / 'HH:MM:SS' / 'MM:SS' (as trainer.max_time), seconds, or a timedelta -> timedelta."""
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(:\d+){0,3}", value.strip()):
        seconds = 0.0
        for part, unit in zip(reversed(value.strip().split(":")), (1, 60, 3600, 86400)):
            seconds += int(part) * unit
    else:
        raise ValueError(f"train_time_interval={value!r} is not allowed; give 'HH:MM:SS' (or 'DD:HH:MM:SS'), "
                         "a number of seconds, or null")
    if seconds <= 0:
        raise ValueError(f"train_time_interval={value!r} is not allowed; it must be longer than 0 s (null: off)")
    return timedelta(seconds=seconds)


class PeriodicCheckpoint(ModelCheckpoint):
    """checkpoints/step-<step>.ckpt every `every_n_train_steps` optimizer steps or every
    `train_time_interval` of training (one of the two; both off by default), the newest `keep` kept.

    Lightning's ModelCheckpoint with monitor="step" (newest wins); written through the trainer's
    AtomicCheckpointIO like every checkpoint, so a kill never leaves a half-written file.
    """

    def __init__(self, *, dirpath: str, every_n_train_steps: int = 0,
                 train_time_interval: str | int | float | timedelta | None = None, keep: int = 2,
                 filename: str = "step-{step:07d}") -> None:
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int) or every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} is not allowed; an integer >= 0 (0: off)")
        interval = parse_interval(train_time_interval)
        if every_n_train_steps and interval is not None:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} and train_time_interval="
                             f"{train_time_interval!r} are both set; choose one (Lightning's ModelCheckpoint takes one)")
        if isinstance(keep, bool) or not isinstance(keep, int) or not (keep == -1 or keep >= 1):
            raise ValueError(f"keep={keep!r} is not allowed; the number of newest periodic checkpoints kept "
                             "(>= 1), or -1 for all")
        super().__init__(dirpath=dirpath, filename=filename, monitor="step", mode="max", save_top_k=keep,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=0,
                         train_time_interval=interval, auto_insert_metric_name=False, save_last=False,
                         save_on_train_epoch_end=False)

    @property
    def enabled(self) -> bool:
        """Whether this callback writes anything at all."""
        return bool(self._every_n_train_steps) or self._train_time_interval is not None


class RequeueOnSignal(pl.Callback):
    """On `signal_name` (SLURM's warning before preemption or the time limit): at the end of the
    current training step save <run dir>/hpc_ckpt_<n>.ckpt on every process, then `scontrol requeue`
    the job from rank zero. SLURM then stops the job (SIGTERM, which Lightning handles), and the
    requeued job resumes from the checkpoint."""

    def __init__(self, *, signal_name: str, job_id: str, run_dir: str | Path,
                 requeue_command: tuple[str, ...] = ("scontrol", "requeue")) -> None:
        self.signum = signal.Signals[f"SIG{signal_name.upper().removeprefix('SIG')}"]
        if not re.fullmatch(r"[0-9_]+", job_id):
            raise ValueError(f"SLURM job id {job_id!r} is not a job id ('<id>' or '<array id>_<task>')")
        self.job_id, self.run_dir, self.requeue_command = job_id, Path(run_dir), tuple(requeue_command)
        self.requested = False

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True  # only a flag: the work happens at the next step boundary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(self.signum, self._note)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and signal.getsignal(self.signum) == self._note:
            signal.signal(self.signum, signal.SIG_DFL)

    def hpc_path(self) -> Path:
        """<run dir>/hpc_ckpt_<n>.ckpt, n one more than the highest there (Lightning's naming)."""
        taken = [int(m.group(1)) for p in self.run_dir.glob("hpc_ckpt_*.ckpt")
                 if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
        return self.run_dir / f"hpc_ckpt_{max(taken, default=0) + 1}.ckpt"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # one decision for all processes (a signal may reach them at different steps)
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        path = trainer.strategy.broadcast(self.hpc_path())
        log.info("requeue signal %s: saving %s at global step %d", self.signum.name, path, trainer.global_step)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            result = subprocess.call([*self.requeue_command, self.job_id])
            if result == 0:
                log.info("requeued SLURM job %s", self.job_id)
            else:
                log.warning("requeueing SLURM job %s failed (%s exited with %d); training goes on",
                            self.job_id, " ".join(self.requeue_command), result)
