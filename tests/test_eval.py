"""Evaluation end to end: the eval callback in training, difflab-eval on 1 and 2 processes, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import TINY, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny diffusion run that evaluates itself; its digits feature classifier does not exist yet, so
    difflab-train trains it on first use (60 steps here, through DIFFLAB_CLASSIFIER_OVERRIDES)."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    train_args = [a for a in TINY if a != "callbacks.evaluation=null"] + [
        f"paths.cache_dir={root / 'cache'}",
        "callbacks.evaluation.num_samples=20",
        "callbacks.evaluation.every_n_steps=2",
        "callbacks.evaluation.samplers.ddim.steps=4",
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIFFLAB_CLASSIFIER_OVERRIDES", "trainer.max_steps=60")
        proc = run("difflab.cli.train", *train_args, f"hydra.run.dir={run_dir}", cwd=root)
    return {"root": root, "clf": root / "cache" / "classifiers" / "digits_8px.ckpt", "run": run_dir,
            "ckpt": run_dir / "checkpoints" / "last.ckpt", "train_output": proc.stdout + proc.stderr}


def eval_args(s: dict, out: Path, *extra: str) -> list[str]:  # the classifier: the default file in the cache
    return [f"ckpt_path={s['ckpt']}", f"paths.cache_dir={s['root'] / 'cache'}",
            "num_samples=24", "batch_size=10", "samplers=[ddim-5,ddim-2]", f"out_dir={out}", *extra]


def test_training_creates_the_feature_classifier_on_first_use(setup):
    assert setup["clf"].is_file() and "one-time cost" in setup["train_output"]
    (nested,) = (setup["root"] / "cache" / "classifiers" / "runs").glob("digits_8px-*")  # its own run directory
    assert "val/acc" in (nested / "csv" / "metrics.csv").read_text()
    assert "val/acc" not in (setup["run"] / "csv" / "metrics.csv").read_text()  # the training run's files untouched


def test_training_logs_eval_metrics(setup):
    metrics = (setup["run"] / "csv" / "metrics.csv").read_text()
    assert "eval/fid/ddim-4" in metrics and "eval/precision/ddim-4" in metrics
    rows = json.loads((setup["run"] / "eval" / "metrics.json").read_text())["results"]
    assert [r["step"] for r in rows] == [2, 4] and all(r["num_samples"] == 20 for r in rows)
    assert (setup["run"] / "eval" / "metrics_vs_nfe.png").is_file()
    cached = list((setup["root"] / "cache" / "reference").glob("digits-train-8px-*.pt"))
    assert len(cached) == 1


def test_difflab_eval_writes_metrics_table_and_bpd(setup, tmp_path):
    cache = next((setup["root"] / "cache" / "reference").glob("*.pt"))
    before = cache.stat().st_mtime_ns
    proc = run("difflab.cli.evaluate", *eval_args(setup, tmp_path / "one", "bpd.num_images=8", "bpd.batch_size=8"), cwd=tmp_path)
    assert "bits/dim" in proc.stdout and "ddim-5" in proc.stdout
    out = json.loads((tmp_path / "one" / "metrics.json").read_text())
    labels = [r["sampler"] for r in out["results"]]
    assert labels == ["ddim-5", "ddim-2"] and [r["nfe"] for r in out["results"]] == [5, 2]
    for r in out["results"]:
        assert r["fid"] >= 0 and r["num_samples"] == 24 and r["seed"] == 0 and r["weights"] == "ema"
        assert r["extractor"].startswith("classifier")
    assert out["likelihood"]["bpd"] > 0 and out["likelihood"]["bpd_images"] == 8
    assert (tmp_path / "one" / "metrics_vs_nfe.csv").is_file()
    assert cache.stat().st_mtime_ns == before  # the reference statistics were reused


def test_two_process_eval_matches_one_process(setup, tmp_path):
    run("difflab.cli.evaluate", *eval_args(setup, tmp_path / "one", "bpd.num_images=0"), cwd=tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "difflab.cli.evaluate", *eval_args(setup, tmp_path / "two", "bpd.num_images=0"),
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    for a, b in zip(one["results"], two["results"]):
        for key in ("fid", "is_mean", "kid_mean", "precision", "recall"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_difflab_eval_samples_in_bf16_when_asked(setup, tmp_path):
    args = [a for a in eval_args(setup, tmp_path) if not a.startswith("samplers=")] + ["samplers=[ddim-5]"]
    run("difflab.cli.evaluate", *args, "bpd.num_images=0", "precision=bf16-mixed", cwd=tmp_path)
    (row,) = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert row["sampling_precision"] == "bf16-mixed" and row["fid"] >= 0 and 0 <= row["precision"] <= 1
    proc = run("difflab.cli.evaluate", *args, "precision=fp8", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "precision='fp8' is not one of 32" in proc.stderr + proc.stdout


def test_missing_inception_weights_fail_before_sampling(setup, tmp_path):
    proc = run("difflab.cli.evaluate", *eval_args(setup, tmp_path, "metrics.extractor=inception",
               f"metrics.weights_path={tmp_path}/weights-inception-2015-12-05-6726825d.pth"), cwd=tmp_path, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "weights-inception-2015-12-05-6726825d.pth" in out, out[-2000:]
    assert not (tmp_path / "metrics.json").exists()


def test_bad_sampler_spec_is_refused(setup, tmp_path):
    args = [a for a in eval_args(setup, tmp_path) if not a.startswith("samplers=")] + ["samplers=[euler-3]"]
    proc = run("difflab.cli.evaluate", *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "sampler 'euler-3' is not understood" in proc.stderr + proc.stdout


def test_difflab_eval_compares_fast_solvers_and_ode_bits_per_dim(setup, tmp_path):
    """DDIM, DPM-Solver++, Heun and the adaptive PF-ODE side by side on the DDPM eps model; bits/dim via the PF-ODE."""
    args = eval_args(setup, tmp_path, "bpd.num_images=2", "bpd.batch_size=2", "bpd.method=ode", "bpd.rtol=1e-2", "bpd.atol=1e-2")
    args = [a for a in args if not a.startswith("samplers=")] + [
        "samplers=[ddim-3,dpmpp-3,heun-2,ode-tol1e-2,{name:ddim,steps:4,spacing:trailing}]"]  # the sampler= language
    run("difflab.cli.evaluate", *args, cwd=tmp_path)
    out = json.loads((tmp_path / "metrics.json").read_text())
    rows = {r["sampler"]: r for r in out["results"]}
    assert [rows[k]["nfe"] for k in ("ddim-3", "dpmpp-3", "heun-2", "ddim-4")] == [3, 3, 3, 4]
    assert "spacing='trailing'" in rows["ddim-4"]["settings"]
    ode = next(r for k, r in rows.items() if k.startswith("ode"))
    assert ode["nfe"] > 6 and ode["fid"] >= 0  # the adaptive solver's measured NFE
    assert out["likelihood"]["bpd_method"] == "pf-ode" and 0 < out["likelihood"]["bpd"] < 30
