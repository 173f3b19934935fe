"""difflab-train-classifier: train the small CNN whose features give offline FID/IS on small data.

conf/train_classifier.yaml; the final model is written (atomically) to out_path, by default
${paths.cache_dir}/classifiers/<data>_<image_size>px.ckpt, and read back with load_classifier.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from difflab.cli.trainer_setup import build_trainer
from difflab.cli.config import to_container
from difflab.cli.process_setup import hydra_entry_point
from difflab.lit.checkpoint_io import load_classifier
from difflab.lit.classifier import ClassifierModule
from difflab.metrics.build import train_classifier_command

__all__ = ["build_classifier_module", "load_classifier", "main", "train_classifier", "train_command"]

log = logging.getLogger("difflab")
_DEFAULT_NAME = re.compile(r"^(?P<data>[A-Za-z0-9_]+)_(?P<size>\d+)px\.ckpt$")  # out_path's default file name


def train_command(path: str | Path) -> str:
    """The command that writes a classifier to `path` (data and size read from a default file name)."""
    match = _DEFAULT_NAME.match(Path(path).name)
    data, size = (match["data"], int(match["size"])) if match else ("digits", 8)
    return train_classifier_command(data, size, path)


def save_atomic(trainer: pl.Trainer, path: str | Path) -> Path:
    """trainer.save_checkpoint(path): weights + on_save_checkpoint's config. Atomic through the
    trainer's AtomicCheckpointIO plugin (trainer/default.yaml), which every difflab trainer uses."""
    path = Path(path).expanduser().resolve()
    trainer.save_checkpoint(path, weights_only=True)
    return path


def build_classifier_module(cfg: DictConfig) -> ClassifierModule:
    """Net, module and optimizer from cfg.classifier; fails fast on bad shapes or values."""
    return hydra.utils.instantiate(
        cfg.classifier.module,
        net=hydra.utils.instantiate(cfg.classifier.net),
        optimizer=hydra.utils.instantiate(cfg.classifier.optimizer),
        _convert_="all",
    )


def _check_classes(module: ClassifierModule, datamodule: pl.LightningDataModule) -> None:
    expected = getattr(datamodule, "num_classes", None)
    if expected is None:
        raise ValueError(f"{type(datamodule).__name__} has no class labels (num_classes=None); a classifier needs them")
    if module.net.num_classes != expected:
        raise ValueError(
            f"classifier.net.num_classes={module.net.num_classes} but {type(datamodule).__name__} has "
            f"num_classes={expected}; set classifier.net.num_classes={expected}"
        )


def _set_num_threads(num_threads: int | None) -> None:
    if num_threads is None:
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive int, or null for torch's default")
    torch.set_num_threads(num_threads)


def train_classifier(cfg: DictConfig) -> dict[str, float | str]:
    """Build everything (failing fast), fit, validate the final weights, save them to cfg.out_path."""
    _set_num_threads(cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_classifier_module(cfg)
    _check_classes(module, datamodule)
    module.run_config = to_container(cfg)
    trainer = build_trainer(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(module.run_config)
    trainer.fit(module, datamodule=datamodule)
    (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    path = save_atomic(trainer, cfg.out_path)
    if trainer.is_global_zero:
        print(f"classifier: {path}")
        print(f"val/acc: {final['val/acc']:.4f} (val/loss {final['val/loss']:.4f}, step {trainer.global_step})")
        log.info("run directory: %s", Path(cfg.paths.output_dir))
    return {"out_path": str(path), **{k: float(v) for k, v in final.items()}}


main = hydra_entry_point("train_classifier", train_classifier)


if __name__ == "__main__":
    main()
