"""Cached first-stage latents of a training split (latent diffusion, `first_stage.cache_latents=true`).

The encoder of a frozen first stage gives the same posterior q(z | x) for an image every epoch, so
its moments (mean, std) can be computed once and read instead of the images; the posterior sample
z = mean + std * eps is still drawn fresh at every step (lit/base.py). With random flips the
flipped image's moments are cached too (a flipped latent is not the latent of the flipped image).
The file is made and checked by difflab.cli.latent_cache.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class LatentDataset(Dataset):
    """Posterior moments (N, 2C, h, w) (and those of the flipped images) with labels (N,), read by index
    or by the (index, flip) keys of EpochPermutationSampler with hflip; batches are float32 moments."""

    def __init__(self, moments: torch.Tensor, labels: torch.Tensor, flipped: torch.Tensor | None = None) -> None:
        if moments.ndim != 4 or moments.shape[1] % 2 or len(labels) != len(moments):
            raise ValueError(f"moments must be (N, 2C, h, w) with N labels; got {tuple(moments.shape)} and "
                             f"{len(labels)} labels")
        if flipped is not None and flipped.shape != moments.shape:
            raise ValueError(f"flipped moments {tuple(flipped.shape)} do not match {tuple(moments.shape)}")
        self.moments, self.labels, self.flipped = moments, labels, flipped

    def __len__(self) -> int:
        return len(self.moments)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        if keys and isinstance(keys[0], (tuple, list)):  # (index, flip) keys: hflip training
            index = torch.tensor([int(k[0]) for k in keys])
            flip = torch.tensor([bool(k[1]) for k in keys]).view(-1, 1, 1, 1)
            if self.flipped is None and bool(flip.any()):
                raise ValueError("this latent cache holds no flipped images; rebuild it with data.hflip=true")
            plain = self.moments[index]
            out = plain if self.flipped is None else torch.where(flip, self.flipped[index], plain)
        else:
            index = torch.tensor([int(k) for k in keys])
            out = self.moments[index]
        return out.float(), self.labels[index]


def collate_latents(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for a LatentDataset batch (already a (moments, labels) pair)."""
    return batch
