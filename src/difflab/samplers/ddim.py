"""DDIM sampling with eta in [0, 1] on any sub-sequence of timesteps (Song, Meng & Ermon 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from torch import Tensor

from difflab.diffusion.process import Parameterization, randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.samplers.base import Callback, Generator, ModelFn, check_choice, reverse_loop

Spacing = Literal["linspace", "leading", "trailing", "quadratic"]


def ddim_timesteps(T: int, steps: int, spacing: Spacing = "linspace") -> list[int]:
    """The descending sub-sequence tau of S=steps timestep indices in [0, T) (DDIM Sec. 4.2, App. D.2)."""
    check_choice("spacing", spacing, get_args(Spacing))
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps={steps!r} is not valid for a schedule of T={T}; use 1 <= steps <= {T}")
    if spacing == "linspace":  # evenly spaced, both ends included (diffusers 'linspace')
        seq = np.linspace(0, T - 1, steps).round()
    elif spacing == "leading":  # 0, c, 2c, ... with c = T // S (DDIM 'uniform')
        seq = np.arange(steps) * (T // steps)
    elif spacing == "trailing":  # ..., T-1-c, T-1 (Lin et al. 2024)
        seq = np.round(np.arange(T, 0, -T / steps))[::-1] - 1
    else:  # quadratic: (linspace(0, sqrt(0.8 T), S))^2 (DDIM 'quad')
        seq = np.floor(np.linspace(0, math.sqrt(0.8 * T), steps) ** 2)
    seq = [int(s) for s in seq]
    for i in range(1, len(seq)):  # quadratic spacing collides near 0; keep tau strictly increasing
        seq[i] = max(seq[i], seq[i - 1] + 1)
    if seq[-1] > T - 1:
        raise ValueError(f"spacing={spacing!r} cannot place {steps} distinct steps in T={T}")
    return seq[::-1]


def ddim_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing = "linspace",
    parameterization: Parameterization = "eps",
    clip_x0: bool = True,
    generator: Generator = None,
    callback: Callback = None,
) -> Tensor:
    """x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z (DDIM Eq. 12, sigma from Eq. 16 times eta)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} is outside [0, 1]; 0 is deterministic DDIM, 1 is DDPM-like")
    timesteps = ddim_timesteps(schedule.T, steps, spacing)
    schedule = schedule.to(x_T.device)
    alpha_bar = schedule.alpha_bar

    def step(x_t: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[t_prev] if t_prev >= 0 else alpha_bar.new_ones(())
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x_prev = ab_prev.sqrt().to(x_t.dtype) * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt().to(x_t.dtype) * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma.to(x_t.dtype) * randn_like(x_t, generator)
        return x_prev

    return reverse_loop(
        model_fn, x_T, schedule, timesteps, step,
        parameterization=parameterization, clip_x0=clip_x0, callback=callback,
    )


@dataclass(frozen=True, kw_only=True)
class DDIM:
    """Config object for `ddim_sample`: S=steps, eta, and the timestep spacing."""

    steps: int = 50
    eta: float = 0.0
    spacing: Spacing = "linspace"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        check_choice("spacing", self.spacing, get_args(Spacing))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1 (and <= T of the model)")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta!r} is outside [0, 1]; 0 is deterministic DDIM, 1 is DDPM-like")

    @property
    def name(self) -> str:
        return f"ddim{'' if self.eta == 0 else f'-eta{self.eta:g}'}-{self.steps}"

    def nfe(self, T: int) -> int:
        return self.steps

    def validate(self, T: int) -> None:
        """Fail before sampling when the step count or spacing does not fit T."""
        ddim_timesteps(T, self.steps, self.spacing)

    def __call__(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        schedule: NoiseSchedule,
        *,
        parameterization: Parameterization = "eps",
        generator: Generator = None,
        callback: Callback = None,
    ) -> Tensor:
        return ddim_sample(
            model_fn, x_T, schedule, steps=self.steps, eta=self.eta, spacing=self.spacing,
            parameterization=parameterization, clip_x0=self.clip_x0, generator=generator,
            callback=callback,
        )
