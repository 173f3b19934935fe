"""Latent diffusion (the second stage): a frozen first stage between pixels and latents, its latent scale
(LDM's scale_by_std), sampling that decodes to pixels, self-contained checkpoints, and Stable Diffusion's
VAE format as a drop-in first stage (a diffusers AutoencoderKL built tiny and saved with save_pretrained)."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from difflab.diffusion import linear_betas
from difflab.lit import DiffusionModule
from difflab.lit.first_stage import build_first_stage, describe_first_stage, load_diffusers_vae
from difflab.nets import UNet
from difflab.nets.first_stage import FirstStage, latent_moments
from difflab.samplers import DDIM

diffusers = pytest.importorskip("diffusers")  # the dev extra installs it: this never skips under make test


def tiny_vae(channels: int = 1) -> "diffusers.AutoencoderKL":
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(path)
    return path


def images(n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1).repeat_interleave(4, 2).repeat_interleave(4, 3)


def latent_module(first_stage: FirstStage) -> DiffusionModule:
    c, h, _ = first_stage.latent_shape
    torch.manual_seed(1)
    net = UNet(image_size=h, in_channels=c, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DiffusionModule(net=net, betas=linear_betas(100), first_stage=first_stage, ema_decay=0.9,
                           optimizer=functools.partial(torch.optim.Adam, lr=1e-3))


def test_a_saved_diffusers_vae_is_a_first_stage_with_its_scaling_factor(vae_dir, tmp_path):
    stage = build_first_stage({"kind": "diffusers_vae", "path": str(vae_dir)}, image_size=16, in_channels=1)
    assert stage.latent_shape == (4, 8, 8) and float(stage.scale_factor) == pytest.approx(0.18215)
    x = images(4)
    z = stage.encode(x, torch.Generator().manual_seed(0))
    raw = tiny_vae().encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, raw * 0.18215)  # z = s * E(x)
    torch.testing.assert_close(stage.decode(z), tiny_vae().decode(raw).sample)  # x = D(z / s)
    assert not any(p.requires_grad for p in stage.parameters())
    with pytest.raises(ValueError, match=r"first_stage.path='.*' is not a diffusers AutoencoderKL folder"):
        load_diffusers_vae(tmp_path)
    with pytest.raises(ValueError, match=r"encodes 1-channel images but the data has 3 channels"):
        build_first_stage({"kind": "diffusers_vae", "path": str(vae_dir)}, image_size=16, in_channels=3)
    with pytest.raises(ValueError, match=r"data.image_size=15 is not divisible by the diffusers VAE's downsampling factor 2"):
        build_first_stage({"kind": "diffusers_vae", "path": str(vae_dir)}, image_size=15, in_channels=1)
    for bad in (0, float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"first_stage.scale_factor=.* is not allowed"):
            build_first_stage({"kind": "diffusers_vae", "path": str(vae_dir), "scale_factor": bad}, image_size=16,
                              in_channels=1)


def test_scale_by_std_gives_unit_variance_latents(vae_dir):
    stage = build_first_stage({"kind": "diffusers_vae", "path": str(vae_dir), "sample_posterior": False},
                              image_size=16, in_channels=1)
    stage.scale_factor.fill_(float("nan"))  # as with scale_factor=null before the first batch
    x = images(64)
    with pytest.raises(RuntimeError, match="latent scale is not set"):
        stage.encode(x)
    halves = [latent_moments(stage.encode_unscaled(part)) for part in x.chunk(2)]  # two "ranks"
    stage.set_scale_from(*(a + b for a, b in zip(*halves)))
    z = stage.encode(x)
    assert z.double().var(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="scale_by_std gave scale_factor="):
        stage.set_scale_from(*latent_moments(torch.zeros(10)))  # constant latents


def test_latent_diffusion_trains_samples_pixels_and_its_checkpoint_is_self_contained(vae_dir, tmp_path):
    config = {"kind": "diffusers_vae", "path": str(vae_dir), "scale_factor": None}
    module = latent_module(build_first_stage({**config, "scale_factor": None}, image_size=16, in_channels=1))
    module.first_stage.scale_factor.fill_(float("nan"))  # scale_by_std at the first batch
    x = images(32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=16))
    scale = float(module.first_stage.scale_factor)
    assert scale > 0 and scale != pytest.approx(0.18215)  # computed from the data, not the VAE's default
    assert not any(p.requires_grad for p in module.first_stage.parameters())  # frozen, not in the optimizer
    samples = module.sample(DDIM(steps=5), seeds=[0, 1, 2])
    assert samples.shape == (3, 1, 16, 16) and torch.isfinite(samples).all()  # pixels, decoded
    # the checkpoint carries the first stage's structure, weights and scale: rebuilt with no VAE folder
    path = tmp_path / "ldm.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)
    description = describe_first_stage(module.first_stage, config)
    for f in vae_dir.iterdir():
        f.unlink()
    rebuilt = latent_module(build_first_stage(description, image_size=16, in_channels=1))
    rebuilt.load_state_dict(stored["state_dict"])
    assert float(rebuilt.first_stage.scale_factor) == scale
    torch.testing.assert_close(rebuilt.sample(DDIM(steps=5), seeds=[0, 1, 2]), samples)
