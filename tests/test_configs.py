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
    build_module(cfg)


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
