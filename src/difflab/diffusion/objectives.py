"""Training objectives (per-sample losses), loss weightings and noise, kept apart from timestep samplers.

Objectives map (model_fn, x0, t, eps, schedule) to a per-sample loss (B,); the caller draws t from a
timestep sampler (diffusion/timesteps.py) and reduces once. Hybrid and VLB losses of learned-variance
models live in diffusion/vlb_objectives.py.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difflab.diffusion.process import (
    Parameterization,
    alpha_bar_at,
    check_parameterization,
    q_sample,
    target_from_x0_eps,
)
from difflab.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean of (output - target)^2 over every non-batch dimension: (B, ...) -> (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def snr(alpha_bar: Tensor) -> Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, Eq. 2 in DDPM notation)."""
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(alpha_bar: Tensor, gamma: float, parameterization: Parameterization) -> Tensor:
    """min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023, Eq. 9 and Sec. 3.4).

    Each weight turns the target's MSE into min(SNR, gamma) * ||x0 - x0_hat||^2.
    """
    s = snr(alpha_bar)
    clipped = s.clamp(max=gamma)
    if parameterization == "eps":
        return clipped / s
    if parameterization == "x0":
        return clipped
    if parameterization == "v":
        return clipped / (s + 1.0)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def check_min_snr_gamma(gamma: float | None) -> None:
    """None (off) or a positive number (Hang et al. 2023 use 5)."""
    if gamma is not None and (isinstance(gamma, bool) or not float(gamma) > 0):
        raise ValueError(f"min_snr_gamma={gamma!r} must be a positive number (5 in Hang et al. 2023) or null for no weighting")


def offset_noise(eps: Tensor, strength: float, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
    """eps + strength * n, n ~ N(0, I) of shape (B, C, 1, ..., 1): one offset per image and channel (Guttenberg 2023, offset noise)."""
    if strength == 0:
        return eps
    shape = (eps.shape[0], eps.shape[1], *([1] * (eps.ndim - 2)))
    if generator is None or isinstance(generator, torch.Generator):
        n = torch.randn(shape, generator=generator, device=eps.device, dtype=eps.dtype)
    else:
        n = torch.stack([torch.randn(shape[1:], generator=g, device=eps.device, dtype=eps.dtype) for g in generator])
    return eps + strength * n


def simple_term(
    output: Tensor, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule,
    parameterization: Parameterization, min_snr_gamma: float | None,
) -> Tensor:
    """Per-sample (optionally min-SNR-gamma weighted) MSE of a prediction against its target (B,)."""
    alpha_bar = alpha_bar_at(t, schedule, x0)
    loss = per_sample_mse(output, target_from_x0_eps(x0, eps, alpha_bar, parameterization))
    if min_snr_gamma is None:
        return loss
    return loss * min_snr_weight(alpha_bar.flatten(), float(min_snr_gamma), parameterization).float()


class SimpleLoss:
    """L_simple = E_t,x0,eps || target - net(x_t, t) ||^2 for eps, x0 or v targets (Ho et al. 2020, Eq. 14), optionally min-SNR-gamma weighted."""

    variance = "fixed"  # the network predicts only the mean; Sigma is fixed at sampling

    def __init__(self, *, parameterization: Parameterization = "eps", min_snr_gamma: float | None = None) -> None:
        check_parameterization(parameterization)
        check_min_snr_gamma(min_snr_gamma)
        self.parameterization = parameterization
        self.min_snr_gamma = min_snr_gamma

    def __call__(
        self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule
    ) -> Tensor:
        """Per-sample loss (B,); the caller reduces it once."""
        x_t = q_sample(x0, t, eps, schedule)
        return simple_term(model_fn(x_t, t), x0, t, eps, schedule, self.parameterization, self.min_snr_gamma)
