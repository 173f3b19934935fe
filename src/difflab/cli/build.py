"""Turn a resolved run config into the objects of a run. The only room that calls instantiate."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.cli.cluster import slurm_plugins
from difflab.lit import DiffusionModule


def build_module(cfg: DictConfig) -> DiffusionModule:
    """Network, schedule, objective and optimizer from config; fails fast on bad shapes or values."""
    return instantiate(
        cfg.module,
        net=instantiate(cfg.model),
        betas=instantiate(cfg.schedule),
        objective=instantiate(cfg.objective),
        optimizer=instantiate(cfg.optimizer),
        _convert_="all",
    )


def build_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group that has a _target_ (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(c, _convert_="all") for c in group.values() if c and "_target_" in c]


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """Lightning's Trainer with the configured callbacks, loggers and plugins (+ SLURM's, under srun)."""
    loggers = build_list(cfg.get("logger"))
    plugins = [instantiate(p, _convert_="all") for p in cfg.trainer.get("plugins") or []]
    slurm = cfg.get("slurm") or {}
    plugins += slurm_plugins(auto_requeue=bool(slurm.get("auto_requeue", True)),
                             signal_name=str(slurm.get("requeue_signal", "USR2")))
    return instantiate(cfg.trainer, callbacks=build_list(cfg.get("callbacks")), logger=loggers or False,
                       plugins=plugins or None)
