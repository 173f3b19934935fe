"""Denoising score matching for NCSN and continuous-time score SDEs (Song & Ermon 2019; Song et al. 2021).

The network predicts eps at x_t = alpha(t) x0 + sigma(t) eps, so its score is s_theta = -eps_theta / sigma.
With lambda(t) = sigma(t)^2 the DSM loss lambda ||s_theta - grad log p(x_t | x0)||^2 equals
||eps_theta - eps||^2 (Song & Ermon 2019, Eq. 6 with lambda(sigma) = sigma^2; Song et al. 2021, Eq. 7);
'likelihood' weighting uses lambda(t) = g(t)^2 instead (Song et al. 2021b, Thm. 1).
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.objectives import per_sample_mse
from difflab.diffusion.sde import VESDE, NoiseFamily, _bcast

Weighting = Literal["sigma2", "likelihood"]
ModelFn = Callable[[Tensor, Tensor], Tensor]


def sample_times(family: NoiseFamily, batch_size: int, *, device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """t ~ U[eps, 1] (continuous SDEs, Song et al. 2021, Eq. 7), or uniform over NCSN's L levels t_i = i / (L - 1)."""
    if isinstance(family, VESDE) and family.levels:
        i = torch.randint(0, family.levels, (batch_size,), device=device, generator=generator)
        return i.to(torch.float64) / (family.levels - 1)
    u = torch.rand(batch_size, device=device, generator=generator, dtype=torch.float64)
    return family.t_min + (family.t_max - family.t_min) * u


class DenoisingScoreMatching:
    """Per-sample DSM loss (B,) with lambda = sigma^2 ('sigma2') or g^2 ('likelihood')."""

    def __init__(self, *, weighting: Weighting = "sigma2") -> None:
        if weighting not in get_args(Weighting):
            raise ValueError(f"weighting={weighting!r} is not supported; choose one of {get_args(Weighting)}")
        self.weighting = weighting
        self.parameterization = "eps"

    def __call__(self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, family: NoiseFamily) -> Tensor:
        """||eps_theta(alpha x0 + sigma eps, t) - eps||^2 averaged over dimensions, times lambda(t) / sigma(t)^2."""
        alpha, sigma = _bcast(family.alpha(t), x0), _bcast(family.sigma(t), x0)
        x_t = alpha * x0 + sigma * eps
        loss = per_sample_mse(model_fn(x_t, family.c_noise(t).to(x0.dtype)), eps)
        if self.weighting == "likelihood":
            _, g = family.drift_diffusion(x0[:1], t)  # type: ignore[attr-defined]
            loss = loss * (g.flatten() ** 2 / family.sigma(t) ** 2).to(loss.dtype)
        return loss
