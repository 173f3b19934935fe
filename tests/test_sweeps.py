"""Sweeps end to end: an Optuna search of 2 trials launched through submitit (hydra/launcher=submitit_local),
each trial evaluating itself and returning its optimized_metric; difflab-report on that real sweep;
the SLURM launcher's sbatch script; the stable SLURM run directory; bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from difflab.cli import report
from difflab.cli.cluster import requeue_callbacks, requeue_signal, run_id, slurm_job_id, slurm_plugins
from difflab.cli.config import config_dir
from difflab.cli.runs import run_status
from difflab.cli.train import check_optimized_metric, optimized_value
from test_cli import TINY

METRIC = "eval/fid/ddim-4"
SWEEP_ARGS = [  # TINY: 4 steps in 2 epochs of 2 batches, two validations (val/loss gets a best and a final)
    *(a for a in TINY if not a.startswith(("callbacks.evaluation", "model.ch", "model.attn"))),
    "model.ch=8", "model.attn_resolutions=[]",
    "callbacks.evaluation.metrics.extractor=efficientnet_lite0",  # weights ship in a package: no classifier to train
    "callbacks.evaluation.num_samples=10", "+callbacks.evaluation.reference_images=10",
    "callbacks.evaluation.every_n_steps=4", "callbacks.evaluation.samplers.ddim.steps=4",
    "+sampler@callbacks.evaluation.samplers.ddpm=ddpm",  # a second NFE for the quality-vs-NFE plot
    f"optimized_metric={METRIC}",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`difflab-train -m hparams_search=optuna hydra/launcher=submitit_local`: 2 trials, 2 submitit jobs."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "difflab.cli.train", "-m", "hparams_search=optuna", "hydra/launcher=submitit_local",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *SWEEP_ARGS,
         f"paths.cache_dir={root / 'cache'}", f"hydra.sweep.dir={root / 'sweep'}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root / "sweep"


@pytest.mark.slow
def test_submitit_optuna_sweep_runs_every_trial(sweep):
    runs = [sweep / "0", sweep / "1"]
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "checkpoints").glob("best-*.ckpt"))
        assert "val/loss" in (run / "csv" / "metrics.csv").read_text()
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "finished" and status["global_step"] == 4
        rows = json.loads((run / "eval" / "metrics.json").read_text())["results"]
        assert sorted(r["sampler"] for r in rows) == ["ddim-4", "ddpm-50"]
        fid = next(r["fid"] for r in rows if r["sampler"] == "ddim-4")
        # main() returned the evaluation's FID, taken from trainer.callback_metrics
        assert status["optimized_metric"] == METRIC and status["optimized_value"] == pytest.approx(fid, rel=1e-6)
    overrides = [yaml.safe_load((r / ".hydra" / "overrides.yaml").read_text()) for r in runs]
    for o in overrides:  # every trial got a value of each searched parameter from Optuna
        assert {x.split("=")[0] for x in o} >= {"optimizer.lr", "module.ema_decay", "schedule"}
    assert overrides[0] != overrides[1]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((r / "status.json").read_text())["optimized_value"] for r in runs]
    assert best["best_value"] == pytest.approx(min(values))
    results = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 2  # each trial ran as its own submitit job


@pytest.mark.slow
def test_report_lists_every_run_with_metrics_plots_and_grids(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    # a job that failed (status written by the same context manager as difflab-train's), and one
    # that never got to write anything but Hydra's overrides
    first = yaml.safe_load((root / "0" / ".hydra" / "overrides.yaml").read_text())
    for job, schedule in (("2", "quadratic"), ("3", "sigmoid")):
        (root / job / ".hydra").mkdir(parents=True)
        lines = [f"schedule={schedule}" if o.startswith("schedule=") else o for o in first]
        (root / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
    with pytest.raises(ValueError):
        with run_status(root / "2"):
            raise ValueError("image_size=10 is not divisible by 4")

    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:5] == ["run", "optimizer.lr", "module.ema_decay", "schedule", "status"]  # what varies
    assert {"val/loss", "train/loss", METRIC, "eval/fid/ddpm-50", "eval/precision/ddim-4"} <= set(header)
    rows = {r.strip("|").split("|")[0].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table[1:]}
    assert sorted(rows) == ["0", "1", "2", "3"]
    col = header.index
    for job in ("0", "1"):
        status = json.loads((root / job / "status.json").read_text())
        assert rows[job][col("status")] == "finished" and rows[job][col("step")] == "4"
        assert rows[job][col(METRIC)].strip("*").startswith(f"{status['optimized_value']:.4g}")
        assert "last.ckpt" in rows[job][col("checkpoints")]
        assert (tmp_path / "out" / f"report_nfe_{job}.png").stat().st_size > 1000
    assert rows["2"][col("status")] == "failed, no metrics: ValueError: image_size=10 is not divisible by 4"
    assert rows["2"][col("schedule")] == "quadratic"
    assert rows["3"][col("status")] == "no metrics" and rows["3"][col(METRIC)] == ""
    assert "2 finished" in md and "1 failed, no metrics" in md and "1 no metrics" in md
    assert f"Optimised metric (returned to the sweeper): {METRIC}" in md and "Optuna: best value" in md
    html = (tmp_path / "out" / "report.html").read_text()
    grid = os.path.relpath(root / "0" / "samples" / "ddim_step0000004.png", tmp_path / "out")
    assert f"<img src='{grid}'" in html and "<img src='report_nfe_1.png'" in html
    assert html.count("<tr>") == 5


def test_report_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for arg, message in ((tmp_path / "file.txt", "is not a directory"), (tmp_path / "nope", "does not exist"),
                         (tmp_path / "empty", "no runs in")):
        assert report.main([str(arg)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()


def test_optimized_metric_missing_or_impossible_is_named():
    assert optimized_value({"val/loss": 0.5}, None) is None
    assert optimized_value({"val/loss": 0.5}, "val/loss") == 0.5
    with pytest.raises(ValueError, match=r"optimized_metric='eval/fid/ddim-50' was not logged.*\['train/loss', 'val/loss'\]"):
        optimized_value({"val/loss": 0.5, "train/loss": 1.0}, "eval/fid/ddim-50")
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="needs the evaluation callback"):
        check_optimized_metric(OmegaConf.create({"optimized_metric": "eval/fid/ddim-50", "callbacks": {"evaluation": None}}))


def compose_train(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("train", overrides=[f"hydra.sweep.dir={tmp_path}", *overrides], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_slurm_launcher_writes_an_sbatch_script_matching_the_trainer(tmp_path, monkeypatch):
    """The real launcher up to `sbatch`: a fake sbatch on PATH keeps the script and refuses the job."""
    cfg = compose_train(tmp_path, ["hydra/launcher=submitit_slurm", "trainer.devices=4", "trainer.num_nodes=2",
                                   "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"])
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.nodes == 2
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "sbatch: error: test" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Exception, match="test"):
        launcher.launch([["schedule=cosine"], ["schedule=linear"]], initial_job_idx=0)
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@120", "--partition=gpu",
                 "--time=90", "--array=0-1%2", "--cpus-per-task=8", "--mem=64GB", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    assert "\nsrun " in script  # every task (one per GPU) is started by srun


def test_local_launcher_and_optuna_compose(tmp_path):
    cfg = compose_train(tmp_path, ["hydra/launcher=submitit_local", "hparams_search=optuna"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.tasks_per_node == 1
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.optimized_metric == "val/loss"
    assert cfg.hydra.sweeper.params["schedule"] == "choice(linear, cosine)"


def test_run_directory_is_stable_inside_slurm(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert run_id("2026-01-01/10-00-00") == "2026-01-01/10-00-00" and slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert run_id("2026-01-01/10-00-00") == "slurm-777"
    cfg = compose_train(tmp_path, [])
    assert cfg.hydra.run.dir == "outputs/slurm-777" and cfg.hydra.sweep.dir == str(tmp_path)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "700")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_id("x") == "slurm-700_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc/srun --pty: not a batch job, Lightning agrees
    assert run_id("x") == "x"


def test_requeue_signal_is_validated_and_handled_at_a_step_boundary(monkeypatch, tmp_path):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from difflab.callbacks import RequeueOnSignal

    assert requeue_signal("USR2") == requeue_signal("SIGUSR2") == signal.SIGUSR2
    with pytest.raises(ValueError, match=r"slurm.requeue_signal='KILL' is not supported; choose one of"):
        requeue_signal("KILL")
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert requeue_callbacks(auto_requeue=True, signal_name="USR2", run_dir=tmp_path) == []  # not under SLURM
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert SLURMEnvironment.detect()
    (env,) = slurm_plugins(signal_name="USR2")
    assert not env.auto_requeue  # Lightning's in-handler save is off ...
    (cb,) = requeue_callbacks(auto_requeue=True, signal_name="USR2", run_dir=tmp_path)  # ... ours replaces it
    assert isinstance(cb, RequeueOnSignal) and cb.job_id == "42" and cb.signum == signal.SIGUSR2
    assert requeue_callbacks(auto_requeue=False, signal_name="USR2", run_dir=tmp_path) == []
    previous = signal.signal(signal.SIGUSR2, lambda *_: None)  # what submitit installs in its jobs
    try:
        cb.setup(None, None, "fit")
        os.kill(os.getpid(), signal.SIGUSR2)  # only noted: the checkpoint waits for the end of the step
        assert cb.requested
        (tmp_path / "hpc_ckpt_1.ckpt").touch()
        assert cb.hpc_path() == tmp_path / "hpc_ckpt_2.ckpt"
    finally:
        signal.signal(signal.SIGUSR2, previous)
