"""Probability-flow ODE sampling with an adaptive solver; reports its number of function evaluations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.ode_solver import OdeMethod, check_tolerances, integrate, pf_ode_velocity
from difflab.diffusion.sde import NoiseFamily
from difflab.samplers.base import Callback, DenoiserSampler, Generator, start_noise


def pf_ode_sample(
    denoiser: Denoiser,
    x_hat: Tensor,
    *,
    sigma_max: float,
    sigma_min: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: OdeMethod = "RK45",
    denoise: bool = True,
    callback: Callback = None,
) -> tuple[Tensor, int]:
    """Integrate the PF-ODE from sigma_max to sigma_min, then x0 = D(x; sigma_min) (Song et al. 2021, Sec. 4.3); returns (x, NFE)."""
    x, nfe = integrate(lambda y, u: pf_ode_velocity(denoiser, y, u), x_hat, math.log(sigma_max),
                       math.log(sigma_min), rtol=rtol, atol=atol, method=method)
    x0 = denoiser(x, sigma_min)
    if callback is not None:
        callback({"i": 0, "sigma": sigma_min, "x": x, "x0": x0})
    return (x0, nfe + 1) if denoise else (x, nfe)


@dataclass(kw_only=True)
class PFODE(DenoiserSampler):
    """Config object: adaptive PF-ODE sampling (scipy RK45 by default, tolerances rtol/atol).

    `nfe()` is the mean NFE per batch of the calls so far (adaptive: known only after sampling). The
    solver's step sizes depend on the whole batch, so images agree across batch sizes only up to the
    tolerance.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    method: OdeMethod = "RK45"
    denoise: bool = True
    clip_x0: bool = False
    dynamic_percentile: float | None = None  # Imagen dynamic thresholding of x0 (takes precedence over clip_x0)
    adaptive: bool = field(default=True, init=False)
    _nfes: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_thresholding()
        check_tolerances(self.rtol, self.atol, self.method)

    @property
    def name(self) -> str:
        return f"ode-{self.method.lower()}-tol{max(self.rtol, self.atol):g}"

    def nfe(self, T: int) -> int:
        """Mean NFE per batch of the calls so far (0 before any call)."""
        return round(sum(self._nfes) / len(self._nfes)) if self._nfes else 0

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback) -> Tensor:
        x, nfe = pf_ode_sample(denoiser, start_noise(x_T, family), sigma_max=family.sigma_hat_max,
                               sigma_min=family.sigma_hat_min, rtol=self.rtol, atol=self.atol,
                               method=self.method, denoise=self.denoise, callback=callback)
        self._nfes.append(nfe)
        return x
