"""SLURM: a run directory that survives requeueing, and a checkpoint-and-requeue on the configured signal.

On preemption (or near the time limit) SLURM sends the requeue signal to every task. difflab's
RequeueOnSignal callback (callbacks/checkpoint.py) saves `<run dir>/hpc_ckpt_<n>.ckpt` at the end of
the current step and runs `scontrol requeue <job id>` (Lightning's own handler, which saves inside
the signal handler wherever it lands, is switched off: auto_requeue=False on its SLURMEnvironment).
The requeued job keeps its job id, so `run_id()` gives it the same run directory, and
`difflab-train` resumes from the newest checkpoint there when `ckpt_path` is null.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment

from difflab.callbacks.checkpoint import RequeueOnSignal

log = logging.getLogger("difflab")

SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "CONT", "URG", "XCPU")


def slurm_job_id() -> str | None:
    """The SLURM job id of a batch job ('<array job>_<task>' for arrays); None outside SLURM or interactive."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # Lightning's interactive rule
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_id(default: str) -> str:
    """'slurm-<job id>' inside a SLURM batch job (stable across requeues, shared by all tasks), else default."""
    job = slurm_job_id()
    return f"slurm-{job}" if job else default


def requeue_signal(name: str) -> signal.Signals:
    """signal.SIGUSR2 for 'USR2' (or 'SIGUSR2'); refuses names SLURM's --signal cannot send."""
    short = str(name).upper().removeprefix("SIG")
    if short not in SIGNALS:
        raise ValueError(f"slurm.requeue_signal={name!r} is not supported; choose one of {SIGNALS}")
    return signal.Signals[f"SIG{short}"]


def slurm_plugins(*, signal_name: str) -> list[SLURMEnvironment]:
    """[SLURMEnvironment] when this process was started by srun, else []; its own requeue handler off
    (RequeueOnSignal does that at a step boundary). The signal name is validated everywhere."""
    sig = requeue_signal(signal_name)
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False, requeue_signal=sig)]


def requeue_callbacks(*, auto_requeue: bool, signal_name: str, run_dir: str | Path) -> list[RequeueOnSignal]:
    """[RequeueOnSignal] inside a SLURM batch job started by srun with auto_requeue, else []."""
    sig = requeue_signal(signal_name)
    job = slurm_job_id()
    if not (auto_requeue and job and SLURMEnvironment.detect()):
        return []
    return [RequeueOnSignal(signal_name=sig.name, job_id=job, run_dir=run_dir)]
