"""FID, IS, KID and precision/recall of precomputed features: thin wrappers, no own mathematics.

FID, IS and KID are torchmetrics' metrics fed through an identity feature module (the backbone
already ran once per batch upstream); precision/recall is torch-fidelity's `prc_features_to_metric`.
The torchmetrics objects are local (`sync_on_compute=False`): callers pass features already
gathered from every rank. IS and KID draw random permutations from the global RNG, so each
function here runs under a forked RNG seeded with `seed`: results are reproducible and equal on
all ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance


class IdentityFeatures(nn.Module):
    """A torchmetrics `feature=` module for inputs that already are features (B, num_features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@contextmanager
def _quiet_seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        torch.manual_seed(seed)
        yield


def _need(n: int, minimum: int, what: str) -> None:
    if n < minimum:
        raise ValueError(f"{what} needs at least {minimum} samples, got {n}")


def frechet_distance(fake: Tensor, *, mu_real: Tensor, sigma_real: Tensor, num_real: int) -> float:
    """FID (Heusel et al., 2017) of fake features (N, D) against real moments mu (D,), sigma (D, D)."""
    _need(fake.shape[0], 2, "FID")
    fid = FrechetInceptionDistance(feature=IdentityFeatures(fake.shape[1]), sync_on_compute=False)
    fid = fid.to(fake.device)
    mu = mu_real.to(fid.real_features_sum)
    # torchmetrics keeps sums: sum x = n mu and sum x x^T = (n - 1) sigma + n mu mu^T
    fid.real_features_sum = num_real * mu
    fid.real_features_cov_sum = (num_real - 1) * sigma_real.to(mu) + num_real * torch.outer(mu, mu)
    fid.real_features_num_samples = torch.tensor(num_real, device=mu.device)
    fid.update(fake, real=False)
    return float(fid.compute())


def inception_score(logits: Tensor, *, splits: int, seed: int) -> tuple[float, float]:
    """IS (Salimans et al., 2016): mean and std of exp(E KL(p(y|x) || p(y))) over `splits` chunks.

    torchmetrics reports the sample std (ddof=1); the original code and torch-fidelity report the
    population std (ddof=0), which is returned here. Chunks are torch.chunk's, as in torchmetrics.
    """
    _need(logits.shape[0], splits, f"IS with {splits} splits")
    with _quiet_seeded(seed):
        score = InceptionScore(feature=IdentityFeatures(logits.shape[1]), splits=splits, sync_on_compute=False)
        score.update(logits.double())
        mean, std = score.compute()
    chunks = len(torch.arange(logits.shape[0]).chunk(splits))
    return float(mean), (float(std) * ((chunks - 1) / chunks) ** 0.5 if chunks > 1 else 0.0)


def kernel_distance(
    fake: Tensor, real: Tensor, *, subsets: int, max_subset_size: int, seed: int
) -> tuple[float, float]:
    """KID (Binkowski et al., 2018) over subsets of min(max_subset_size, n_fake, n_real) samples."""
    subset_size = min(max_subset_size, fake.shape[0], real.shape[0])
    _need(subset_size, 2, "KID")
    with _quiet_seeded(seed):
        kid = KernelInceptionDistance(
            feature=IdentityFeatures(fake.shape[1]), subsets=subsets, subset_size=subset_size, sync_on_compute=False
        ).to(fake.device)
        kid.update(real.to(fake).double(), real=True)  # float64 like torch-fidelity: float32 is off ~3e-4
        kid.update(fake.double(), real=False)
        mean, std = kid.compute()
    return float(mean), float(std)


def precision_recall(fake: Tensor, real: Tensor, *, neighborhood: int, batch_size: int = 10_000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN balls of size `neighborhood`."""
    _need(min(fake.shape[0], real.shape[0]), neighborhood + 1, f"precision/recall with k={neighborhood}")
    out = prc_features_to_metric(
        fake,
        real.to(fake),
        prc_neighborhood=neighborhood,
        prc_batch_size=batch_size,
        save_cpu_ram=True,  # row blocks of the distance matrix instead of all N x N at once
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])
