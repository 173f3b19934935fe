"""The forward process, its posterior, and conversions between network parameterizations.

Every formula here takes alpha_bar (or a schedule plus integer timesteps) so that discrete
samplers, respaced samplers and continuous-time models share one implementation.

    x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps                       (Ho et al. 2020, Eq. 4)
    v   = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0                       (Salimans & Ho 2022, Sec. 4)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule, extract

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


def check_parameterization(parameterization: str) -> None:
    """Reject anything but eps, x0 or v, naming the allowed values."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization={parameterization!r} is not supported; choose one of {PARAMETERIZATIONS}"
        )


def q_sample(x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, Eq. 4)."""
    return extract(schedule.sqrt_alpha_bar, t, x0) * x0 + extract(
        schedule.sqrt_one_minus_alpha_bar, t, x0
    ) * eps


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (Ho et al. 2020, Eq. 4 inverted)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar) (Ho et al. 2020, Eq. 4 inverted)."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, Sec. 4)."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def x0_eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """x0 = sqrt(ab) x_t - sqrt(1-ab) v and eps = sqrt(1-ab) x_t + sqrt(ab) v (Salimans & Ho 2022, App. D)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * x_t - s * v, s * x_t + a * v


def x0_eps_from_output(
    output: Tensor, x_t: Tensor, alpha_bar: Tensor, parameterization: Parameterization
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a network output under the given parameterization."""
    if parameterization == "eps":
        return x0_from_eps(x_t, output, alpha_bar), output
    if parameterization == "x0":
        return output, eps_from_x0(x_t, output, alpha_bar)
    if parameterization == "v":
        return x0_eps_from_v(x_t, output, alpha_bar)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def target_from_x0_eps(
    x0: Tensor, eps: Tensor, alpha_bar: Tensor, parameterization: Parameterization
) -> Tensor:
    """The regression target of the network: eps, x0 or v."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, alpha_bar)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def posterior_mean(x0: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """mu_tilde(x_t, x0) = coef_x0 x0 + coef_xt x_t, the mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 7)."""
    return extract(schedule.posterior_mean_coef_x0, t, x_t) * x0 + extract(
        schedule.posterior_mean_coef_xt, t, x_t
    ) * x_t


def posterior_mean_from_eps(eps: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """mu_tilde = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) (Ho et al. 2020, Eq. 11)."""
    return extract(schedule.posterior_mean_eps_coef_xt, t, x_t) * x_t - extract(
        schedule.posterior_mean_eps_coef_eps, t, x_t
    ) * eps


def alpha_bar_at(t: Tensor, schedule: NoiseSchedule, like: Tensor) -> Tensor:
    """alpha_bar_t gathered per sample and shaped to broadcast against `like`."""
    return extract(schedule.alpha_bar, t, like)


def randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like x; a list of generators draws sample i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; need one per sample")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator]
    )


def fixed_log_variance(schedule: NoiseSchedule, kind: Literal["fixed_small", "fixed_large"]) -> Tensor:
    """log sigma_t^2 of p(x_{t-1}|x_t): beta_tilde_t ('fixed_small') or beta_t ('fixed_large') (Ho et al. 2020, Sec. 3.2).

    As in the DDPM reference code, 'fixed_small' uses the clipped log beta_tilde and 'fixed_large'
    puts beta_tilde_2 at t = 1 so that the decoder's variance is not the huge beta_1 mismatch.
    """
    if kind == "fixed_small":
        return schedule.posterior_log_variance_clipped
    if kind == "fixed_large":
        return torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).log()
    raise ValueError(f"variance={kind!r} is not supported; choose 'fixed_small' or 'fixed_large'")
