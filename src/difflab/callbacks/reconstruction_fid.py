"""rFID of a first stage (an autoencoder module) during training: at the end of every validation (and of
training) the first `num_images` held-out images and their reconstructions (pl_module.reconstruct, the
posterior mode) go through the metrics' extractor on all ranks, each rank taking its block as the
evaluation engine does; logged as val/rfid, and rank zero writes <run dir>/eval/reconstruction.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from difflab.metrics.reconstruction import ReconstructionMetrics, evaluate_reconstructions

log = logging.getLogger("difflab")
KEY = "val/rfid"


def held_out_images(datamodule: Any) -> Any:
    """The data module's held-out (val) dataset, whose `__getitems__(indices)` gives (uint8 images, labels)."""
    dataset = getattr(datamodule, "val_dataset", None)
    if dataset is None or not callable(getattr(dataset, "__getitems__", None)):
        raise ValueError(f"ReconstructionFID reads held-out images from the data module's val_dataset.__getitems__ "
                         f"(difflab's image data modules have it); {type(datamodule).__name__} has none: set "
                         "callbacks.reconstruction_fid=null or use a difflab data module")
    return dataset


def images_at(dataset: Any, indices: Sequence[int]) -> torch.Tensor:
    """uint8 images (B, C, H, W) of `dataset` at `indices`."""
    images = dataset.__getitems__(list(indices))[0]
    if images.dtype != torch.uint8:
        raise TypeError(f"the held-out dataset gives {images.dtype} images; rFID needs uint8 (B, C, H, W)")
    return images


class ReconstructionFID(pl.Callback):
    """val/rfid at every validation (and at the end of training): FID of reconstructions vs their originals."""

    def __init__(self, *, metrics: ReconstructionMetrics, num_images: int = 1000, batch_size: int = 250,
                 at_train_end: bool = True) -> None:
        for name, value, minimum in (("num_images", num_images, 2), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"callbacks.reconstruction_fid.{name}={value!r} is not allowed: use an int >= {minimum}")
        self.metrics, self.num_images, self.batch_size = metrics, num_images, batch_size
        self.at_train_end = at_train_end
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "reconstruct", None)):
            raise ValueError(f"callbacks.reconstruction_fid scores a first stage's reconstructions, but "
                             f"{type(pl_module).__name__} has no reconstruct(x); set callbacks.reconstruction_fid=null")
        self.metrics.to(pl_module.device)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        rfid = self._evaluate(trainer, pl_module)
        pl_module.log(KEY, rfid, prog_bar=True)  # the same value on every rank: no sync needed

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_train_end or trainer.global_step == self._last_step:
            return
        rfid = self._evaluate(trainer, pl_module)
        trainer.callback_metrics[KEY] = torch.tensor(rfid)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({KEY: rfid}, step=trainer.global_step)
                logger.save()

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        step = self._last_step = trainer.global_step
        dataset = held_out_images(trainer.datamodule)
        n = min(self.num_images, len(dataset))
        start = time.perf_counter()
        rfid = evaluate_reconstructions(
            pl_module.reconstruct, lambda indices: images_at(dataset, indices), self.metrics, num_images=n,
            batch_size=self.batch_size, rank=trainer.global_rank, world_size=trainer.world_size,
            originals_key=id(dataset),  # the same held-out images every time: their features are computed once
        )["rfid"]
        self.history.append({"step": step, "rfid": rfid, "num_images": n, "extractor": self.metrics.extractor.name,
                             "seconds": round(time.perf_counter() - start, 2)})
        self._publish(trainer)
        return rfid

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer) -> None:
        row = self.history[-1]
        log.info("rFID at step %d: %.4f (%d held-out images, %s features, %.1f s)", row["step"], row["rfid"],
                 row["num_images"], row["extractor"], row["seconds"])
        out = Path(trainer.default_root_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "reconstruction.json").write_text(json.dumps({"results": self.history}, indent=2))
