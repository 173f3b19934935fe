"""Fast ODE solvers over the denoiser D(x_hat; sigma_hat): EDM Heun (with churn) and DPM-Solver++(2M).

Both integrate the probability-flow ODE dx_hat/dsigma = (x_hat - D(x_hat; sigma)) / sigma
(Karras et al. 2022, Eq. 3 with s = 1) over decreasing sigma_0 > ... > sigma_{N-1} > sigma_N = 0, so
they run on every model the denoiser adapter accepts: DDPM eps/x0/v models, VP/sub-VP/VE SDEs, NCSN.
A callback receives {i, sigma, x, x0} after every step (k-diffusion style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

from torch import Tensor

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.process import randn_like
from difflab.diffusion.sde import NoiseFamily, Spacing, sigma_steps
from difflab.samplers.base import Callback, DenoiserSampler, Generator, start_noise


def edm_heun_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback = None,
) -> Tensor:
    """Heun's 2nd-order method with optional churn gamma_i = min(S_churn/N, sqrt2 - 1) (Karras et al. 2022, Alg. 2)."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:  # 1. add noise to move from sigma_i up to sigma_hat (Alg. 2, lines 5-6)
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * randn_like(x, generator)
        x0 = denoiser(x, s_hat)
        d = (x - x0) / s_hat  # 2. Euler step (line 7-8)
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # 3. second-order correction (lines 9-11)
            d_next = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": s_next, "x": x, "x0": x0})
    return x


def dpmpp_2m_sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M): x_{i+1} = (s_{i+1}/s_i) x_i - expm1(-h_i) D_i', D_i' = (1 + 1/2r) D_i - 1/2r D_{i-1} (Lu et al. 2022b, Alg. 2).

    In x_hat coordinates lambda = -log sigma_hat, h_i = lambda_{i+1} - lambda_i, r = h_{i-1} / h_i; the
    first step and the step to sigma = 0 are first order (DPM-Solver++(1) = DDIM).
    """
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, s)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (s_next / s) * x - math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"i": i, "sigma": s_next, "x": x, "x0": x0})
    return x


@dataclass(frozen=True, kw_only=True)
class _SigmaSampler(DenoiserSampler):
    """Shared config: steps, the sigma spacing and clipping of D to [-1, 1]."""

    steps: int = 20
    spacing: Spacing = "karras"
    rho: float = 7.0
    clip_x0: bool = True
    dynamic_percentile: float | None = None  # Imagen dynamic thresholding of x0 (takes precedence over clip_x0)

    def __post_init__(self) -> None:
        self.check_thresholding()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1")
        if self.spacing not in get_args(Spacing):
            raise ValueError(f"spacing={self.spacing!r} is not supported; choose one of {get_args(Spacing)}")
        if self.rho <= 0:
            raise ValueError(f"rho={self.rho} must be > 0")

    def sigmas(self, family: NoiseFamily) -> Tensor:
        return sigma_steps(family, self.steps, self.spacing, self.rho)

    def _run(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: Generator, callback: Callback) -> Tensor:
        raise NotImplementedError

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback) -> Tensor:
        return self._run(denoiser, start_noise(x_T, family), self.sigmas(family), generator, callback)


@dataclass(frozen=True, kw_only=True)
class Heun(_SigmaSampler):
    """EDM sampler (Karras et al. 2022, Alg. 2): Karras sigmas with rho = 7, optional churn; NFE = 2N - 1."""

    steps: int = 18
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.s_churn < 0 or self.s_noise < 0:
            raise ValueError(f"s_churn={self.s_churn}, s_noise={self.s_noise} must be >= 0")

    @property
    def name(self) -> str:
        return f"heun{'' if self.s_churn == 0 else f'-churn{self.s_churn:g}'}-{self.steps}"

    def nfe(self, T: int) -> int:
        return 2 * self.steps - 1

    def _run(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: Generator, callback: Callback) -> Tensor:
        return edm_heun_sample(denoiser, x, sigmas, s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax,
                               s_noise=self.s_noise, generator=generator, callback=callback)


@dataclass(frozen=True, kw_only=True)
class DPMSolverPP(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2); NFE = steps."""

    @property
    def name(self) -> str:
        return f"dpmpp-{self.steps}"

    def nfe(self, T: int) -> int:
        return self.steps

    def _run(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, generator: Generator, callback: Callback) -> Tensor:
        return dpmpp_2m_sample(denoiser, x, sigmas, callback=callback)

