"""rFID: the FID of an autoencoder's reconstructions against the originals they came from (the R-FID Rombach et
al. 2022 report for their first stages), in the features of the run's offline extractor.

Both sets are the same held-out images, so perfect reconstructions score 0 and worse ones more. The
evaluation engine's rules hold: image i of the held-out split belongs to rank r's contiguous block
(`evaluation.shard`), `compute()` is a collective that gathers both feature banks from every rank and
returns the same number everywhere, so the score does not depend on the number of processes.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

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
        self.originals_key: Hashable | None = None  # what the real bank holds (evaluate_reconstructions reuses it)

    @torch.no_grad()
    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Add a batch of uint8 originals and their uint8 reconstructions, both (B, C, H, W)."""
        check_same_shape(originals, reconstructions)
        self.add_originals(originals)
        self.add_reconstructions(reconstructions)

    @torch.no_grad()
    def add_originals(self, images: Tensor) -> None:
        """Add uint8 originals (B, C, H, W) alone."""
        features = self.extractor(images.to(self.real.device))  # (B, D)
        self.real.update(features, features[:, :0])

    @torch.no_grad()
    def add_reconstructions(self, images: Tensor) -> None:
        """Add uint8 reconstructions (B, C, H, W) alone."""
        features = self.extractor(images.to(self.fake.device))  # (B, D)
        self.fake.update(features, features[:, :0])

    def reset(self, *, keep_originals: bool = False) -> None:
        """Forget the reconstructions, and the originals unless keep_originals."""
        self.fake.reset()
        if not keep_originals:
            self.real.reset()
            self.originals_key = None

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


def check_same_shape(originals: Tensor, reconstructions: Tensor) -> None:
    """Originals and reconstructions must pair up image by image."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions "
                         f"{tuple(reconstructions.shape)} must have the same shape")


def evaluate_reconstructions(
    reconstruct: Callable[[Tensor], Tensor],
    images_at: Callable[[Sequence[int]], Tensor],
    metrics: ReconstructionMetrics,
    *,
    num_images: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    originals_key: Hashable | None = None,
) -> dict[str, float]:
    """rFID of held-out images 0..num_images-1, this rank taking its block: `images_at(indices)` gives uint8
    originals (B, C, H, W), `reconstruct(x)` maps [-1, 1] images to [-1, 1] reconstructions. With the
    `originals_key` of the previous call (the same images), the originals' features are reused."""
    if num_images < 2 or batch_size < 1:
        raise ValueError(f"num_images={num_images} and batch_size={batch_size}: need num_images >= 2, batch_size >= 1")
    key = None if originals_key is None else (originals_key, num_images, rank, world_size)
    reuse = key is not None and metrics.originals_key == key
    metrics.reset(keep_originals=reuse)
    block = shard(num_images, rank, world_size)
    for start in range(block.start, block.stop, batch_size):
        originals = images_at(list(range(start, min(start + batch_size, block.stop))))  # uint8 (B, C, H, W)
        x_hat = to_uint8(reconstruct(to_model_range(originals)).detach())
        check_same_shape(originals, x_hat)
        if not reuse:
            metrics.add_originals(originals)
        metrics.add_reconstructions(x_hat)
    metrics.originals_key = key
    return metrics.compute()
