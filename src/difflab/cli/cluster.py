"""SLURM: a run directory that survives requeueing, and Lightning's requeue handler on the configured signal.

On preemption (or near the time limit) SLURM sends the requeue signal to every task. Lightning's
SLURMEnvironment handler saves `<default_root_dir>/hpc_ckpt_<n>.ckpt` and runs `scontrol requeue
<job id>`; the requeued job keeps its job id, so `run_id()` gives it the same run directory, and
Lightning resumes from the newest hpc_ckpt there when `fit(ckpt_path=None)`.
"""

from __future__ import annotations

import logging
import os
import signal

from lightning_fabric.plugins.environments import SLURMEnvironment

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


def slurm_plugins(*, auto_requeue: bool, signal_name: str) -> list[SLURMEnvironment]:
    """[SLURMEnvironment listening on signal_name] when this process was started by srun, else []."""
    sig = requeue_signal(signal_name)  # validated everywhere, not only on the cluster
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=sig)]


def hand_signal_to_lightning(env: SLURMEnvironment) -> None:
    """Remove an earlier handler of the requeue signal so Lightning installs its own.

    Lightning skips its requeue handler when one is already installed, and submitit installs one
    for USR2 that requeues without saving a checkpoint; the requeued job would start over.
    """
    sig = env.requeue_signal
    if env.auto_requeue and sig is not None and signal.getsignal(sig) not in (None, signal.SIG_DFL):
        log.info("SLURM: replacing the existing %s handler %r by Lightning's checkpoint-and-requeue handler",
                 sig.name, signal.getsignal(sig))
        signal.signal(sig, signal.SIG_DFL)
