"""The training-time evaluation callback: every N steps (and at the end) the metrics' evaluation engine
(difflab.metrics.evaluation) scores each sampler with FID/IS/KID/PR on all ranks; rank zero writes
<run dir>/eval/ (difflab.metrics.reports) and logs eval/<metric>/<sampler>-<steps>.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from difflab.metrics.evaluation import check_guidance_scales, evaluate_samplers
from difflab.metrics.generative import GenerativeMetrics
from difflab.metrics.reference import shared_reference
from difflab.metrics.reports import flat_metrics, format_table, write_results
from difflab.nets.inference import autocast_dtype
from difflab.samplers.base import Sampler
from difflab.samplers.generate import Guidance

log = logging.getLogger("difflab")


class Evaluation(pl.Callback):
    """Every N steps (and at the end of training) score each sampler with FID/IS/KID/PR on all ranks."""

    def __init__(
        self,
        *,
        metrics: GenerativeMetrics,
        samplers: Mapping[str, Sampler],
        dataset: str,
        cache_dir: str,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 250,
        seed: int = 0,
        use_ema: bool = True,
        reference_split: str = "train",
        reference_images: int | None = None,
        at_train_end: bool = True,
        guidance_scales: Sequence[float] | None = None,
        precision: str | int | None = None,
    ) -> None:
        if precision is not None:
            autocast_dtype(precision)  # names the bad value before any training
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"every_n_steps={every_n_steps}, num_samples={num_samples}, batch_size={batch_size}: "
                "need every_n_steps >= 1, num_samples >= 2, batch_size >= 1"
            )
        self.guidance_scales = None if not guidance_scales else [Guidance(scale=float(w)).scale for w in guidance_scales]
        self.metrics, self.samplers, self.dataset, self.cache_dir = metrics, dict(samplers), dataset, cache_dir
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.seed, self.use_ema, self.at_train_end = seed, use_ema, at_train_end
        self.reference_split, self.reference_images = reference_split, reference_images
        self.precision = precision  # sampling precision: None float32, bf16-mixed / 16-mixed autocast
        self._last_step = -1
        self.prompt_sets: dict[str, list[list[str]]] | None = None  # set in setup for a text model
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.prompt_sets = None  # a text model is scored on its data's class prompts (training and held-out phrasings)
        if getattr(pl_module, "is_text_model", False):
            self.prompt_sets = getattr(trainer.datamodule, "class_prompt_sets", lambda: None)()
            if self.prompt_sets is None:
                raise ValueError("callbacks.evaluation scores a text-to-image model by class prompts, which this data "
                                 "has none of (digits, mnist, fashion_mnist have); set callbacks.evaluation=null")
        else:
            check_guidance_scales(self.guidance_scales, getattr(pl_module, "num_classes", None))
        for sampler in self.samplers.values():
            pl_module.check_sampler(sampler)
        self.metrics.to(pl_module.device)
        self.metrics.set_reference(shared_reference(
            trainer.datamodule, self.metrics.extractor, dataset=self.dataset, split=self.reference_split,
            cache_dir=self.cache_dir, num_images=self.reference_images, is_rank_zero=trainer.is_global_zero,
            barrier=trainer.strategy.barrier,
        ))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        rows = evaluate_samplers(
            pl_module, self.samplers, self.metrics, T=pl_module.schedule.T, num_samples=self.num_samples,
            batch_size=self.batch_size, seed=self.seed, rank=trainer.global_rank,
            world_size=trainer.world_size, use_ema=self.use_ema, guidance_scales=self.guidance_scales,
            num_classes=getattr(pl_module, "num_classes", None), precision=self.precision,
            prompt_sets=self.prompt_sets,
        )
        for r in rows:
            r["step"] = step
        self.history.extend(rows)
        # on every rank, so ModelCheckpoint / EarlyStopping can monitor them and a sweeper can read them
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in flat_metrics(rows).items()})
        self._publish(trainer, rows, step)

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer, rows: list[dict[str, Any]], step: int) -> None:
        out = Path(trainer.default_root_dir) / "eval"
        paths = write_results(self.history, out, "metrics", {"last_step": step})
        log.info("evaluation at step %d (%s, %d samples):\n%s", step, self.metrics.extractor.name,
                 self.num_samples, format_table(rows))
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(rows), step=step)
            if isinstance(logger, WandbLogger):
                columns = [k for k in rows[0] if k != "settings"]
                logger.log_table(key="eval/quality_vs_nfe", columns=columns,
                                 data=[[r[c] for c in columns] for r in rows], step=step)
                logger.log_image(key="eval/quality_vs_nfe_plot", images=[str(paths["png"])], step=step)
                if "fid_vs_is" in paths:
                    logger.log_image(key="eval/fid_vs_is_plot", images=[str(paths["fid_vs_is"])], step=step)
