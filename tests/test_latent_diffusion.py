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


# -- the two-stage workflow through the real CLI (difflab-train first_stage=ckpt, difflab-sample, difflab-eval) ------

AE_CONFIG = {"_target_": "difflab.nets.autoencoder.AutoencoderKL", "image_size": 8, "in_channels": 1, "ch": 8,
             "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 2, "dropout": 0.0,
             "channels_last": False}


def random_autoencoder(path, seed: int = 0):
    """A difflab autoencoder checkpoint (kind autoencoder) with random weights: f = 2, 1x8x8 -> 2x4x4."""
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    net = instantiate(AE_CONFIG)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "difflab": {"kind": "autoencoder", "config": {"first_stage_model": AE_CONFIG}}}, path)
    return path


def ldm_args(root, ae, *extra: str) -> list[str]:
    return ["first_stage=ckpt", f"first_stage.ckpt_path={ae}", f"paths.cache_dir={root / 'cache'}", "logger=csv",
            "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[2]", "schedule.T=50",
            "data.batch_size=32", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
            "callbacks.evaluation=null", "callbacks.sample_grid.every_n_steps=1000", "callbacks.sample_grid.num_samples=4",
            "callbacks.sample_grid.samplers.ddim.steps=5", "callbacks.sample_grid.samplers.ddpm=null", *extra]


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """4 steps of latent diffusion on a (random) difflab autoencoder's latents, training from cached moments,
    a checkpoint after every step; epochs of 2 steps."""
    from test_resume import cli

    root = tmp_path_factory.mktemp("ldm")
    ae = random_autoencoder(root / "ae.ckpt")
    args = ldm_args(root, ae, "first_stage.cache_latents=true", "trainer.max_steps=4",
                    "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.keep=-1")
    proc = cli("difflab.cli.train", *args, f"hydra.run.dir={root / 'run'}", cwd=root)
    return {"root": root, "ae": ae, "run": root / "run", "args": args, "log": proc.stdout + proc.stderr}


def test_an_ldm_run_derives_its_unet_from_the_latents_and_its_checkpoint_carries_the_first_stage(ldm_run):
    from test_resume import load

    ckpt = load(ldm_run["run"] / "checkpoints" / "last.ckpt")
    config = ckpt["difflab"]["config"]
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (2, 4)  # 2x4x4 latents, not 1x8x8
    stored = config["first_stage"]
    assert stored["kind"] == "embedded" and stored["autoencoder"] == "difflab" and stored["config"]["z_channels"] == 2
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("first_stage.autoencoder.")}
    ae = torch.load(ldm_run["ae"], weights_only=True)["state_dict"]
    assert len(weights) == len(ae) and all(torch.equal(v, ae["net." + k.removeprefix("first_stage.autoencoder.")])
                                           for k, v in weights.items())
    scale = float(ckpt["state_dict"]["first_stage.scale_factor"])
    assert 0 < scale < float("inf") and "scale_by_std: first_stage.scale_factor" in ldm_run["log"]
    assert (ldm_run["root"] / "cache" / "latents").is_dir()  # trained from cached moments
    assert (ldm_run["run"] / "samples" / "ddim_step0000004.png").is_file()


def test_an_ldm_run_resumes_exactly_from_mid_epoch_with_cached_latents(ldm_run):
    """Step 1 of an epoch of 2: data order, posterior noise (drawn from the saved RNG), EMA and optimizer continue."""
    from test_resume import assert_same_run, cli, load

    root, run = ldm_run["root"], ldm_run["run"]
    resumed = root / "resumed"
    cli("difflab.cli.train", *ldm_run["args"], f"ckpt_path={run / 'checkpoints' / 'step-0000001.ckpt'}",
        f"hydra.run.dir={resumed}", cwd=root)
    a, b = load(run / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert_same_run(a, b)
    assert torch.equal(a["state_dict"]["first_stage.scale_factor"], b["state_dict"]["first_stage.scale_factor"])


def test_sample_and_eval_need_nothing_but_the_ldm_checkpoint(ldm_run, tmp_path):
    import json

    import numpy as np
    from test_ddp import random_classifier
    from test_resume import cli

    ckpt = ldm_run["run"] / "checkpoints" / "last.ckpt"
    moved = tmp_path / "ldm.ckpt"
    moved.write_bytes(ckpt.read_bytes())
    ldm_run["ae"].unlink()  # the autoencoder's files are gone: the checkpoint is self-contained
    cli("difflab.cli.sample", f"ckpt_path={moved}", "sampler=ddim", "sampler.steps=4", "num_samples=3",
        f"out_dir={tmp_path / 's'}", cwd=tmp_path)
    images = np.load(tmp_path / "s" / "ddim-4_n3_seed0.npz")["images"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8  # decoded: pixels, not 2x4x4 latents
    proc = cli("difflab.cli.evaluate", f"ckpt_path={moved}", "num_samples=8", "batch_size=4", "samplers=[ddim-3]",
               "metrics.extractor=classifier", f"metrics.classifier_ckpt={random_classifier(tmp_path / 'clf.ckpt')}",
               "metrics.names=[fid,precision_recall]", "reference.num_images=32", f"out_dir={tmp_path / 'e'}",
               f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert result["results"][0]["sampler"] == "ddim-3" and np.isfinite(result["results"][0]["fid"])
    assert "bits/dim skipped: this is a latent diffusion model" in proc.stdout + proc.stderr


def test_a_stale_latent_cache_and_mismatched_checkpoints_are_refused_before_training(ldm_run, tmp_path):
    from test_resume import cli

    root = ldm_run["root"]
    other = random_autoencoder(tmp_path / "other.ckpt", seed=1)
    cache = next((root / "cache" / "latents").glob("*.pt"))
    cases = [
        ([f"first_stage.ckpt_path={other}", "first_stage.cache_latents=true", f"first_stage.cache_path={cache}"],
         "was made by other first-stage weights"),
        ([f"first_stage.ckpt_path={ldm_run['run'] / 'checkpoints' / 'last.ckpt'}"], "of kind 'diffusion', not 'autoencoder'"),
        ([f"first_stage.ckpt_path={other}", "model.in_channels=1"], "model.in_channels=1 does not fit the first stage"),
        ([f"first_stage.ckpt_path={other}", "first_stage.scale_factor=0"], r"first_stage.scale_factor=0 is not allowed"),
        ([f"first_stage.ckpt_path={other}", "data.image_size=16"], "trained on 8x8 images but data.image_size=16"),
    ]
    for extra, message in cases:
        run = tmp_path / f"bad{len(extra)}{abs(hash(message)) % 1000}"
        proc = cli("difflab.cli.train", *ldm_args(root, other, "trainer.max_steps=1"), *extra, f"hydra.run.dir={run}",
                   cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr[-1500:])
        assert not (run / "checkpoints").exists()
    # a pixel run resumed from the LDM checkpoint, and the reverse: refused by name
    proc = cli("difflab.cli.train", "trainer.max_steps=1", f"ckpt_path={ldm_run['run'] / 'checkpoints' / 'last.ckpt'}",
               f"hydra.run.dir={tmp_path / 'pix'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "is a latent diffusion (it has a first stage) run" in proc.stderr


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_latent_scale_of_the_global_first_batch(tmp_path):
    """scale_by_std under 2-process DDP: each rank encodes its half of the first global batch, the moments are
    summed over ranks, so both hold 1 / std of the whole batch's latents (posterior mean: deterministic)."""
    from difflab.data import DigitsDataModule
    from difflab.data.base import EpochPermutationSampler
    from difflab.data.transforms import to_model_range
    from difflab.lit.checkpoint_io import load_first_stage
    from test_resume import cli

    ae = random_autoencoder(tmp_path / "ae.ckpt")
    cli("difflab.cli.train", *ldm_args(tmp_path, ae, "trainer=ddp_cpu", "trainer.max_steps=1", "seed=3",
                                       "first_stage.sample_posterior=false", "callbacks.sample_grid=null",
                                       "+callbacks.probe._target_=hydra_test_targets.RankWeights",
                                       f"+callbacks.probe.out_dir={tmp_path / 'probe'}"),
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    scales = [float(torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=True)["state_dict"]
                    ["first_stage.scale_factor"]) for r in (0, 1)]
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=32, num_workers=0, val_fraction=0.1, seed=0, hflip=False)
    order = list(EpochPermutationSampler(dm.train_dataset, num_replicas=1, rank=0, seed=3))[:32]
    stage = FirstStage(load_first_stage(ae), latent_shape=(2, 4, 4), sample_posterior=False)
    z = stage.encode_unscaled(to_model_range(dm.train_dataset.__getitems__(order)[0])).double()
    assert scales[0] == scales[1] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-5)


def test_every_sampler_and_classifier_free_guidance_run_on_a_class_conditional_latent_model(tmp_path):
    """Latents are not clipped to [-1, 1] (clip_x0 is a pixel rule), outputs are decoded pixels; dynamic
    thresholding and classifier guidance are refused by name."""
    from difflab.samplers import DDPM, PFODE, DPMSolverPP, Heun

    tiny_vae().save_pretrained(tmp_path / "vae")  # its own copy: another test deletes the shared one
    stage = build_first_stage({"kind": "diffusers_vae", "path": str(tmp_path / "vae")}, image_size=16, in_channels=1)
    torch.manual_seed(1)
    net = UNet(image_size=8, in_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.0, num_classes=3)
    module = DiffusionModule(net=net, betas=linear_betas(100), first_stage=stage,
                             optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    clipped = []
    original = DDIM.__call__

    def spy(self, *args, **kwargs):
        clipped.append(self.clip_x0)
        return original(self, *args, **kwargs)

    DDIM.__call__ = spy
    try:
        for sampler in (DDPM(steps=5), DDIM(steps=4), Heun(steps=3), DPMSolverPP(steps=4), PFODE(rtol=1e-2, atol=1e-2)):
            out = module.sample(sampler, seeds=[0, 1], labels=[0, 2], guidance_scale=2.0)
            assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all(), sampler
    finally:
        DDIM.__call__ = original
    assert clipped == [False]  # DDIM(clip_x0=True) ran with the latent unclipped
    with pytest.raises(ValueError, match="sampler.dynamic_percentile=0.995 thresholds pixel values"):
        module.check_sampler(DDIM(steps=4, clip_x0=False, dynamic_percentile=0.995))
    with pytest.raises(ValueError, match="classifier guidance needs a noise-aware classifier of this model's latents"):
        module.sample(DDIM(steps=2), seeds=[0], labels=[1], classifier=torch.nn.Identity(), classifier_scale=1.0)
