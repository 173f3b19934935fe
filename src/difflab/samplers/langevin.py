"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the denoiser's score, on any model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.process import randn_like
from difflab.diffusion.sde import VESDE, NoiseFamily
from difflab.samplers.base import Callback, DenoiserSampler, Generator


def annealed_langevin_sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    final_denoise: bool = True,
    generator: Generator = None,
    callback: Callback = None,
) -> Tensor:
    """x <- x + a_i/2 s(x, sigma_i) + sqrt(a_i) z, a_i = eps sigma_i^2 / sigma_L^2, T steps per level (Song & Ermon 2019, Alg. 1).

    The optional final step x <- x + sigma_L^2 s(x, sigma_L) = D(x; sigma_L) is Tweedie's denoising
    (Jolicoeur-Martineau et al. 2021; Song & Ermon 2020, App. C.2).
    """
    sigma_L = float(sigmas[-1])
    for i, s in enumerate(sigmas.tolist()):
        a = step_lr * (s / sigma_L) ** 2
        for _ in range(n_steps_each):
            x = x + 0.5 * a * denoiser.score_hat(x, s) + math.sqrt(a) * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "sigma": s, "x": x, "x0": x})
    return denoiser(x, sigma_L) if final_denoise else x


def default_levels(family: NoiseFamily, levels: int | None) -> Tensor:
    """The model's own NCSN levels, else `levels` (default 10) geometric levels over its sigma_hat range."""
    if levels is None and isinstance(family, VESDE) and family.levels:
        return family.level_sigmas()
    n = levels or 10
    return torch.logspace(math.log10(family.sigma_hat_max), math.log10(family.sigma_hat_min), n, dtype=torch.float64)


@dataclass(frozen=True, kw_only=True)
class ALD(DenoiserSampler):
    """Config object for annealed Langevin dynamics; NFE = L T (+1 with the final denoising step)."""

    levels: int | None = None  # None: the model's NCSN levels (or 10 geometric levels for other models)
    n_steps_each: int = 100
    step_lr: float = 8e-5  # NCSN's 2e-5 for data in [0, 1], x4 for data in [-1, 1]
    final_denoise: bool = True
    clip_x0: bool = False
    dynamic_percentile: float | None = None  # Imagen dynamic thresholding of x0 (takes precedence over clip_x0)
    _last_levels: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    supports_sdedit = False  # its levels and start noise ignore the family's t_max

    def __post_init__(self) -> None:
        self.check_thresholding()
        if self.levels is not None and (not isinstance(self.levels, int) or self.levels < 1):
            raise ValueError(f"levels={self.levels!r} must be null or an integer >= 1")
        if not isinstance(self.n_steps_each, int) or self.n_steps_each < 1:
            raise ValueError(f"n_steps_each={self.n_steps_each!r} must be an integer >= 1")
        if self.step_lr <= 0:
            raise ValueError(f"step_lr={self.step_lr} must be > 0")

    @property
    def name(self) -> str:
        return f"ald-{self.n_steps_each}x{self.levels or 'L'}"

    def nfe(self, T: int) -> int:
        """L T (+1); with levels=null, L is that of the last call (the model's NCSN levels, else 10)."""
        L = self.levels or (self._last_levels[-1] if self._last_levels else 10)
        return L * self.n_steps_each + int(self.final_denoise)

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback) -> Tensor:
        sigmas = default_levels(family, self.levels)
        self._last_levels.append(len(sigmas))
        return annealed_langevin_sample(denoiser, x_T * float(sigmas[0]), sigmas, n_steps_each=self.n_steps_each,
                                        step_lr=self.step_lr, final_denoise=self.final_denoise,
                                        generator=generator, callback=callback)
