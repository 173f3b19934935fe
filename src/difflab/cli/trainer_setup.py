"""Turn a resolved run config into the objects of a run. The only room that calls instantiate."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from difflab.cli.cluster import slurm_plugins
from difflab.lit import DiffusionModule, ScoreModule
from difflab.lit.mixed_precision import BF16_MIXED, FP16_MIXED, BF16MixedPrecision


def data_num_classes(cfg: DictConfig) -> int:
    """num_classes of the configured data module's class (no data is loaded); refuses unlabelled data."""
    k = getattr(get_class(cfg.data._target_), "num_classes", None)
    if k is None:
        raise ValueError(
            f"model.num_classes=auto but data {cfg.data._target_} has no class labels; use an unconditional "
            "model (model.num_classes=null) or labelled data (digits, mnist, fashion_mnist, cifar10)"
        )
    return int(k)


def net_overrides(cfg: DictConfig, objective: object) -> dict[str, Any]:
    """model.num_classes=auto -> the data's class count; out_channels=null -> 2C for learned-variance objectives."""
    out: dict[str, Any] = {}
    if cfg.model.get("num_classes") == "auto":
        out["num_classes"] = data_num_classes(cfg)
    if cfg.model.get("out_channels", "absent") is None and getattr(objective, "variance", "fixed") != "fixed":
        out["out_channels"] = 2 * int(cfg.model.in_channels)
    return out


def build_module(cfg: DictConfig) -> DiffusionModule | ScoreModule:
    """Network, schedule (or SDE), objective and optimizer from config; fails fast on bad shapes or values."""
    score = str(cfg.module.get("_target_", "")).endswith("ScoreModule")
    if (cfg.get("sde") is not None) != score:
        raise ValueError(
            f"sde={'set' if cfg.get('sde') is not None else 'null'} does not fit module={cfg.module.get('_target_')}: "
            "a score model needs both module=score and sde=vp|subvp|ve|ncsn (e.g. experiment=digits_vpsde); "
            "a DDPM needs module=diffusion and sde=null"
        )
    if score:  # score-based model: NCSN or a continuous-time SDE
        return instantiate(cfg.module, net=instantiate(cfg.model), sde=instantiate(cfg.sde),
                           optimizer=instantiate(cfg.optimizer), _convert_="all")
    objective = instantiate(cfg.objective)
    extra = {"timestep_sampler": instantiate(cfg.timestep_sampler)} if cfg.get("timestep_sampler") else {}
    return instantiate(
        cfg.module,
        net=instantiate(cfg.model, **net_overrides(cfg, objective)),
        betas=instantiate(cfg.schedule),
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        _convert_="all",
        **extra,
    )


def build_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group that has a _target_ (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c, _convert_="all") for c in group.values() if c and "_target_" in c]


def check_gpus(trainer_cfg: DictConfig) -> None:
    """Refuse GPU settings this machine cannot satisfy, naming what was asked and what is present
    (Lightning only says "No supported gpu backend found!")."""
    accelerator, devices = str(trainer_cfg.get("accelerator", "auto")), trainer_cfg.get("devices", "auto")
    if accelerator not in ("gpu", "cuda") or (accelerator == "gpu" and torch.backends.mps.is_available()):
        return
    present = torch.cuda.device_count()
    if present == 0:
        raise ValueError(
            f"trainer.accelerator={accelerator} (devices={devices}) but no CUDA GPU is visible here "
            "(torch.cuda.device_count() == 0); use trainer=cpu, trainer=ddp_cpu, or run on a GPU machine"
        )
    if isinstance(devices, int) and devices > present or not isinstance(devices, (int, str)) and max(devices) >= present:
        raise ValueError(f"trainer.devices={devices} asks for GPUs this machine does not have: "
                         f"it has {present} (ids 0..{present - 1}); use devices <= {present} or devices=auto")


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """Lightning's Trainer with the configured callbacks, loggers and plugins (+ SLURM's, under srun);
    impossible GPU requests fail first."""
    check_gpus(cfg.trainer)
    loggers = build_list(cfg.get("logger"))
    plugins = [instantiate(p, _convert_="all") for p in cfg.trainer.get("plugins") or []]
    slurm = cfg.get("slurm") or {}
    plugins += slurm_plugins(auto_requeue=bool(slurm.get("auto_requeue", True)),
                             signal_name=str(slurm.get("requeue_signal", "USR2")))
    overrides = {}
    precision = cfg.trainer.get("precision")
    check_precision(precision, cfg.trainer.get("gradient_clip_val"), cfg.get("optimizer"))
    if precision in BF16_MIXED:  # Lightning's own plugin would refuse to clip for the fused AdamW
        plugins.append(BF16MixedPrecision(device=autocast_device(cfg.trainer.get("accelerator", "auto"))))
        overrides["precision"] = None
    return instantiate(cfg.trainer, callbacks=build_list(cfg.get("callbacks")), logger=loggers or False,
                       plugins=plugins or None, **overrides)


def autocast_device(accelerator: str) -> str:
    """The device type Lightning's accelerator choice autocasts on: cuda for GPUs, else cpu."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_precision(precision: str | int | None, gradient_clip_val: float | None, optimizer_cfg: Any) -> None:
    """float16 + GradScaler cannot clip before a fused step (its gradients are still scaled): fail first."""
    fused = bool((optimizer_cfg or {}).get("fused", False))
    if precision in FP16_MIXED and fused and gradient_clip_val:
        raise ValueError(
            f"trainer.precision={precision} scales the loss, and a fused optimizer (optimizer.fused=true) "
            f"unscales inside its step, so trainer.gradient_clip_val={gradient_clip_val} would clip scaled "
            "gradients; use trainer.precision=bf16-mixed, optimizer.fused=false or trainer.gradient_clip_val=null"
        )
