"""Ancestral DDPM sampling (Ho et al. 2020, Alg. 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.process import (
    Parameterization,
    fixed_log_variance,
    posterior_mean,
    randn_like,
)
from difflab.diffusion.schedules import NoiseSchedule
from difflab.samplers.base import Callback, Generator, ModelFn, check_choice, reverse_loop

Variance = Literal["fixed_small", "fixed_large"]


def ddpm_sample(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    parameterization: Parameterization = "eps",
    variance: Variance = "fixed_small",
    clip_x0: bool = True,
    generator: Generator = None,
    callback: Callback = None,
) -> Tensor:
    """x_{t-1} = mu_tilde(x_t, x0_hat) + sigma_t z, z = 0 at the last step (Ho et al. 2020, Alg. 2 via Eq. 7)."""
    check_choice("variance", variance, get_args(Variance))
    schedule = schedule.to(x_T.device)
    log_var = fixed_log_variance(schedule, variance)

    def step(x_t: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        t_vec = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        mean = posterior_mean(x0, x_t, t_vec, schedule)
        if t == 0:
            return mean
        return mean + (0.5 * log_var[t]).exp().to(x_t.dtype) * randn_like(x_t, generator)

    timesteps = list(range(schedule.T - 1, -1, -1))
    return reverse_loop(
        model_fn, x_T, schedule, timesteps, step,
        parameterization=parameterization, clip_x0=clip_x0, callback=callback,
    )


@dataclass(frozen=True, kw_only=True)
class DDPM:
    """Config object for `ddpm_sample`: variance 'fixed_small' (beta_tilde) or 'fixed_large' (beta)."""

    variance: Variance = "fixed_small"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        check_choice("variance", self.variance, get_args(Variance))

    @property
    def name(self) -> str:
        return "ddpm"

    def nfe(self, T: int) -> int:
        return T

    def validate(self, T: int) -> None:
        """Any T is valid for ancestral sampling."""

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
        return ddpm_sample(
            model_fn, x_T, schedule, parameterization=parameterization, variance=self.variance,
            clip_x0=self.clip_x0, generator=generator, callback=callback,
        )
