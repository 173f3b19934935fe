"""Periodic fixed-seed sample grids from the EMA weights, one per configured sampler.

Under DDP each rank draws its contiguous block of the seeds (sample i always uses seed + i), the
blocks are gathered, and rank zero writes and logs the grid: the same grid on any number of ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import make_grid

from difflab.metrics.evaluation import shard
from difflab.data.transforms import to_uint8
from difflab.samplers.base import Sampler
from difflab.samplers.generate import Guidance


def grid_image(images: torch.Tensor, nrow: int | None = None, min_width: int = 256) -> np.ndarray:
    """(N, C, H, W) uint8 images -> one (H', W', 3) uint8 grid with nrow columns (default ~sqrt N).

    A grid narrower than min_width pixels is enlarged by the smallest integer factor that reaches it,
    nearest neighbour (every pixel becomes a k x k block), so 8x8 digits stay readable; arrays of
    samples (difflab-sample's .npz) keep the native resolution.
    """
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.cpu(), nrow=nrow, padding=1, pad_value=0)  # (3, H', W')
    factor = max(1, math.ceil(min_width / grid.shape[-1]))
    if factor > 1:
        grid = grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # (3, k H', k W')
    return grid.permute(1, 2, 0).numpy()


def gather_samples(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    sampler: Sampler,
    seed: int,
    n: int,
    use_ema: bool,
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    prompts: list[str] | None = None,
) -> torch.Tensor:
    """uint8 samples (n, C, H, W) for seeds seed..seed+n-1 (labels[i] or prompts[i] for sample i), each rank drawing its block."""
    world, rank = trainer.world_size, trainer.global_rank
    block = shard(n, rank, world)
    # a rank with an empty block still draws one image: all_gather needs the same shape everywhere
    stop = max(block.stop, block.start + 1)
    seeds = range(seed + block.start, seed + stop)
    kwargs = {}
    if labels is not None:
        padded_labels = torch.cat([labels, labels[-1:].expand(max(0, stop - n))])
        kwargs = {"labels": padded_labels[block.start: stop], "guidance_scale": guidance_scale}
    if prompts is not None:
        padded_prompts = prompts + prompts[-1:] * max(0, stop - n)
        kwargs = {"prompts": padded_prompts[block.start: stop], "guidance_scale": guidance_scale}
    local = to_uint8(pl_module.sample(sampler, seeds, use_ema=use_ema, **kwargs))  # (len(seeds), C, H, W)
    if world == 1:
        return local[: len(block)]
    per = -(-n // world)  # the largest block
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[: len(block)] = local[: len(block)]
    gathered = trainer.strategy.all_gather(padded)  # (world, per, C, H, W)
    return torch.cat([gathered[r, : len(shard(n, r, world))] for r in range(world)]).cpu()


class SampleGrid(pl.Callback):
    """Every N steps (and at the end of training) sample a fixed-seed grid with each sampler.

    For a class-conditional model (pl_module.num_classes set) with per_class=True the grid has one
    row per class, num_samples // num_classes images each, drawn with classifier-free guidance
    scale `guidance_scale` (0 unconditional, 1 conditional, > 1 guided). A text-to-image model on data with
    class captions gets the same rows, each drawn from a prompt of its class (its first training phrasing).
    """

    def __init__(
        self,
        *,
        samplers: Mapping[str, Sampler],
        every_n_steps: int = 1000,
        num_samples: int = 64,
        seed: int = 0,
        use_ema: bool = True,
        at_train_end: bool = True,
        dirname: str = "samples",
        per_class: bool = True,
        guidance_scale: float = 1.0,
    ) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps={every_n_steps} and num_samples={num_samples} must be >= 1")
        self.per_class, self.guidance_scale = per_class, Guidance(scale=guidance_scale).scale  # checked there
        self.samplers = {k: v for k, v in samplers.items() if v is not None}  # samplers.<name>=null drops one
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.use_ema, self.at_train_end, self.dirname = use_ema, at_train_end, dirname
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sampler in self.samplers.values():  # refuse bad sampler settings before training
            pl_module.check_sampler(sampler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and not trainer.sanity_checking:
            self._make_grids(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._make_grids(trainer, pl_module)

    def _make_grids(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called on every rank (the gather is a collective); only rank zero writes and logs."""
        step = self._last_step = trainer.global_step
        out_dir = Path(trainer.default_root_dir) / self.dirname
        n, labels, nrow, prompts = self.num_samples, None, None, None
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes and self.per_class:  # one row per class
            nrow = max(1, self.num_samples // num_classes)
            n, labels = nrow * num_classes, torch.arange(num_classes).repeat_interleave(nrow)
        elif getattr(pl_module, "is_text_model", False):  # one row per class prompt (or the empty prompt)
            sets = getattr(trainer.datamodule, "class_prompt_sets", lambda: None)() if trainer.datamodule else None
            first = [phrasings[0] for phrasings in sets["train"]] if sets else [""]
            nrow = max(1, self.num_samples // len(first)) if sets else None
            n = nrow * len(first) if sets else self.num_samples
            prompts = [first[i // nrow] for i in range(n)] if sets else None
        for name, sampler in self.samplers.items():
            images = gather_samples(trainer, pl_module, sampler, self.seed, n, self.use_ema, labels, self.guidance_scale,
                                    prompts)
            if trainer.is_global_zero:
                grid = grid_image(images, nrow)
                out_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(grid).save(out_dir / f"{name}_step{step:07d}.png")
                self._log(trainer, f"samples/{name}", grid, step)

    @staticmethod
    def _log(trainer: pl.Trainer, key: str, grid: np.ndarray, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[grid], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, grid, step, dataformats="HWC")
