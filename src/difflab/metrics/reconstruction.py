"""rFID: the FID of an autoencoder's reconstructions against the originals they came from (Rombach et al. 2022,
Table 8 / App. D.1), in the features of the run's offline extractor.

Both sets are the same held-out images, so perfect reconstructions score 0 and worse ones more. The
evaluation engine's rules hold: image i of the held-out split belongs to rank r's contiguous block
(`evaluation.shard`), `compute()` is a collective that gathers both feature banks from every rank and
returns the same number everywhere, so the score does not depend on the number of processes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from difflab.data.transforms import to_model_range, to_uint8
from difflab.metrics.evaluation import shard
from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.generative import FeatureBank
from difflab.metrics.scores import frechet_distance


class ReconstructionMetrics(nn.Module):
    """rFID of uint8 reconstructions against their uint8 originals; `compute()` -> {"rfid": float}.

    Keep it off the LightningModule (checkpoints would carry the extractor), as GenerativeMetrics.
    """

    def __init__(self, *, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.real = FeatureBank(keep_features=True, keep_logits=False)
        self.fake = FeatureBank(keep_features=True, keep_logits=False)

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Add a batch of uint8 originals and their uint8 reconstructions, both (B, C, H, W)."""
        if originals.shape != reconstructions.shape:
            raise ValueError(f"originals {tuple(originals.shape)} and reconstructions "
                             f"{tuple(reconstructions.shape)} must have the same shape")
        for bank, images in ((self.real, originals), (self.fake, reconstructions)):
            features = self.extractor(images.to(bank.device))  # (B, D)
            bank.update(features, features[:, :0])

    def reset(self) -> None:
        """Forget every image seen."""
        self.real.reset()
        self.fake.reset()

    def compute(self) -> dict[str, float]:
        """Collective under DDP: call on every rank; every rank gets the same {"rfid": value}."""
        for bank in (self.real, self.fake):
            if bank.update_count == 0:  # this rank saw no images: still take part in the gather
                empty = torch.zeros(0, self.extractor.num_features, device=bank.device)
                bank.update(empty, empty[:, :0])
        real, fake = self.real.compute()[0].double(), self.fake.compute()[0].double()  # (N, D) each
        if real.shape[0] < 2:
            raise ValueError(f"rFID needs at least 2 held-out images, got {real.shape[0]}")
        mu = real.mean(dim=0)
        sigma = torch.cov(real.T)  # (D, D), unbiased as ReferenceStats
        return {"rfid": frechet_distance(fake, mu_real=mu, sigma_real=sigma, num_real=real.shape[0])}


def evaluate_reconstructions(
    reconstruct: Callable[[Tensor], Tensor],
    images_at: Callable[[Sequence[int]], Tensor],
    metrics: ReconstructionMetrics,
    *,
    num_images: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """rFID of held-out images 0..num_images-1, this rank taking its block: `images_at(indices)` gives uint8
    originals (B, C, H, W), `reconstruct(x)` maps [-1, 1] images to [-1, 1] reconstructions."""
    if num_images < 2 or batch_size < 1:
        raise ValueError(f"num_images={num_images} and batch_size={batch_size}: need num_images >= 2, batch_size >= 1")
    metrics.reset()
    block = shard(num_images, rank, world_size)
    for start in range(block.start, block.stop, batch_size):
        originals = images_at(list(range(start, min(start + batch_size, block.stop))))  # uint8 (B, C, H, W)
        x_hat = reconstruct(to_model_range(originals))
        metrics.update(originals, to_uint8(x_hat.detach()))
    return metrics.compute()
