"""DDIM sampling with eta in [0, 1] on any sub-sequence of timesteps (Song, Meng & Ermon 2021), with learned variances and classifier guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion.process import Parameterization, randn_like, x0_from_eps
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily
from difflab.diffusion.variance import ModelVariance, check_model_variance, learned_log_variance, respace
from difflab.samplers.base import (
    Callback,
    CondFn,
    Generator,
    ModelFn,
    check_choice,
    SamplerBase,
    check_dynamic_percentile,
    check_discrete_family,
    reverse_loop,
)
from difflab.samplers.inpaint import Inpaint

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
    model_variance: ModelVariance = "fixed",
    dynamic_percentile: float | None = None,
    cond_fn: CondFn | None = None,
    inpaint: Inpaint | None = None,
) -> Tensor:
    """x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z (DDIM Eq. 12, sigma from Eq. 16 times eta).

    Learned variance: sigma^2 = eta^2 Sigma_theta on the respaced sub-sequence (Nichol & Dhariwal
    2021, Sec. 4), which is DDIM's own sigma^2 when Sigma_theta = beta_tilde'. Classifier guidance
    replaces eps by eps - sqrt(1 - ab_t) s grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} is outside [0, 1]; 0 is deterministic DDIM, 1 is DDPM-like")
    check_model_variance(model_variance)
    check_dynamic_percentile(dynamic_percentile)
    timesteps = ddim_timesteps(schedule.T, steps, spacing)
    schedule = schedule.to(x_T.device)
    alpha_bar = schedule.alpha_bar
    learned = model_variance != "fixed"
    sub = respace(schedule, timesteps) if learned else None
    index = {t: i for i, t in enumerate(sorted(timesteps))}

    def step(x_t: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int, v: Tensor | None = None) -> Tensor:
        ab_t = alpha_bar[t]
        ab_prev = alpha_bar[t_prev] if t_prev >= 0 else alpha_bar.new_ones(())
        if cond_fn is not None:  # eps correction, then x0 from the corrected eps
            t_vec = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
            eps = eps - (1 - ab_t).sqrt().to(x_t.dtype) * cond_fn(x_t, t_vec)
            x0 = x0_from_eps(x_t, eps, ab_t.to(x_t.dtype))
        if learned and eta > 0:
            i_vec = torch.full((x_t.shape[0],), index[t], device=x_t.device, dtype=torch.long)
            var = eta**2 * learned_log_variance(v, i_vec, sub, model_variance).exp()  # (B, C, H, W)
            sigma = var.clamp(max=float(1 - ab_prev)).sqrt()
        else:
            sigma = (eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()).to(x_t.dtype)
        x_prev = ab_prev.sqrt().to(x_t.dtype) * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt().to(x_t.dtype) * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * randn_like(x_t, generator)
        return x_prev

    return reverse_loop(
        model_fn, x_T, schedule, timesteps, step,
        parameterization=parameterization, clip_x0=clip_x0, callback=callback,
        dynamic_percentile=dynamic_percentile, learned_variance=learned,
        inpaint=inpaint, generator=generator,
    )


@dataclass(frozen=True, kw_only=True)
class DDIM(SamplerBase):
    """Config object for `ddim_sample`: S=steps, eta, and the timestep spacing."""

    steps: int = 50
    eta: float = 0.0
    spacing: Spacing = "linspace"
    clip_x0: bool = True
    dynamic_percentile: float | None = None

    def __post_init__(self) -> None:
        check_choice("spacing", self.spacing, get_args(Spacing))
        check_dynamic_percentile(self.dynamic_percentile)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1 (and <= T of the model)")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta!r} is outside [0, 1]; 0 is deterministic DDIM, 1 is DDPM-like")

    @property
    def name(self) -> str:
        return f"ddim{'' if self.eta == 0 else f'-eta{self.eta:g}'}-{self.steps}"

    def nfe(self, T: int) -> int:
        return self.steps

    supports_learned_variance = True
    supports_classifier_guidance = True
    supports_inpainting = True  # known pixels imposed after every step, RePaint's jumps (samplers/inpaint.py)

    def validate(self, T: int) -> None:
        """Fail before sampling when the step count or spacing does not fit T."""
        ddim_timesteps(T, self.steps, self.spacing)

    def check_model(self, family: NoiseFamily, model_variance: str) -> None:
        """DDPM models only, with a fixed or learned variance."""
        check_discrete_family(self.name, family)
        check_model_variance(model_variance)

    def __call__(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        schedule: NoiseSchedule,
        *,
        parameterization: Parameterization = "eps",
        generator: Generator = None,
        callback: Callback = None,
        model_variance: ModelVariance = "fixed",
        cond_fn: CondFn | None = None,
        inpaint: Inpaint | None = None,
    ) -> Tensor:
        return ddim_sample(
            model_fn, x_T, schedule, steps=self.steps, eta=self.eta, spacing=self.spacing,
            parameterization=parameterization, clip_x0=self.clip_x0, generator=generator,
            callback=callback, model_variance=model_variance,
            dynamic_percentile=self.dynamic_percentile, cond_fn=cond_fn, inpaint=inpaint,
        )
