"""SLURM preemption and hard kills on real training processes: the requeue signal reaches a training
process, which checkpoints at the end of that step and calls `scontrol requeue`; the same command (the
requeued job) resumes from it; and SIGKILLs at random moments while checkpoints are written every
step never leave a run that cannot resume. Both end bit for bit where straight training ends.

SLURM is imitated by its environment variables and a `scontrol` on PATH that records its arguments
and then, as SLURM does when it requeues a running job, sends SIGTERM to the job.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume import EXACT, TESTS, assert_same_run, cli, csv_rows, load

pytestmark = pytest.mark.slow

STEPS = 30  # epochs of 4 steps (EXACT)
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
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    cli("difflab.cli.train", *EXACT, f"trainer.max_steps={STEPS}", f"hydra.run.dir={root / 'run'}", cwd=root)
    return root / "run"


def test_preemption_signal_mid_epoch_checkpoints_requeues_and_resumes_exactly(straight, tmp_path):
    # no periodic checkpoints; W&B (offline), CSV and TensorBoard
    args = [a for a in EXACT if not a.startswith(("callbacks.checkpoint", "logger="))] + ["logger=many"]
    signal_at = ["+callbacks.signal._target_=hydra_test_targets.SignalAtStep", "+callbacks.signal.step=5"]
    cmd = [sys.executable, "-m", "difflab.cli.train", *args, *signal_at, f"trainer.max_steps={STEPS}"]  # no hydra.run.dir
    env = slurm_env(tmp_path)
    run_dir = tmp_path / "outputs" / f"slurm-{JOB_ID}"  # from SLURM_JOB_ID, the same for the requeued job

    # SIGUSR2 (what SLURM sends signal_delay_s before preempting) lands inside step 5, the second of epoch 2
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]  # Lightning exits cleanly after SIGTERM
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert load(hpc)["global_step"] == 6  # taken at the end of the step the signal landed in
    first = json.loads((run_dir / "status.json").read_text())
    assert first["status"] == "interrupted" and first["global_step"] == 6, first

    # the requeued job: the same command and job id, ckpt_path=null
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in out
    second = json.loads((run_dir / "status.json").read_text())
    assert second["status"] == "finished" and second["global_step"] == STEPS
    assert_same_run(load(straight / "checkpoints" / "last.ckpt"), load(run_dir / "checkpoints" / "last.ckpt"))
    assert csv_rows(run_dir) == csv_rows(straight)  # one CSV: every step once, the same losses
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]  # no second requeue
    # the requeued job continued the same W&B run (offline: a second folder with the same run id)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb" / "difflab_run_id").read_text().strip()
    assert len(runs) == 2 and all(p.name.split("-")[-1] == run_id or p.name.split("-")[-2] == run_id for p in runs), runs


def newest_step(run_dir: Path) -> int:
    """The highest step-<k>.ckpt name in the run's checkpoints (read from names: files may be mid-write)."""
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step-*.ckpt")
             if (m := re.fullmatch(r"step-(\d+)\.ckpt", p.name))]
    return max(steps, default=0)


def test_sigkill_at_random_moments_never_leaves_a_run_that_cannot_resume(straight, tmp_path):
    from difflab.lit.checkpoint_io import resume_candidates, safe_load

    rng = random.Random(17)
    run = tmp_path / "run"
    args = [*EXACT, "callbacks.checkpoint.keep=2", f"trainer.max_steps={STEPS}", "ckpt_path=last", f"hydra.run.dir={run}"]
    env = slurm_env(tmp_path) | {"SLURM_JOB_ID": ""}  # not a SLURM job: only the PYTHONPATH and thread settings
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    kills = 0
    for _ in range(3):
        reached = newest_step(run) if run.exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "difflab.cli.train", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 200
        while proc.poll() is None and newest_step(run) <= reached and time.monotonic() < deadline:
            time.sleep(0.01)  # until this process trains and writes checkpoints
        time.sleep(rng.uniform(0.0, 0.8))  # then a random moment: mid-step, mid-save, mid-validation
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for path in resume_candidates(run):  # last.ckpt and every periodic checkpoint load
            assert safe_load(path)["global_step"] >= 1, path
    assert kills >= 2  # the moments fell inside training
    cli("difflab.cli.train", *args, cwd=tmp_path)  # resumes from the newest and finishes
    assert_same_run(load(straight / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt"))
    assert not list((run / "checkpoints").glob(".*.tmp-*"))  # the temporaries killed saves left are gone
    # each step logged once with the straight run's loss; a kill may lose the one row logged after the
    # checkpoint it resumes from (the row is written just after the checkpoint)
    rows, expected = csv_rows(run)["train/loss"], dict(csv_rows(straight)["train/loss"])
    steps = [s for s, _ in rows]
    assert len(steps) == len(set(steps)) and len(steps) >= STEPS - kills, steps
    assert all(expected[s] == v for s, v in rows)
