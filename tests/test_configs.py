"""Every option of every config group composes and instantiates (Hydra compose API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from difflab.cli.trainer_setup import build_list, build_trainer
from difflab.lit.from_config import build_module
from difflab.cli.config import config_dir

CONF = Path(config_dir())
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "ddp")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


GROUPS = ["data", "model", "schedule", "objective", "timestep_sampler", "optimizer", "trainer", "callbacks", "logger"]


@pytest.mark.parametrize(
    "group, option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    extra = ["data.image_size=32", "data.channels=3"] if group == "model" and option.endswith("cifar10") else []
    if group in ("trainer", "callbacks"):  # the digits classifier is trained in test_eval; these use packaged weights
        extra.append("callbacks.evaluation.metrics.extractor=efficientnet_lite0")
    cfg = compose_train(tmp_path, [f"{group}={option}", *extra])
    if (group, option) in NEEDS_GPU and not torch.cuda.is_available():
        pytest.skip(f"trainer={option} needs a GPU; composed only")
    if group == "data":
        dm = instantiate(cfg.data)
        assert isinstance(dm, pl.LightningDataModule) and dm.image_size == cfg.data.image_size
    elif group == "trainer":
        assert isinstance(build_trainer(cfg), pl.Trainer)
    elif group in ("callbacks", "logger"):
        objs = build_list(cfg[group])
        assert objs, f"{group}={option} built nothing"
    else:
        module = build_module(cfg)
        # 8-bit images in [-1, 1], as every data module yields (the VLB's discretised decoder needs them)
        x = torch.randint(0, 256, (2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)) / 127.5 - 1
        if group != "model":  # the full-size preset is too slow to run here; it is counted in test_nets
            assert module.loss(x).shape == (2,)


@pytest.mark.parametrize("option", options("sampler"))
def test_every_sampler_option_instantiates(option):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"sampler={option}", "ckpt_path=x"])
    sampler = instantiate(cfg.sampler)
    sampler.validate(1000)
    assert sampler.nfe(1000) >= 1 or getattr(sampler, "adaptive", False)  # an adaptive ODE knows its NFE after sampling


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(tmp_path, option):
    cfg = compose_train(tmp_path, [f"experiment={option}"])
    if (cfg.get("first_stage") or {}).get("kind") == "ckpt":  # latent experiments take the user's autoencoder
        cfg.first_stage.ckpt_path = "an-untrained-small-preset"
    build_module(cfg, load_autoencoder=small_autoencoder(cfg))


def small_autoencoder(cfg):
    """For latent experiments (first_stage=ckpt, a path the user gives): an untrained first_stage_model=small."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from difflab.lit.from_config import autoencoder_from_config

    def load(path: str):
        preset = OmegaConf.load(Path(config_dir()) / "first_stage_model" / "small.yaml")
        preset.image_size, preset.in_channels = cfg.data.image_size, cfg.data.channels
        net = autoencoder_from_config(OmegaConf.to_container(preset), source=path)
        net.stored_config = OmegaConf.to_container(preset)
        return net.eval().requires_grad_(False)

    return load


def test_resolved_config_has_no_missing_values(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_train(tmp_path, [])
    for key, node in cfg.items():
        if key != "hydra" and OmegaConf.is_config(node):
            OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert cfg.logger.wandb.offline in (True, False)


def test_wandb_run_name_and_sweep_group(tmp_path):
    from hydra.types import RunMode

    cfg = compose_train(tmp_path, ["schedule=cosine", "seed=3"])
    assert cfg.logger.wandb.name == "schedule=cosine,seed=3"
    assert cfg.logger.wandb.group is None
    cfg = compose_train(tmp_path, ["hydra.mode=MULTIRUN", "hydra.sweep.dir=outputs/multirun/2026-01-01/10-00-00"])
    assert HydraConfig.get().mode == RunMode.MULTIRUN
    assert cfg.logger.wandb.group == "outputs_multirun_2026-01-01_10-00-00"


def test_default_digits_run_is_unchanged(tmp_path):
    """The relative defaults resolve to the embedded demo's values: attention at 4, 64-image grids on all
    T steps, 500 evaluation samples; the net is the one every digits checkpoint holds."""
    from difflab.nets.unet import UNet

    cfg = compose_train(tmp_path, [])
    assert list(cfg.model.attn_resolutions) == [4]
    assert cfg.callbacks.sample_grid.num_samples == 64 and cfg.callbacks.evaluation.num_samples == 500
    assert cfg.callbacks.sample_grid.samplers.ddpm.steps == cfg.schedule.T  # all T: the same process as null
    net = instantiate(cfg.model)
    before = UNet(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,),
                  dropout=0.0, num_heads=1, channels_last=True)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in before.state_dict().items()}


def test_ddpm_on_all_steps_equals_steps_null():
    from difflab.diffusion.schedules import NoiseSchedule, linear_betas
    from difflab.samplers import ddpm_sample

    sched = NoiseSchedule.from_betas(linear_betas(40))

    def model_fn(x_t, t):
        return torch.tanh(x_t) * (1 + t[:, None, None, None] / 40)

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = (ddpm_sample(model_fn, x_T, sched, steps=s, generator=torch.Generator().manual_seed(1)) for s in (None, 40))
    assert torch.equal(a, b)


@pytest.mark.parametrize("size", [64, 32, 28])
def test_default_model_and_callbacks_fit_own_images(tmp_path, size):
    """data=image_folder with any image size: attention at size // 2, and end-of-run sampling that costs
    about what the digits run's does (images x steps x pixels)."""
    cfg = compose_train(tmp_path, ["data=image_folder", f"data.image_size={size}", "model=default"])
    net = instantiate(cfg.model)
    assert net.attn_resolutions == (size // 2,)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert net(x, torch.tensor([5])).shape == x.shape
    grid, evaluation = cfg.callbacks.sample_grid, cfg.callbacks.evaluation
    digits_grid, digits_eval = 64 * (1000 + 50) * 8**2, 500 * 50 * 8**2
    assert grid.num_samples >= 4 and grid.samplers.ddpm.steps >= 100
    assert grid.num_samples * (grid.samplers.ddpm.steps + grid.samplers.ddim.steps) * size**2 <= digits_grid
    assert 10 <= evaluation.num_samples and evaluation.num_samples * 50 * size**2 <= 1.5 * digits_eval
    cfg = compose_train(tmp_path, ["data=image_folder", f"data.image_size={size}", "model.attn_resolutions=[]"])
    assert instantiate(cfg.model).attn_resolutions == ()  # absolute resolutions still work
