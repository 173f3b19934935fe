"""Turn a resolved run config into the objects of a run. The only room that calls instantiate."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from difflab.lit import DiffusionModule, ScoreModule


def build_module(cfg: DictConfig) -> DiffusionModule | ScoreModule:
    """Network, schedule (or SDE), objective and optimizer from config; fails fast on bad shapes or values."""
    if cfg.get("sde") is not None:  # score-based model: NCSN or a continuous-time SDE
        return instantiate(cfg.module, net=instantiate(cfg.model), sde=instantiate(cfg.sde),
                           optimizer=instantiate(cfg.optimizer), _convert_="all")
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
    """Lightning's Trainer with the configured callbacks and loggers."""
    loggers = build_list(cfg.get("logger"))
    return instantiate(cfg.trainer, callbacks=build_list(cfg.get("callbacks")), logger=loggers or False)
