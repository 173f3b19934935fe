"""Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), on all T steps or a respaced sub-sequence, with
fixed or learned variances (Nichol & Dhariwal 2021, Sec. 3.1, 4) and classifier guidance (Dhariwal & Nichol 2021, Alg. 1)."""

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
from difflab.diffusion.sde import NoiseFamily
from difflab.diffusion.variance import (
    LEARNED_VARIANCES,
    ModelVariance,
    check_model_variance,
    learned_log_variance,
    respace,
)
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
from difflab.samplers.ddim import Spacing, ddim_timesteps
from difflab.samplers.inpaint import Inpaint

Variance = Literal["auto", "fixed_small", "fixed_large", "learned"]


def resolve_variance(variance: str, model_variance: str) -> str:
    """'auto' -> the model's learned variance if it has one, else fixed_small; refuse 'learned' on fixed-variance models."""
    check_choice("variance", variance, get_args(Variance))
    check_model_variance(model_variance)
    if variance == "auto":
        return "learned" if model_variance in LEARNED_VARIANCES else "fixed_small"
    if variance == "learned" and model_variance not in LEARNED_VARIANCES:
        raise ValueError(
            "sampler variance='learned' but this model has a fixed variance (its objective trains no Sigma); "
            "use variance=auto, fixed_small or fixed_large, or train with objective=hybrid"
        )
    return variance


def sampling_schedule(schedule: NoiseSchedule, timesteps: list[int]) -> tuple[NoiseSchedule, dict[int, int]]:
    """The schedule the steps run on (respaced unless timesteps are all of 0..T-1) and t -> its index there."""
    ascending = sorted(timesteps)
    sub = schedule if ascending == list(range(schedule.T)) else respace(schedule, ascending)
    return sub, {t: i for i, t in enumerate(ascending)}


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
    steps: int | None = None,
    spacing: Spacing = "linspace",
    model_variance: ModelVariance = "fixed",
    dynamic_percentile: float | None = None,
    cond_fn: CondFn | None = None,
    inpaint: Inpaint | None = None,
) -> Tensor:
    """x_{t-1} = mu_tilde(x_t, x0_hat) + s Sigma grad + Sigma^1/2 z, z = 0 at the last step (Ho et al. 2020, Alg. 2; Dhariwal & Nichol 2021, Alg. 1).

    steps=None runs all T steps; steps=S runs the respaced process on S timesteps (Nichol & Dhariwal
    2021, Sec. 4) whose beta', beta_tilde' and posterior mean are recomputed for the sub-sequence.
    """
    variance = resolve_variance(variance, model_variance)
    check_dynamic_percentile(dynamic_percentile)
    schedule = schedule.to(x_T.device)
    timesteps = list(range(schedule.T - 1, -1, -1)) if steps is None else ddim_timesteps(schedule.T, steps, spacing)
    sub, index = sampling_schedule(schedule, timesteps)
    fixed = None if variance == "learned" else fixed_log_variance(sub, variance)

    def step(x_t: Tensor, x0: Tensor, eps: Tensor, t: int, t_prev: int, v: Tensor | None = None) -> Tensor:
        i_vec = torch.full((x_t.shape[0],), index[t], device=x_t.device, dtype=torch.long)
        mean = posterior_mean(x0, x_t, i_vec, sub)
        if fixed is not None:
            log_var = fixed[index[t]].to(x_t.dtype)
        else:
            log_var = learned_log_variance(v, i_vec, sub, model_variance)
        if cond_fn is not None:  # mean shift by s Sigma grad log p(y | x_t)
            mean = mean + log_var.exp() * cond_fn(x_t, torch.full_like(i_vec, t))
        if t_prev < 0:
            return mean
        return mean + (0.5 * log_var).exp() * randn_like(x_t, generator)

    return reverse_loop(
        model_fn, x_T, schedule, timesteps, step,
        parameterization=parameterization, clip_x0=clip_x0, callback=callback,
        dynamic_percentile=dynamic_percentile, learned_variance=model_variance != "fixed",
        inpaint=inpaint, generator=generator,
    )


@dataclass(frozen=True, kw_only=True)
class DDPM(SamplerBase):
    """Config object for `ddpm_sample`: variance auto | fixed_small (beta_tilde) | fixed_large (beta) | learned; steps=None is all T."""

    variance: Variance = "auto"
    clip_x0: bool = True
    steps: int | None = None
    spacing: Spacing = "linspace"
    dynamic_percentile: float | None = None

    def __post_init__(self) -> None:
        check_choice("variance", self.variance, get_args(Variance))
        check_choice("spacing", self.spacing, get_args(Spacing))
        check_dynamic_percentile(self.dynamic_percentile)
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps={self.steps!r} must be null (all T steps) or an integer >= 1")

    @property
    def name(self) -> str:
        return "ddpm" if self.steps is None else f"ddpm-{self.steps}"

    def nfe(self, T: int) -> int:
        return T if self.steps is None else self.steps

    supports_learned_variance = True
    supports_classifier_guidance = True
    supports_inpainting = True  # known pixels imposed after every step, RePaint's jumps (samplers/inpaint.py)

    def validate(self, T: int) -> None:
        """Fail before sampling when a respaced step count does not fit T."""
        if self.steps is not None:
            ddim_timesteps(T, self.steps, self.spacing)

    def check_model(self, family: NoiseFamily, model_variance: str) -> None:
        """DDPM models only; a learned-variance setting on a fixed-variance model fails here, not mid-run."""
        check_discrete_family(self.name, family)
        resolve_variance(self.variance, model_variance)

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
        return ddpm_sample(
            model_fn, x_T, schedule, parameterization=parameterization, variance=self.variance,
            clip_x0=self.clip_x0, generator=generator, callback=callback, steps=self.steps,
            spacing=self.spacing, model_variance=model_variance,
            dynamic_percentile=self.dynamic_percentile, cond_fn=cond_fn, inpaint=inpaint,
        )
