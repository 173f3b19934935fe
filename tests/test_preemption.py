"""SLURM preemption on this machine: the requeue signal reaches a real training process, which saves
an hpc checkpoint and calls `scontrol requeue`; the same command (the requeued job) resumes from it.

SLURM is imitated by its environment variables and a `scontrol` on PATH that records its arguments
and then, as SLURM does when it requeues a running job, sends SIGTERM to the job.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_cli import TINY

pytestmark = pytest.mark.slow

JOB_ID = "4242"
SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_SCONTROL_LOG"
kill -TERM $PPID
"""


def slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return env | {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "difflab-test", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
    }


def train_rows(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_preemption_signal_checkpoints_requeues_and_resumes(tmp_path):
    n_steps = 40
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.limit_train_batches", "callbacks.sample_grid"))]
    cmd = [sys.executable, "-m", "difflab.cli.train", *args, f"trainer.max_steps={n_steps}", "callbacks.sample_grid=null",
           "trainer.limit_train_batches=8", "+logger.csv.flush_logs_every_n_steps=1"]  # no hydra.run.dir: derived
    env = slurm_env(tmp_path)
    run_dir = tmp_path / "outputs" / f"slurm-{JOB_ID}"  # from SLURM_JOB_ID, the same for the requeued job
    metrics = run_dir / "csv" / "metrics.csv"

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and train_rows(metrics)):  # training runs: Lightning's handlers are installed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # what SLURM sends signal_delay_s before preempting the job
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]  # Lightning exits cleanly after SIGTERM

    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    k = torch.load(hpc, weights_only=True)["global_step"]
    first = json.loads((run_dir / "status.json").read_text())
    assert first["status"] == "interrupted" and 1 <= k <= first["global_step"] < n_steps, (k, first)
    steps_run1 = train_rows(metrics)
    assert steps_run1 == list(range(first["global_step"])), steps_run1

    # the requeued job: the same command and job id
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in out
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == n_steps
    second = json.loads((run_dir / "status.json").read_text())
    assert second["status"] == "finished" and second["global_step"] == n_steps
    # run 2 ran the optimizer steps k+1..n only: it continued from the checkpoint instead of starting
    # over (Lightning's CSVLogger deletes the old metrics.csv when it starts again, so these are run 2's)
    steps_run2 = train_rows(metrics)
    assert len(steps_run2) == n_steps - k, (k, steps_run2)
    assert steps_run2 == list(range(steps_run2[0], steps_run2[0] + n_steps - k)) and steps_run2[0] in (k, k + 1)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]  # no second requeue
