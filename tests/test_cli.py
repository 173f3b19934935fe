"""The CLI end to end through Hydra: train a few steps on digits, sample from the checkpoint, bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

pytestmark = pytest.mark.slow

TINY = [
    "logger=csv",
    "data.image_size=8",
    "data.batch_size=32",
    "model.ch=16",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "schedule.T=50",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.samplers.ddim.steps=5",
    "callbacks.evaluation=null",
]


def run(module: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny training run through the real CLI, shared by the sampling tests."""
    run_dir = tmp_path_factory.mktemp("run")
    run("difflab.cli.train", *TINY, f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


def test_train_writes_checkpoints_grids_and_metrics(trained):
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # the final weights
    grids = sorted(p.name for p in (trained / "samples").iterdir())
    assert grids == [f"{s}_step{k:07d}.png" for s in ("ddim", "ddpm") for k in (2, 4)]
    metrics = (trained / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    assert (trained / ".hydra" / "config.yaml").is_file()


def test_sample_from_checkpoint_is_seeded_and_batch_independent(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=5", "num_samples=6", "seed=11"]
    proc = run("difflab.cli.sample", *common, "batch_size=4", f"out_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert "npz:" in proc.stdout and "png:" in proc.stdout
    a = np.load(tmp_path / "a" / "ddim-5_n6_seed11.npz")["images"]
    assert a.shape == (6, 8, 8, 1) and a.dtype == np.uint8
    run("difflab.cli.sample", *common, "batch_size=5", f"out_dir={tmp_path / 'b'}", cwd=tmp_path)
    b = np.load(tmp_path / "b" / "ddim-5_n6_seed11.npz")["images"]
    assert np.array_equal(a, b)  # same seeds, different batch size: the same images
    from PIL import Image

    with Image.open(tmp_path / "a" / "ddim-5_n6_seed11.png") as grid:  # enlarged to be readable; the .npz is native
        assert grid.size == (280, 190)  # 3 x 2 images of 8 px + 1 px borders = 28 x 19 px, x10


def test_sample_in_bf16_keeps_float32_samples_and_stays_close(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=5", "num_samples=4", f"out_dir={tmp_path}"]
    run("difflab.cli.sample", *common, cwd=tmp_path)
    run("difflab.cli.sample", *common, "precision=bf16-mixed", cwd=tmp_path)
    full = np.load(tmp_path / "ddim-5_n4_seed0.npz")["images"].astype(float)
    bf16 = np.load(tmp_path / "ddim-5_n4_seed0_bf16-mixed.npz")["images"].astype(float)  # its own file
    assert full.shape == bf16.shape and np.abs(full - bf16).mean() < 8  # uint8 levels


def test_sample_ddpm_into_run_directory(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    run("difflab.cli.sample", f"ckpt_path={ckpt}", "sampler=ddpm", "num_samples=2", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert (tmp_path / "ddpm_n2_seed0.npz").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampler.steps=500", "steps=500 is not valid for a schedule of T=50"),
        ("sampler.eta=1.5", "eta=1.5 is outside [0, 1]"),
        ("sampler.spacing=cubic", "spacing='cubic' is not supported"),
        ("sampler=ddpm sampler.variance=learned", "variance='learned' but this model has a fixed variance"),
        ("sampler=ddpm sampler.variance=cubic", "variance='cubic' is not supported"),
        ("sampler=euler", "Could not find 'sampler/euler'"),
        ("precision=bf17", "precision='bf17' is not one of 32 (float32), bf16-mixed"),
    ],
)
def test_bad_sampler_settings_fail_clearly(trained, tmp_path, override, message):
    # in process (difflab-sample's own function on the config Hydra composes): no interpreter start per case
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from difflab.cli.config import config_dir
    from difflab.cli.sample import sample

    ckpt = trained / "checkpoints" / "last.ckpt"
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(Exception) as err, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("sample", [f"ckpt_path={ckpt}", *override.split(), f"out_dir={tmp_path}"],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            sample(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert message in str(err.value), str(err.value)
    assert not list(tmp_path.glob("*.npz"))


def test_missing_checkpoint_fails_clearly(tmp_path):
    proc = run("difflab.cli.sample", f"ckpt_path={tmp_path}/nope.ckpt", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "nope.ckpt' does not exist" in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule=exponential"], "Could not find 'schedule/exponential'"),
        (["trainer.no_such_key=1"], "no_such_key"),
        (["data.image_size=10"], "image_size=10 is not divisible by 4"),
        (["data=image_folder", "data.root=/no/such/folder"], "/no/such/folder"),
        (["objective.parameterization=score"], "parameterization='score' is not supported"),
    ],
)
def test_bad_training_inputs_fail_before_training(tmp_path, overrides, message):
    proc = run("difflab.cli.train", *TINY, *overrides, f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def test_wandb_logger_runs_offline_without_credentials(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env_args = [a for a in TINY if not a.startswith("logger=")]
    proc = subprocess.run(
        [sys.executable, "-m", "difflab.cli.train", *env_args, "logger=wandb", "trainer.max_steps=2",
         "callbacks.sample_grid.every_n_steps=1000", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("WANDB")} | {"HOME": str(home), "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("run-*.wandb"))


def test_resume_from_last_checkpoint_continues_the_run(tmp_path):
    args = [a for a in TINY if not a.startswith("trainer.max_steps")] + [f"hydra.run.dir={tmp_path}"]
    run("difflab.cli.train", *args, "trainer.max_steps=2", cwd=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    run("difflab.cli.train", *args, "trainer.max_steps=4", "ckpt_path=last", cwd=tmp_path)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["difflab"]["config"]["ckpt_path"] == "last"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # atomic writes leave nothing behind


def test_bf16_mixed_precision_trains_through_lightning(tmp_path):
    """trainer.precision=bf16-mixed on CPU: Lightning's autocast plugin, float32 master weights, finite loss."""
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "callbacks.sample_grid.every"))]
    run("difflab.cli.train", *args, "trainer.max_steps=2", "trainer.precision=bf16-mixed", "model.dropout=0.1",
        "model.channels_last=true", "callbacks.sample_grid.every_n_steps=1000", f"hydra.run.dir={tmp_path}",
        cwd=tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["difflab"]["config"]["trainer"]["precision"] == "bf16-mixed"
    weights = [v for k, v in ckpt["state_dict"].items() if k.startswith("net.") and v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    rows = [line.split(",") for line in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/loss")
    losses = [float(r[col]) for r in rows[1:] if len(r) > col and r[col]]
    assert losses and all(np.isfinite(losses))
