"""difflab-edit end to end on tiny random-weight checkpoints (DDPM, VP SDE, latent), its inputs, masks and refusals.

Checkpoints are built in process (the run config composed by Hydra, the module built as difflab-train builds it,
saved as difflab-train saves it); edits run in process through the composed `edit` config, one through the
installed console script.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from difflab.cli.config import config_dir, to_container
from difflab.cli.edit import edit
from difflab.cli.edit_inputs import load_sources, parse_indices
from difflab.data.digits import load_digits_uint8
from difflab.data.masks import MASK_NAMES, load_mask_file, named_masks
from difflab.lit.checkpoint_io import load_first_stage
from difflab.lit.first_stage import describe_first_stage
from difflab.lit.from_config import build_module, first_stage_from_config, with_latent_model

TINY_MODEL = ["logger=csv", "model.ch=8", "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]


@contextmanager
def composed(name: str, overrides: list[str]):
    """A config as its @hydra.main app would see it (HydraConfig set: ${hydra:...} and task overrides resolve)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(name, overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in the app: the node lives in HydraConfig
        yield cfg


def save_checkpoint(path: Path, *overrides: str) -> Path:
    """A difflab-train checkpoint with random weights (step 0) for the run `overrides` describe."""
    torch.manual_seed(0)
    with composed("train", [*TINY_MODEL, *overrides]) as cfg:
        first_stage = first_stage_from_config(cfg, load_first_stage)
        cfg = with_latent_model(cfg, first_stage)
        module = build_module(cfg, first_stage=first_stage)
        config = to_container(cfg)
    if first_stage is not None:
        config["first_stage"] = describe_first_stage(first_stage, config["first_stage"])
        first_stage.scale_factor.fill_(1.0)  # what scale_by_std would have set at the first batch
    torch.save({"state_dict": module.state_dict(), "global_step": 0,
                "difflab": {"config": config, "kind": "diffusion", **module.checkpoint_state()}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_ckpts")
    from test_latent_diffusion import random_autoencoder

    ae = random_autoencoder(root / "ae.ckpt")
    return {"ddpm": save_checkpoint(root / "ddpm.ckpt", "schedule.T=50"),
            "rgb_cond": save_checkpoint(root / "rgb.ckpt", "schedule.T=50", "data.channels=3", "model.num_classes=auto"),
            "vp": save_checkpoint(root / "vp.ckpt", "experiment=digits_vpsde"),
            "latent": save_checkpoint(root / "ldm.ckpt", "schedule.T=50", "first_stage=ckpt",
                                      f"first_stage.ckpt_path={ae}", "model.attn_resolutions=[]")}


def run_edit(ckpt: Path, out: Path, *overrides: str) -> dict[str, np.ndarray]:
    """difflab-edit in process; returns the written .npz as a dict (keys in file order)."""
    with composed("edit", [f"ckpt_path={ckpt}", f"out_dir={out}", *overrides]) as cfg:
        paths = edit(cfg)
    assert paths["png"].is_file()
    with np.load(paths["npz"]) as data:
        return {k: data[k] for k in data.keys()}


def test_named_masks_name_the_region_to_generate_and_do_not_depend_on_the_batch():
    right = named_masks("right_half", 2, 8, 8)
    assert right[:, :, :4].all() and not right[:, :, 4:].any()  # keeps the left half
    assert torch.equal(named_masks("left_half", 1, 8, 8)[0], ~right[0])
    centre = named_masks("center_box", 1, 8, 8)[0]
    assert not centre[2:6, 2:6].any() and centre.sum() == 64 - 16
    lattice = named_masks("superres4", 1, 8, 8)[0]
    assert lattice.sum() == 4 and lattice[::4, ::4].all()
    for name in ("random_box", "lines", "strokes"):
        five = named_masks(name, 5, 16, 16, seed=3)
        assert torch.equal(five[2], named_masks(name, 1, 16, 16, seed=5)[0])  # image i: seed + i
        assert all(m.any() and not m.all() for m in five), name
        assert not torch.equal(five[0], five[1])
    with pytest.raises(ValueError, match="is not a named mask; choose one of"):
        named_masks("top_half", 1, 8, 8)


def test_mask_files_round_trip_and_bad_shapes_are_refused(tmp_path):
    masks = named_masks("random_box", 3, 8, 8, seed=1)
    np.savez(tmp_path / "m.npz", masks=masks[..., None].expand(-1, -1, -1, 3).numpy())  # NHWC, as difflab-edit writes
    assert torch.equal(load_mask_file(tmp_path / "m.npz", 3, 8, 8), masks)
    Image.fromarray((masks[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "m.png")
    assert torch.equal(load_mask_file(tmp_path / "m.png", 4, 8, 8), masks[0].expand(4, -1, -1))
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\); the 2 images need \(2, 8, 8\)"):
        load_mask_file(tmp_path / "m.npz", 2, 8, 8)
    np.savez(tmp_path / "bad.npz", masks=np.full((8, 8), 7))
    with pytest.raises(ValueError, match="bool or 0/1"):
        load_mask_file(tmp_path / "bad.npz", 1, 8, 8)


def test_sources_from_a_data_set_a_folder_and_an_npz(tmp_path):
    with composed("edit", ["ckpt_path=x", "source=x"]):
        digits = load_sources("digits:0-9,100", channels=1, size=8)
    images, labels = load_digits_uint8()
    assert torch.equal(digits.images, images[[*range(10), 100]]) and torch.equal(digits.labels, labels[[*range(10), 100]])
    for i, d in enumerate(("a", "b")):
        (tmp_path / "f" / d).mkdir(parents=True)
        Image.fromarray(images[i, 0].numpy()).save(tmp_path / "f" / d / "x.png")
    folder = load_sources(str(tmp_path / "f"), channels=1, size=8)
    assert torch.equal(folder.images, images[:2]) and folder.labels.tolist() == [0, 1]
    np.savez(tmp_path / "s.npz", images=images[:3].permute(0, 2, 3, 1).numpy())
    assert torch.equal(load_sources(str(tmp_path / "s.npz"), channels=1, size=8).images, images[:3])
    with pytest.raises(ValueError, match="source index 2000 is outside digits's images 0..1796"):
        parse_indices("0-3,2000", 1797, "digits")


def test_repaint_inpainting_writes_exact_known_pixels_and_refuses_to_overwrite(ckpts, tmp_path):
    out = run_edit(ckpts["ddpm"], tmp_path, "source=digits:0-5", "steps=6", "jump_length=2", "resamplings=2",
                   "batch_size=4")
    assert list(out) == ["images", "sources", "masks", "labels", "seeds"]
    assert out["images"].shape == out["sources"].shape == out["masks"].shape == (6, 8, 8, 1)
    assert out["masks"].dtype == bool and out["masks"][:, :, :4].all() and not out["masks"][:, :, 4:].any()
    assert np.array_equal(out["images"][out["masks"]], out["sources"][out["masks"]])
    assert out["labels"].tolist() == load_digits_uint8()[1][:6].tolist()
    with pytest.raises(FileExistsError, match="overwrites nothing"):
        run_edit(ckpts["ddpm"], tmp_path, "source=digits:0-5", "steps=6", "jump_length=2", "resamplings=2")
    same = run_edit(ckpts["ddpm"], tmp_path / "b", "source=digits:0-5", "steps=6", "jump_length=2", "resamplings=2",
                    "batch_size=6")
    assert np.array_equal(same["images"], out["images"])  # image i uses seed + i: any batch size


def test_sdedit_superres_and_the_score_inpainter(ckpts, tmp_path):
    same = run_edit(ckpts["ddpm"], tmp_path / "s0", "task=sdedit", "strength=0", "source=digits:0-2")
    assert np.array_equal(same["images"], same["sources"]) and not same["masks"].any()
    half = run_edit(ckpts["ddpm"], tmp_path / "s5", "task=sdedit", "strength=0.5", "source=digits:0-2",
                    "sampler=ddim", "sampler.steps=4")
    assert not np.array_equal(half["images"], half["sources"])
    low = run_edit(ckpts["ddpm"], tmp_path / "sr", "task=superres", "factor=4", "steps=4", "resamplings=1",
                   "source=digits:0-2")
    assert np.array_equal(low["images"][:, ::4, ::4], low["sources"][:, ::4, ::4]) and low["masks"].sum() == 3 * 4
    ilvr = run_edit(ckpts["ddpm"], tmp_path / "ilvr", "task=superres", "method=ilvr", "steps=4", "source=digits:0-2")
    blocks = lambda a: a.astype(float).reshape(3, 4, 2, 4, 2).mean((2, 4))  # noqa: E731 (2x2 block means)
    assert np.abs(blocks(ilvr["images"]) - blocks(ilvr["sources"])).max() <= 0.5 and not ilvr["masks"].any()
    vp = run_edit(ckpts["vp"], tmp_path / "pc", "method=pc", "sampler=pc", "sampler.steps=3", "sampler.corrector=none",
                  "sampler.predictor=euler_maruyama", "source=digits:0-2", "mask=center_box")
    assert np.array_equal(vp["images"][vp["masks"]], vp["sources"][vp["masks"]])


def test_colorize_keeps_the_grey_level_and_label_source_conditions_on_the_sources_classes(ckpts, tmp_path):
    grey = load_digits_uint8()[0][:3].permute(0, 2, 3, 1).numpy()  # (3, 8, 8, 1): 1-channel sources
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.array([7, 1, 4]))
    out = run_edit(ckpts["rgb_cond"], tmp_path / "c", "task=colorize", f"source={tmp_path / 'grey.npz'}", "steps=4",
                   "resamplings=2", "jump_length=2", "label=source", "guidance_scale=2")
    assert out["images"].shape == out["sources"].shape == (3, 8, 8, 3) and out["labels"].tolist() == [7, 1, 4]
    assert out["masks"][..., 0].all() and not out["masks"][..., 1:].any()  # the grey coordinate of the colour basis
    assert np.abs(out["images"].astype(float).mean(-1) - grey[..., 0]).max() <= 1.0  # to uint8 rounding
    with pytest.raises(ValueError, match="label=source but the sources have no labels"):
        np.savez(tmp_path / "nolabels.npz", images=grey)
        run_edit(ckpts["rgb_cond"], tmp_path / "d", "task=colorize", f"source={tmp_path / 'nolabels.npz'}",
                 "label=source")


def test_a_latent_model_inpaints_in_latent_space(ckpts, tmp_path):
    out = run_edit(ckpts["latent"], tmp_path, "source=digits:0-2", "steps=4", "jump_length=2", "resamplings=2")
    assert out["images"].shape == (3, 8, 8, 1)  # decoded pixels
    with pytest.raises(ValueError, match="task=superres constrains pixels .* refused for a latent diffusion model"):
        run_edit(ckpts["latent"], tmp_path / "x", "task=superres", "source=digits:0-2")


@pytest.mark.parametrize("overrides, error, match", [
    (["task=colorize"], ValueError, r"task=colorize needs an RGB \(3-channel\) model; this model has 1 channel"),
    (["method=pc"], ValueError, "method=pc is the score-SDE predictor-corrector inpainter: it needs a score model"),
    (["steps=4", "jump_length=4"], ValueError, "jump_length=4 does not fit a sampler of 4 steps"),
    (["task=sdedit", "strength=-0.1"], ValueError, r"strength=-0.1 is outside \[0, 1\]"),
    (["task=superres", "factor=3"], ValueError, r"factor=3 is not supported; choose one of \(2, 4\)"),
    (["sampler=heun"], ValueError, "cannot impose known pixels"),
    (["task=paint"], ValueError, "task='paint' is not supported"),
    (["source=digits:5-2"], ValueError, "'5-2' of 'digits' is not an index or an increasing range"),
    (["source=nodata:0-3"], ValueError, "'nodata' is not a data config"),
    (["label=3"], ValueError, "labels were given but this model is unconditional"),
])
def test_bad_input_is_refused_by_name(ckpts, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_edit(ckpts["ddpm"], tmp_path, "source=digits:0-1", *overrides)


def test_wrong_sizes_of_sources_and_masks_are_refused(ckpts, tmp_path):
    np.savez(tmp_path / "big.npz", images=np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match=r"source images are 1x16x16 .* the model draws 1x8x8"):
        run_edit(ckpts["ddpm"], tmp_path, f"source={tmp_path / 'big.npz'}")
    np.savez(tmp_path / "m.npz", masks=np.ones((3, 8, 8), bool))
    with pytest.raises(ValueError, match=r"the 2 images need \(2, 8, 8\)"):
        run_edit(ckpts["ddpm"], tmp_path, "source=digits:0-1", f"mask={tmp_path / 'm.npz'}")
    with pytest.warns(UserWarning, match="keeps no pixel: this is unconditional sampling"):
        np.savez(tmp_path / "none.npz", masks=np.zeros((8, 8), bool))
        run_edit(ckpts["ddpm"], tmp_path / "n", "source=digits:0-1", f"mask={tmp_path / 'none.npz'}", "steps=3",
                 "resamplings=1")


def test_the_console_script_runs(ckpts, tmp_path):
    script = Path(sys.executable).with_name("difflab-edit")
    proc = subprocess.run([str(script), f"ckpt_path={ckpts['ddpm']}", "source=digits:0-1", "mask=lines", "steps=3",
                           "resamplings=1", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "known-region max error: 0 uint8 levels" in proc.stdout
    assert (tmp_path / "inpaint-repaint_lines_ddpm-3_n2_seed0.npz").is_file()
