"""Reconstruction grids of a first stage (an autoencoder module): original | reconstruction pairs of the first
validation images, written to <run dir>/samples/recon_step<step>.png by rank zero and logged as an image."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from difflab.callbacks.sample_grid import SampleGrid, grid_image
from difflab.data.transforms import to_uint8


def first_images(loader: torch.utils.data.DataLoader, n: int) -> torch.Tensor:
    """The first n images (n, C, H, W) a data loader yields (fewer if it holds fewer)."""
    batches, count = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        batches.append(x[: n - count])
        count += batches[-1].shape[0]
        if count >= n:
            break
    return torch.cat(batches)


def pair_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """uint8 images (n, C, H, W) twice -> (2n, C, H, W) ordered o_0, r_0, o_1, r_1, ... for a grid of pairs."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions "
                         f"{tuple(reconstructions.shape)} differ")
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)


class ReconstructionGrid(pl.Callback):
    """At the end of training (and every N steps if every_n_steps > 0): original | reconstruction of the first
    num_images validation images through pl_module.reconstruct(x) (the posterior mode, eval mode)."""

    def __init__(self, *, num_images: int = 32, pairs_per_row: int = 8, every_n_steps: int = 0,
                 dirname: str = "samples") -> None:
        if num_images < 1 or pairs_per_row < 1 or every_n_steps < 0:
            raise ValueError(f"num_images={num_images} and pairs_per_row={pairs_per_row} must be >= 1, "
                             f"every_n_steps={every_n_steps} >= 0 (0: only at the end of training)")
        self.num_images, self.pairs_per_row = num_images, pairs_per_row
        self.every_n_steps, self.dirname = every_n_steps, dirname
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if trainer.datamodule is None:
            raise ValueError("ReconstructionGrid reads its images from the data module's val_dataloader(); "
                             "train with a LightningDataModule")
        x = first_images(trainer.datamodule.val_dataloader(), self.num_images)
        pairs = pair_grid(to_uint8(x), to_uint8(pl_module.reconstruct(x).cpu()))
        grid = grid_image(pairs, nrow=2 * min(self.pairs_per_row, x.shape[0]))
        out_dir = Path(trainer.default_root_dir) / self.dirname
        out_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out_dir / f"recon_step{step:07d}.png")
        SampleGrid._log(trainer, "reconstructions", grid, step)
