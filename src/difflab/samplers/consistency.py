"""One-step and multistep consistency sampling (Song et al. 2023, Alg. 1) for consistency models.

A consistency model's net outputs f(x_t, t), the start of the probability-flow ODE trajectory through x_t,
so the model_fn this sampler sees predicts x0 ('x0' parameterization, as a distilled student's module
declares). Multistep sampling alternates denoising with f and re-noising to the next level:
x = f(x, sigma_0); x = f(x + sqrt(sigma_n^2 - sigma_min^2) z, sigma_n) for the Karras levels sigma_n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.process import randn_like
from difflab.diffusion.sde import NoiseFamily, karras_sigmas
from difflab.samplers.base import Callback, DenoiserSampler, Generator


def consistency_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The steps levels sigma_max = sigma_0 > ... > sigma_{steps-1} > sigma_min: the first `steps` of a Karras grid of
    steps + 1 points (Karras et al. 2022, Eq. 5), so no level wastes a call at sigma_min, where f is the identity."""
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:steps]


def consistency_sample(denoiser: Denoiser, x_T: Tensor, sigmas: Tensor, sigma_min: float, *,
                       generator: Generator = None, callback: Callback = None) -> Tensor:
    """x0 from standard normal x_T: x = f(sigma_0 x_T, sigma_0), then x = f(x + sqrt(sigma_n^2 - sigma_min^2) z, sigma_n)
    (Song et al. 2023, Alg. 1), f the consistency function the denoiser wraps; NFE = len(sigmas)."""
    x0 = denoiser(x_T * float(sigmas[0]), float(sigmas[0]))
    if callback is not None:
        callback({"i": 0, "sigma": float(sigmas[0]), "x": x0, "x0": x0})
    for i, sigma in enumerate(sigmas[1:].tolist(), start=1):
        x = x0 + math.sqrt(max(sigma**2 - sigma_min**2, 0.0)) * randn_like(x0, generator)
        x0 = denoiser(x, sigma)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": x0})
    return x0


@dataclass(frozen=True, kw_only=True)
class Consistency(DenoiserSampler):
    """Config object for `consistency_sample`: steps (1 = one-step generation) on Karras levels of rho.

    sigma_min / sigma_max are the consistency model's (a distilled student's module fills them in); null means the
    model family's ends. Only consistency models can use it (their module says so: `consistency_model`).
    """

    steps: int = 1
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    clip_x0: bool = True
    dynamic_percentile: float | None = None

    needs_consistency_model = True
    supports_sdedit = False

    def __post_init__(self) -> None:
        self.check_thresholding()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1 (1 = one-step generation)")
        if self.rho <= 0:
            raise ValueError(f"rho={self.rho} must be > 0")
        if self.sigma_min is not None and self.sigma_max is not None and not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min} and sigma_max={self.sigma_max}: need 0 < sigma_min < sigma_max")

    @property
    def name(self) -> str:
        return f"consistency-{self.steps}"

    def nfe(self, T: int) -> int:
        return self.steps

    def levels(self, family: NoiseFamily) -> tuple[Tensor, float]:
        """(the sampling levels sigma_0 > ... , sigma_min)."""
        lo = family.sigma_hat_min if self.sigma_min is None else self.sigma_min
        hi = family.sigma_hat_max if self.sigma_max is None else self.sigma_max
        return consistency_sigmas(self.steps, lo, hi, self.rho), lo

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback) -> Tensor:
        sigmas, sigma_min = self.levels(family)
        return consistency_sample(denoiser, x_T, sigmas, sigma_min, generator=generator, callback=callback)
