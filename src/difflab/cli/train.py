"""difflab-train: train a diffusion model from the Hydra config tree (conf/train.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from difflab.cli.build import build_module, build_trainer
from difflab.cli.common import config_dir, flush_denormals, to_container

log = logging.getLogger("difflab")


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything (failing fast on bad input), fit, and return the final callback metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg)
    module.run_config = to_container(cfg)
    trainer = build_trainer(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(module.run_config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    _finish_wandb(trainer)
    if trainer.is_global_zero:
        _report(Path(cfg.paths.output_dir))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run so sweeps do not merge runs (ECOSYSTEM-NOTES: multirun)."""
    from pytorch_lightning.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def _report(run_dir: Path) -> None:
    log.info("run directory: %s", run_dir)
    for sub in ("checkpoints", "samples"):
        for f in sorted((run_dir / sub).glob("*")):
            log.info("  %s", f)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    flush_denormals()
    train(cfg)


if __name__ == "__main__":
    main()
