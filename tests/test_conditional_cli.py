"""The conditional demo end to end: experiment=digits_cfg (tiny) -> difflab-sample label=... guidance_scale=3,
judged by a digits classifier this test trains; the noise-aware classifier CLI and classifier-guided sampling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# digits_cfg with a smaller net (32 channels at 8x8 and 4x4, no attention), T = 200 and 150 steps: enough
# for the class signal (measured: 200 steps of this net gave 100% sevens at w = 3 on 50 samples)
TINY_CFG = [
    "experiment=digits_cfg", "logger=csv", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[]", "schedule.T=200", "trainer.max_steps=150", "optimizer.lr=3e-3",
    "module.lr_warmup_steps=20", "trainer.check_val_every_n_epoch=1000", "callbacks.evaluation=null",
    "~callbacks.sample_grid.samplers.ddpm", "callbacks.sample_grid.samplers.ddim.steps=10",
    "callbacks.sample_grid.num_samples=20",
]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", "DIFFLAB_CACHE_DIR": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def cfg_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cfg")
    run("difflab.cli.train", *TINY_CFG, f"hydra.run.dir={run_dir}", cwd=run_dir)
    return run_dir


def digits_judge():
    """An RBF SVM on scikit-learn's 8x8 digits (98-99% held-out accuracy), trained here in ~1 s."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(d.data, d.target)


def test_digits_cfg_samples_the_requested_class(cfg_run):
    ckpt = cfg_run / "checkpoints" / "last.ckpt"
    assert (cfg_run / "samples" / "ddim_step0000150.png").is_file()  # the per-class grid (2 per class)
    out = cfg_run / "s"
    run("difflab.cli.sample", f"ckpt_path={ckpt}", "label=[7,1]", "guidance_scale=3", "num_samples=40",
        "sampler.steps=20", f"out_dir={out}", cwd=cfg_run)
    data = np.load(out / "ddim-20_n40_seed0_labellist_w3.npz")
    images, labels = data["images"], data["labels"]
    assert images.shape == (40, 8, 8, 1) and labels.tolist() == [7, 1] * 20
    pred = digits_judge().predict(images[..., 0].reshape(40, 64) / 255.0 * 16.0)
    sevens, ones = (pred[labels == 7] == 7).mean(), (pred[labels == 1] == 1).mean()
    assert sevens >= 0.6 and ones >= 0.6, f"requested 7 -> {pred[labels == 7]}, requested 1 -> {pred[labels == 1]}"


def test_bad_label_is_refused_before_sampling(cfg_run):
    from omegaconf import OmegaConf

    from difflab.lit.checkpoint_io import load_run
    from difflab.samplers import DDIM

    module = load_run(cfg_run / "checkpoints" / "last.ckpt").module
    assert module.num_classes == 10  # model.num_classes=auto read the digits' class count
    with pytest.raises(ValueError, match="label 12 is outside 0..9"):
        module.sample(DDIM(steps=2), [0, 1], labels=[3, 12], guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        module.sample(DDIM(steps=2), [0, 1], labels=[3, 1], guidance_scale=-1.0)


def test_noisy_classifier_cli_and_classifier_guided_sampling(cfg_run):
    proc = run("difflab.cli.train_classifier", "classifier=noisy_digits", "schedule.T=200", "trainer.max_steps=10",
               f"hydra.run.dir={cfg_run / 'clf'}", cwd=cfg_run)
    path = cfg_run / "cache" / "classifiers" / "digits_8px_noisy_T200.ckpt"
    assert path.is_file() and "val/acc" in proc.stdout
    from difflab.lit.checkpoint_io import load_classifier

    net = load_classifier(path, kind="noisy_classifier", T=200)
    assert net(torch.zeros(2, 1, 8, 8), torch.tensor([0, 199])).shape == (2, 10)
    with pytest.raises(ValueError, match="T=200, the model has T=1000"):
        load_classifier(path, kind="noisy_classifier", T=1000)
    with pytest.raises(ValueError, match="of kind 'noisy_classifier', not 'classifier'"):
        load_classifier(path)  # one loader for both kinds, each refusing the other
    run("difflab.cli.sample", f"ckpt_path={cfg_run / 'checkpoints' / 'last.ckpt'}", "label=7", "guidance_scale=1",
        f"classifier_ckpt={path}", "classifier_scale=2", "num_samples=4", "sampler.steps=5", f"out_dir={cfg_run / 'cg'}",
        cwd=cfg_run)
    assert (cfg_run / "cg" / "ddim-5_n4_seed0_label7_w1_s2.npz").is_file()
