"""One adapter from any trained network to what every sampler needs: D(x_hat; sigma_hat), the score, x0.

Notation (Karras et al. 2022, Sec. 2): x_hat = x_t / alpha(t) = x0 + sigma_hat eps, and
D(x_hat; sigma_hat) is the (estimated) denoiser E[x0 | x_hat]. Samplers in these coordinates
(Heun, DPM-Solver++, ALD, the PF-ODE) need nothing else; the PC sampler works in the SDE's own x_t
and uses `score_t`. The network may predict eps, x0, v, the score of x_t, or be an EDM denoiser
itself ('denoiser': model_fn(x_hat, sigma_hat) -> D). Each conversion lives in
`difflab.diffusion.sde.x0_from_output`.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily, _bcast, as_family, x0_from_output
from difflab.diffusion.thresholding import check_dynamic_percentile, threshold_x0

Prediction = Literal["eps", "x0", "v", "score", "denoiser"]
ModelFn = Callable[[Tensor, Tensor], Tensor]


class Denoiser:
    """D(x_hat; sigma_hat), score and x0 of a model_fn under a noise family (discrete or continuous);
    x0 optionally clipped to [-1, 1] or dynamically thresholded (Imagen), for every sampler built on it."""

    def __init__(
        self,
        model_fn: ModelFn,
        family: NoiseFamily | NoiseSchedule,
        prediction: Prediction = "eps",
        *,
        clip_x0: bool = False,
        dynamic_percentile: float | None = None,
    ) -> None:
        check_dynamic_percentile(dynamic_percentile)
        if prediction not in get_args(Prediction):
            raise ValueError(f"prediction={prediction!r} is not supported; choose one of {get_args(Prediction)}")
        self.family = as_family(family)
        if prediction == "v" and not self.family.variance_preserving:
            raise ValueError(
                f"the v parameterization needs a variance-preserving family (alpha^2 + sigma^2 = 1); "
                f"{self.family.name!r} is not one; use eps, x0 or score"
            )
        self.model_fn, self.prediction, self.clip_x0 = model_fn, prediction, clip_x0
        self.dynamic_percentile = dynamic_percentile
        self.nfe = 0  # network evaluations so far

    def x0_at_t(self, x_t: Tensor, t: Tensor) -> Tensor:
        """E[x0 | x_t] at the family's time t, (B,) or scalar."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        alpha, sigma = _bcast(self.family.alpha(t), x_t), _bcast(self.family.sigma(t), x_t)
        self.nfe += 1
        if self.prediction == "denoiser":
            x0 = self.model_fn(x_t / alpha, self.family.sigma_hat(t).to(x_t.dtype)).to(x_t.dtype)
        else:
            out = self.model_fn(x_t, self.family.c_noise(t).to(x_t.dtype)).to(x_t.dtype)
            x0 = x0_from_output(out, x_t, alpha, sigma, self.prediction)
        return threshold_x0(x0, clip_x0=self.clip_x0, dynamic_percentile=self.dynamic_percentile)

    def __call__(self, x_hat: Tensor, sigma_hat: Tensor | float) -> Tensor:
        """D(x_hat; sigma_hat): x_t = alpha(t(sigma_hat)) x_hat, then x0 from the network (Karras et al. 2022, Eq. 7)."""
        s = torch.as_tensor(sigma_hat, dtype=torch.float64, device=x_hat.device).reshape(-1).expand(x_hat.shape[0])
        t = self.family.t_of_sigma_hat(s)
        return self.x0_at_t(_bcast(self.family.alpha(t), x_hat) * x_hat, t)

    def score_hat(self, x_hat: Tensor, sigma_hat: Tensor | float) -> Tensor:
        """grad log p(x_hat; sigma_hat) = (D - x_hat) / sigma_hat^2 (Karras et al. 2022, Eq. 3)."""
        s = _bcast(torch.as_tensor(sigma_hat, dtype=torch.float64, device=x_hat.device).reshape(-1).expand(x_hat.shape[0]), x_hat)
        return (self(x_hat, sigma_hat) - x_hat) / s**2

    def score_t(self, x_t: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x_t) = (alpha x0_hat - x_t) / sigma^2 for the Gaussian kernel (Song et al. 2021, Sec. 3.3)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(x_t.shape[0])
        alpha, sigma = _bcast(self.family.alpha(t), x_t), _bcast(self.family.sigma(t), x_t)
        return (alpha * self.x0_at_t(x_t, t) - x_t) / sigma**2
