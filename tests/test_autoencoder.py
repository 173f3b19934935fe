"""The latent-diffusion first stage (issue 19): AutoencoderKL shapes for every f, the posterior's KL and sampling
against closed forms, the GAN losses on hand-checked cases, config refusals, and one tiny difflab-train run whose
checkpoint load_first_stage reads back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from difflab.callbacks.reconstruction_grid import first_images, pair_grid
from difflab.data.transforms import to_uint8
from difflab.diffusion.autoencoder_losses import adaptive_weight, generator_loss, hinge_d_loss, reconstruction_loss
from difflab.lit.checkpoint_io import RUN_KINDS, load_first_stage, load_run, read_checkpoint
from difflab.lit.from_config import build_module
from difflab.nets.autoencoder import AutoencoderKL, DiagonalGaussian
from difflab.nets.discriminator import NLayerDiscriminator, output_size
from test_configs import compose_train


def tiny(ch_mult=(1, 2), image_size=16, **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    args = dict(image_size=image_size, in_channels=3, ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=3)
    return AutoencoderKL(**{**args, **kw})


# ------------------------------------------------------------------------------------------- the net


@pytest.mark.parametrize("ch_mult, f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_encoder_decoder_shapes_for_every_factor(ch_mult, f):
    net = tiny(ch_mult, attn_resolutions=(16 // f,))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = net.encode(x)
    assert posterior.moments.shape == (2, 6, 16 // f, 16 // f)
    assert net.factor == f and net.z_channels == 3 and net.latent_shape == (3, 16 // f, 16 // f)
    x_hat, q = net(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and q.mean.shape == (2, *net.latent_shape)
    assert net.decode(posterior.mode()).shape == x.shape


def test_channels_last_gives_the_same_reconstruction():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = tiny(channels_last=False), tiny(channels_last=True)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x, sample_posterior=False)[0], b(x, sample_posterior=False)[0], atol=1e-5, rtol=1e-4)


def test_bad_factors_sizes_and_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"f = 2\^4 = 16; allowed: f in \(1, 2, 4, 8\)"):
        tiny((1, 1, 1, 1, 1), image_size=32)
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        tiny((1, 2, 2), image_size=30)
    with pytest.raises(ValueError, match="attn_resolutions=.* contains 3"):
        tiny(attn_resolutions=(3,))
    with pytest.raises(ValueError, match=r"z has shape \(1, 3, 4, 4\); this AutoencoderKL expects \(B, 3, 8, 8\)"):
        tiny().decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 16, 16\)"):
        tiny().encode(torch.zeros(1, 1, 16, 16))


def test_presets_have_ldm_shapes(tmp_path):
    """kl_f8 has exactly the parameter count of Stable Diffusion's VAE (LDM's KL-f8), kl_f4 LDM's 55.3M."""
    expected = {"kl_f4": (55_312_063, (3, 64, 64)), "kl_f8": (83_653_863, (4, 32, 32))}
    for preset, (count, shape) in expected.items():
        cfg = compose_train(tmp_path, ["module=autoencoder", f"first_stage_model={preset}", "data=image_folder",
                                       "data.image_size=256", "data.channels=3"])
        with torch.device("meta"):  # no memory, no init work
            net = instantiate(cfg.first_stage_model)
        assert (net.num_parameters, net.latent_shape) == (count, shape), preset
    for preset, shape in (("small", (4, 8, 8)), ("tiny", (2, 16, 16))):
        cfg = compose_train(tmp_path, ["module=autoencoder", f"first_stage_model={preset}", "data=image_folder",
                                       "data.image_size=32", "data.channels=1"])
        assert instantiate(cfg.first_stage_model).latent_shape == shape, preset


# ------------------------------------------------------------------------------------- the posterior


def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(1)
    moments = torch.randn(3, 4, 2, 5, generator=g) * 2
    q = DiagonalGaussian(moments)
    mu, logvar = moments[:, :2], moments[:, 2:]
    closed = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), closed)
    torch.testing.assert_close(q.kl(), reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 4, 3, 3)).kl(), torch.zeros(1))  # q = N(0, I)


def test_sample_draws_from_the_posterior_and_mode_is_the_mean():
    mean = torch.tensor([-1.0, 0.5, 3.0]).view(1, 3, 1, 1).expand(20_000, 3, 1, 1)
    logvar = torch.tensor([0.0, -2.0, 1.0]).view(1, 3, 1, 1).expand(20_000, 3, 1, 1)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = q.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(dim=0).flatten(), torch.tensor([-1.0, 0.5, 3.0]), atol=0.04, rtol=0)
    torch.testing.assert_close(z.var(dim=0).flatten(), torch.exp(torch.tensor([0.0, -2.0, 1.0])), atol=0.0, rtol=0.04)
    assert torch.equal(q.mode(), q.mean) and torch.equal(q.std, torch.exp(0.5 * q.logvar))
    again = q.sample(generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)  # the generator decides every draw


def test_logvar_is_clamped_as_ldm():
    q = DiagonalGaussian(torch.tensor([0.0, 0.0, -100.0, 100.0]).view(1, 4, 1, 1))
    assert q.logvar.flatten().tolist() == [-30.0, 20.0]
    with pytest.raises(ValueError, match=r"moments must be \(B, 2 z_channels, h, w\)"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------- the losses


def test_reconstruction_loss_sums_pixels_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([[0.5, -0.5, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert reconstruction_loss(x, x_hat).tolist() == [2.0, 2.0]
    assert reconstruction_loss(x, x_hat, l1_weight=0.0, l2_weight=1.0).tolist() == [1.5, 4.0]


def test_hinge_and_generator_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1 - 2) = 0, relu(0.5) = 0.5 -> 0.25; fake: relu(-1) = 0, relu(1.5) = 1.5 -> 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_d_loss(torch.tensor([1.0]), torch.tensor([-1.0])).item() == 0.0  # both margins met
    assert generator_loss(fake).item() == pytest.approx(0.75)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.nn.Parameter(torch.ones(2, 2))
    rec, g = 3.0 * w.sum(), (w**2).sum()  # gradients: 3 everywhere (norm 6), 2w = 2 everywhere (norm 4)
    weight = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 6.0 / (4.0 + 1e-4))
    assert not weight.requires_grad
    huge = adaptive_weight(w.sum() * 1e9, 0.0 * w.sum(), w)  # no GAN gradient: clamped at 1e4
    assert huge.item() == 1e4


def test_patchgan_output_and_too_small_images():
    d = NLayerDiscriminator(in_channels=1, image_size=32, channels=8, num_layers=3)
    assert d(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 2, 2) and output_size(32, 3) == 2
    with pytest.raises(ValueError, match="num_layers=3 leaves no logits for image_size=16 .* use num_layers=2"):
        NLayerDiscriminator(in_channels=1, image_size=16, num_layers=3)


def test_pair_grid_alternates_originals_and_reconstructions():
    a, b = torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.full((3, 1, 2, 2), 255, dtype=torch.uint8)
    assert pair_grid(a, b)[:, 0, 0, 0].tolist() == [0, 255] * 3


# ------------------------------------------------------------------------------------------ configs


def test_autoencoder_run_settings_refused_before_training(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=digits_autoencoder", "module.lpips_weight=0.1"])
    refusal = r"lpips_weight=0.1 asks for LPIPS .* downloaded .*module.lpips_weight=0 "
    with pytest.raises(InstantiationException, match=refusal):
        build_module(cfg)  # difflab-train builds the module before the Trainer: nothing has run yet
    cfg = compose_train(tmp_path, ["module=autoencoder", "callbacks.evaluation=null", "trainer.gradient_clip_val=null"])
    with pytest.raises(ValueError, match="callbacks.sample_grid is set; set callbacks.sample_grid=null"):
        build_module(cfg)
    cfg = compose_train(tmp_path, ["experiment=digits_autoencoder", "trainer.gradient_clip_val=1.0"])
    with pytest.raises(ValueError, match="set trainer.gradient_clip_val=null"):
        build_module(cfg)


def test_load_first_stage_refuses_a_diffusion_checkpoint(tmp_path):
    path = tmp_path / "ddpm.ckpt"
    torch.save({"difflab": {"config": {"model": {}}, "kind": "diffusion"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="is a difflab checkpoint of kind 'diffusion', not 'autoencoder'"):
        load_first_stage(path)
    assert "autoencoder" in RUN_KINDS


# -------------------------------------------------------------------------------- difflab-train end to end

TINY_RUN = [
    "experiment=digits_autoencoder", "logger=csv", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
    "callbacks.reconstruction_fid=null",  # rFID and its classifier: tests/test_reconstruction_fid.py
    "trainer.max_steps=40", "trainer.limit_train_batches=10", "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=5", "trainer.enable_model_summary=false",
    # the discriminator joins for the last 10 steps: two optimizers, global_step still counts autoencoder steps
    "module.disc_weight=0.5", "module.disc_start=30", "module.disc_layers=2", "module.disc_channels=8",
]


def train(run_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "difflab.cli.train", *TINY_RUN, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("autoencoder")
    train(run_dir)
    return run_dir


@pytest.mark.slow
def test_train_lowers_the_loss_and_logs_metrics(trained):
    rows = list(csv.DictReader((trained / "csv" / "metrics.csv").open()))
    val = [r for r in rows if r.get("val/rec_loss")]
    assert [int(r["step"]) for r in val] == [9, 19, 29, 39]
    assert float(val[-1]["val/rec_loss"]) < 0.8 * float(val[0]["val/rec_loss"])
    assert all(float(r["val/psnr"]) > 0 and 0 < float(r["val/ssim"]) <= 1 for r in val)
    train = [r for r in rows if r.get("train/rec_loss")]
    assert {"train/kl", "train/psnr", "train/ssim"} <= {k for r in train for k, v in r.items() if v}
    assert any(r.get("train/d_loss") and r.get("train/g_loss") for r in train)  # the GAN ran after disc_start
    ckpt = read_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert ckpt.kind == "autoencoder" and ckpt.global_step == 40 and len(ckpt.contents["difflab"]["rng"]) == 1
    assert ckpt.contents["difflab"]["latent_shape"] == [4, 4, 4]


@pytest.mark.slow
def test_load_first_stage_reconstructs_as_the_run_did(trained, tmp_path):
    net = load_first_stage(trained / "checkpoints" / "last.ckpt")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.latent_shape == (4, 4, 4) and net.stored_config["ch"] == 16
    # the run's end-of-training grid: originals | reconstructions of the first 32 validation images
    with Image.open(trained / "samples" / "recon_step0000040.png") as im:
        grid = np.asarray(im)[..., 0]
    cfg = compose_train(tmp_path, ["experiment=digits_autoencoder"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    x = first_images(dm.val_dataloader(), 32)
    with torch.no_grad():
        x_hat = to_uint8(net(x, sample_posterior=False)[0]).numpy()[:, 0]  # (32, 16, 16)
    side = 16 + 1  # make_grid's 1 px border
    for i in range(32):
        row, col = divmod(2 * i, 16)
        original = grid[1 + row * side: row * side + side, 1 + col * side: col * side + side]
        recon = grid[1 + row * side: row * side + side, 1 + (col + 1) * side: (col + 1) * side + side]
        assert np.array_equal(original, to_uint8(x[i, 0]).numpy())
        assert np.abs(recon.astype(int) - x_hat[i]).max() <= 1, i
    with pytest.raises(ValueError, match="kind 'autoencoder', not 'diffusion'"):
        load_run(trained / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_resume_is_exact(trained, tmp_path):
    """35 steps (the discriminator joined at 30), then resumed to 40: the same weights as 40 steps straight."""
    train(tmp_path, "trainer.max_steps=35")  # mid-epoch (10 batches each), 5 steps into the GAN
    train(tmp_path, "ckpt_path=last")
    straight = read_checkpoint(trained / "checkpoints" / "last.ckpt").state_dict
    resumed = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.global_step == 40 and straight.keys() == resumed.state_dict.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed.state_dict[key]), key


def test_the_discriminator_is_refused_under_ddp():
    from types import SimpleNamespace

    from difflab.lit.autoencoder import AutoencoderModule

    module = AutoencoderModule(net=tiny(), optimizer=torch.optim.Adam, disc_weight=0.5, disc_layers=1)
    module._trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(ValueError, match="disc_weight=0.5 trains a PatchGAN, which is not supported on 2 processes"):
        module.setup("fit")
