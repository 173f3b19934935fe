"""The Lightning Trainer of a run from its config: callbacks, loggers, plugins, GPU and precision checks."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.cli.cluster import requeue_callbacks, slurm_plugins
from difflab.lit.mixed_precision import BF16_MIXED, FP16_MIXED, BF16MixedPrecision


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
    plugins += slurm_plugins(signal_name=str(slurm.get("requeue_signal", "USR2")))
    callbacks = build_list(cfg.get("callbacks")) + requeue_callbacks(
        auto_requeue=bool(slurm.get("auto_requeue", True)), signal_name=str(slurm.get("requeue_signal", "USR2")),
        run_dir=cfg.trainer.get("default_root_dir") or ".")
    overrides = {}
    precision = cfg.trainer.get("precision")
    check_precision(precision, cfg.trainer.get("gradient_clip_val"), cfg.get("optimizer"))
    check_precision_fits_device(precision, str(cfg.trainer.get("accelerator", "auto")))
    if precision in BF16_MIXED:  # Lightning's own plugin would refuse to clip for the fused AdamW
        plugins.append(BF16MixedPrecision(device=autocast_device(cfg.trainer.get("accelerator", "auto"))))
        overrides["precision"] = None
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       plugins=plugins or None, **overrides)


def autocast_device(accelerator: str) -> str:
    """The device type Lightning's accelerator choice autocasts on: cuda for GPUs, else cpu."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_precision_fits_device(precision: str | int | None, accelerator: str) -> None:
    """16-mixed (float16 autocast + loss scaling) is a GPU precision: refuse it for CPU training."""
    if precision in FP16_MIXED and autocast_device(accelerator) == "cpu":
        raise ValueError(
            f"trainer.precision={precision} trains on the CPU here (trainer.accelerator={accelerator}, no CUDA "
            "GPU visible); float16 autocast with loss scaling is a GPU precision. On a CPU use "
            "trainer.precision=bf16-mixed (fast with AMX / AVX512-BF16) or 32-true; on a GPU machine trainer=gpu"
        )


def check_precision(precision: str | int | None, gradient_clip_val: float | None, optimizer_cfg: Any) -> None:
    """float16 + GradScaler cannot clip before a fused step (its gradients are still scaled): fail first."""
    fused = bool((optimizer_cfg or {}).get("fused", False))
    if precision in FP16_MIXED and fused and gradient_clip_val:
        raise ValueError(
            f"trainer.precision={precision} scales the loss, and a fused optimizer (optimizer.fused=true) "
            f"unscales inside its step, so trainer.gradient_clip_val={gradient_clip_val} would clip scaled "
            "gradients; use trainer.precision=bf16-mixed, optimizer.fused=false or trainer.gradient_clip_val=null"
        )
