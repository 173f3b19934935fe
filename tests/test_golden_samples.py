"""difflab-sample's images for fixed seeds, against stored reference arrays: the sampling path must not drift.

Two tiny checkpoints are built here from fixed-seed initialisations (no training, so the weights are
the same on every CPU): a class-conditional DDPM (DDIM, and classifier-free guidance w = 3) and a
VP-SDE score model (DPM-Solver++, the sampler its run is configured with, chosen by difflab-sample
itself; and EDM Heun). The references in tests/data/golden_samples.npz were written by this code after checking
that the refactored sampling path gives bit-identical .npz files to the one before it. Across CPUs
oneDNN picks other kernels (AVX2 vs AMX), so uint8 pixels may differ by a rounding step; anything
more (another seed, noise order, guidance formula or step schedule) fails.
Regenerate (only for an intended change): DIFFLAB_WRITE_GOLDEN=1 pytest tests/test_golden_samples.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from difflab.cli.config import config_dir, to_container
from difflab.cli.sample import sample
from difflab.lit.from_config import build_module

GOLDEN = Path(__file__).parent / "data" / "golden_samples.npz"
TINY = ["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
        "model.channels_last=false", "model.scale_shift_norm=true", "logger=csv"]
RUNS = {
    "ddpm_cond": ["model.num_classes=auto", "schedule.T=100", "objective.parameterization=x0"],
    "vpsde": ["experiment=digits_vpsde", "sampler.steps=6"],
}
SCALE = {"ddpm_cond": 0.05, "vpsde": 0.05}  # perturbation of the initialisation: images not saturated
CASES = {  # name: (run, difflab-sample overrides)
    "ddim": ("ddpm_cond", ["sampler=ddim", "sampler.steps=8"]),
    "ddim_cfg_w3": ("ddpm_cond", ["sampler=ddim", "sampler.steps=8", "label=[7,1,3]", "guidance_scale=3"]),
    "ddpm_respaced": ("ddpm_cond", ["sampler=ddpm", "sampler.steps=10"]),
    "vpsde_run_sampler": ("vpsde", []),  # no sampler named: the run's DPM-Solver++, 6 steps
    "vpsde_heun": ("vpsde", ["sampler=heun", "sampler.steps=4"]),
}


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to the entry point
    return cfg


def _checkpoint(run: str, path: Path) -> Path:
    """A difflab-train checkpoint of a fixed-seed initialisation (zero-initialised layers made non-zero)."""
    cfg = _compose("train", TINY + RUNS[run] + [f"hydra.run.dir={path.parent}", f"paths.output_dir={path.parent}"])
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(SCALE[run] * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        module.ema.module.load_state_dict(module.net.state_dict())
    module.run_config = to_container(cfg)
    ckpt = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("golden")
    out = {}
    GlobalHydra.instance().clear()
    try:
        ckpts = {run: _checkpoint(run, root / f"{run}.ckpt") for run in RUNS}
        for name, (run, overrides) in CASES.items():
            GlobalHydra.instance().clear()
            cfg = _compose("sample", [f"ckpt_path={ckpts[run]}", "num_samples=6", "batch_size=4", "seed=11",
                                      "device=cpu", f"out_dir={root / name}", *overrides])
            out[name] = np.load(sample(cfg)["npz"])["images"]
    finally:
        GlobalHydra.instance().clear()
    return out


def test_samples_match_the_stored_references(images):
    if os.environ.get("DIFFLAB_WRITE_GOLDEN"):
        np.savez_compressed(GOLDEN, **images)
    golden = np.load(GOLDEN)
    assert sorted(golden.files) == sorted(CASES)
    for name, got in images.items():
        want, run = golden[name], CASES[name][0]
        assert got.shape == want.shape == (6, 8, 8, 1), name
        # mostly unsaturated images (the score model's untrained x0 estimates leave many pixels at 0/255;
        # a saturated pixel cannot flip across CPUs, only one near +-1 can move by a rounding step)
        assert np.isin(want, (0, 255)).mean() < (0.3 if run == "ddpm_cond" else 0.97), f"{name}: saturated"
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.1, f"{name}: max |diff| {diff.max()}, mean {diff.mean():.3f}"
    assert not np.array_equal(images["ddim"], images["ddim_cfg_w3"])  # guidance changed the images


def test_the_tolerance_catches_a_different_seed(images):
    golden = np.load(GOLDEN)["ddim"].astype(int)
    shifted = np.roll(golden, 1, axis=0)  # the images of other seeds
    assert np.abs(shifted - golden).mean() > 1.0


def test_sample_without_sampler_uses_the_runs_sampler_and_its_tweaks(tmp_path):
    GlobalHydra.instance().clear()
    try:
        ckpt = _checkpoint("vpsde", tmp_path / "vpsde.ckpt")
        for overrides, stem in (([], "dpmpp-6_"), (["sampler.steps=3"], "dpmpp-3_")):
            GlobalHydra.instance().clear()
            cfg = _compose("sample", [f"ckpt_path={ckpt}", "num_samples=2", "device=cpu", f"out_dir={tmp_path}", *overrides])
            assert sample(cfg)["npz"].name.startswith(stem)
        GlobalHydra.instance().clear()
        cfg = _compose("sample", [f"ckpt_path={ckpt}", "num_samples=2", f"out_dir={tmp_path}", "sampler.eta=0.5"])
        with pytest.raises(ValueError, match=r"'eta' is not an option of the run's configured sampler.*'steps'"):
            sample(cfg)
    finally:
        GlobalHydra.instance().clear()
