"""Negative log-likelihood in bits/dim from the variational bound of DDPM (Ho et al. 2020, Eq. 5).

    -log p(x0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0                              (Ho et al. 2020, Eq. 5)
    L_T     = KL(q(x_T | x0) || N(0, I))                  the prior term; no parameters
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))  Gaussian vs Gaussian, closed form
    L_0     = -log p(x0 | x_1)                            the discretized Gaussian decoder (Eq. 13)

The paper's t = 1..T is stored at index t - 1, so the term computed at index i is L_i: index 0 is
the decoder L_0, index i >= 1 is the KL at paper t = i + 1, and the prior is L_T.

Units: nats are averaged over the D = C*H*W dimensions and divided by log 2 (improved-diffusion's
`mean_flat(...) / log(2)`), giving bits/dim per sample (B,).

The normal CDF is the exact one (`torch.special.ndtr`, in log space via `log_ndtr`), not the tanh
approximation of the DDPM/iDDPM code: that approximation is off by up to 2e-4 in absolute value,
by a factor of 6 at -5 sigma, and underflows to 0 beyond about -8 sigma (which iDDPM then clamps
at 1e-12); the exact log-CDF needs no clamp and stays finite and differentiable in both tails.
The bpd this gives differs from the reference code's only through that approximation error.

Learned variance: `log_variance` is either a table (T,) of log sigma_t^2 (fixed variances, from
`fixed_log_variance`) or a `VarianceHead` callable `(output, t) -> (mean_output, log_var)` that
splits a network output (e.g. 2C channels, Nichol & Dhariwal 2021, Sec. 3.1) into the eps/x0/v
prediction and a log variance broadcastable to x_t. The terms themselves never change.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from difflab.diffusion.objectives import ModelFn, per_sample_mse
from difflab.diffusion.process import (
    Parameterization,
    check_parameterization,
    posterior_mean,
    q_sample,
    randn_like,
    x0_eps_from_output,
)
from difflab.diffusion.schedules import NoiseSchedule, extract

__all__ = [
    "VarianceHead",
    "LogVariance",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "prior_bpd",
    "vlb_terms_bpd",
    "bits_per_dim",
]

# (network output, t (B,)) -> (the eps/x0/v prediction, log sigma_t^2 broadcastable to x_t)
VarianceHead = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
LogVariance = Tensor | VarianceHead  # a table (T,) of fixed log sigma_t^2, or a VarianceHead
Generator = torch.Generator | list[torch.Generator] | None

BIN_HALF_WIDTH = 1.0 / 255.0  # 8-bit data scaled to [-1, 1] has bins of width 2/255


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise in nats (Ho et al. 2020, Sec. 3, closed form of Eq. 5)."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def _bits_per_dim(nats: Tensor) -> Tensor:
    """Mean over every non-batch dimension, in bits: (B, ...) nats -> (B,) bits/dim (Nichol & Dhariwal 2021, `mean_flat / log 2`)."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


def _check_8bit(x0: Tensor) -> None:
    """Raise unless every value of x0 is k / 127.5 - 1 for an integer k in 0..255, naming the worst value."""
    k = (x0.detach().double() + 1.0) * 127.5
    off = ((k - k.round()).abs() + (k - k.clamp(0.0, 255.0)).abs()).flatten()
    if off.numel() and off.max().item() > 1e-3:
        bad = x0.detach().flatten()[off.argmax()].item()
        raise ValueError(
            f"x0 contains {bad!r}, which is not 8-bit data in [-1, 1]; the discretized decoder needs "
            "values k / 127.5 - 1 for k in 0..255 (uint8 images mapped by x / 127.5 - 1)"
        )


def _log_normal_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, evaluated in the thinner tail so that neither CDF underflows."""
    flip = lo + hi > 0  # interval in the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def discretized_gaussian_log_likelihood(x0: Tensor, *, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log of the N(mean, e^(2 log_scale)) mass on x0's 8-bit bin, the edge bins open to -inf / +inf (Ho et al. 2020, Eq. 13)."""
    _check_8bit(x0)
    inv_std = torch.exp(-log_scale)
    centered = x0 - mean
    lo = torch.where(x0 < -1.0 + BIN_HALF_WIDTH, -math.inf, (centered - BIN_HALF_WIDTH) * inv_std)
    hi = torch.where(x0 > 1.0 - BIN_HALF_WIDTH, math.inf, (centered + BIN_HALF_WIDTH) * inv_std)
    return _log_normal_mass(lo, hi)


def prior_bpd(x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, (B,) (Ho et al. 2020, Eq. 5)."""
    t = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device, dtype=torch.long)
    mean = q_sample(x0, t, torch.zeros_like(x0), schedule)  # E[x_T | x0] is Eq. 4 at eps = 0
    log_var = 2.0 * extract(schedule.sqrt_one_minus_alpha_bar, t, x0).log()  # log(1 - alpha_bar_T)
    zeros = torch.zeros_like(x0)
    return _bits_per_dim(normal_kl(mean, log_var, zeros, zeros))


def _check_timesteps(t: Tensor, x0: Tensor, schedule: NoiseSchedule) -> None:
    """Raise unless t is (B,) integer indices in [0, T), naming the bad shape, dtype or value."""
    if t.shape != (x0.shape[0],) or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(
            f"t has shape {tuple(t.shape)} and dtype {t.dtype}; need integer indices of shape ({x0.shape[0]},)"
        )
    bad = t[(t < 0) | (t >= schedule.T)]
    if bad.numel():
        raise ValueError(f"t contains {bad[0].item()}, outside the valid indices [0, T={schedule.T})")


def _check_log_variance(log_variance: LogVariance, schedule: NoiseSchedule) -> None:
    """Raise unless log_variance is a VarianceHead or a (T,) table, naming the bad shape."""
    if isinstance(log_variance, Tensor):
        if log_variance.shape != (schedule.T,):
            raise ValueError(
                f"log_variance table has shape {tuple(log_variance.shape)}; need ({schedule.T},), e.g. "
                "fixed_log_variance(schedule, 'fixed_small'), or pass a VarianceHead callable"
            )
    elif not callable(log_variance):
        raise TypeError(f"log_variance={log_variance!r} must be a (T,) tensor or a VarianceHead callable")


def _model_prediction(
    model_fn: ModelFn, x_t: Tensor, t: Tensor, schedule: NoiseSchedule,
    parameterization: Parameterization, log_variance: LogVariance,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x0_hat, eps_hat, log sigma_t^2) of p(x_{t-1} | x_t) from one network call (clip_x0 False)."""
    output = model_fn(x_t, t).to(x_t.dtype)
    if isinstance(log_variance, Tensor):
        log_var = extract(log_variance, t, x_t)
    else:
        output, log_var = log_variance(output, t)
    x0_hat, eps_hat = x0_eps_from_output(output, x_t, extract(schedule.alpha_bar, t, x_t), parameterization)
    return x0_hat, eps_hat, log_var


def _vlb_terms(
    model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule,
    parameterization: Parameterization, log_variance: LogVariance,
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_t in bits/dim (B,), x0_hat, eps_hat): the KL at index t > 0, the decoder NLL at index 0."""
    x_t = q_sample(x0, t, eps, schedule)
    x0_hat, eps_hat, log_var = _model_prediction(model_fn, x_t, t, schedule, parameterization, log_variance)
    mean = posterior_mean(x0_hat, x_t, t, schedule)  # at index 0 this is x0_hat itself
    true_mean = posterior_mean(x0, x_t, t, schedule)
    true_log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)  # exact for index >= 1
    kl = _bits_per_dim(normal_kl(true_mean, true_log_var, mean, log_var))
    nll = -_bits_per_dim(discretized_gaussian_log_likelihood(x0, mean=mean, log_scale=0.5 * log_var))
    return torch.where(t == 0, nll, kl), x0_hat, eps_hat


def vlb_terms_bpd(
    model_fn: ModelFn,
    x0: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    *,
    eps: Tensor,
    parameterization: Parameterization = "eps",
    log_variance: LogVariance,
) -> Tensor:
    """L_t in bits/dim (B,) at indices t: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), or -log p(x0|x_1) at index 0 (Ho et al. 2020, Eqs. 5, 13).

    x_t = q_sample(x0, t, eps); x0 must be 8-bit data in [-1, 1].
    """
    check_parameterization(parameterization)
    _check_timesteps(t, x0, schedule)
    _check_log_variance(log_variance, schedule)
    if eps.shape != x0.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)}; need the shape of x0, {tuple(x0.shape)}")
    return _vlb_terms(model_fn, x0, t, eps, schedule.to(x0.device), parameterization, log_variance)[0]


@torch.no_grad()
def bits_per_dim(
    model_fn: ModelFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    parameterization: Parameterization = "eps",
    log_variance: LogVariance,
    generator: Generator = None,
) -> dict[str, Tensor]:
    """The full bound L_T + sum_t L_{t-1} + L_0 in bits/dim over all T terms (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, `calc_bpd_loop`).

    Costs T network evaluations per batch (the exact bound needs every term). Noise is drawn from
    `generator` (one per sample for batch-size-independent results) at t = T-1, ..., 0 in turn.
    Returns per-sample `total_bpd` (B,), `prior_bpd` (B,), `vb` (B, T) with vb[:, i] = L_i, and the
    diagnostics `mse` (B, T) of eps_hat and `x0_mse` (B, T) of x0_hat.
    """
    check_parameterization(parameterization)
    _check_log_variance(log_variance, schedule)
    schedule = schedule.to(x0.device)
    B, T = x0.shape[0], schedule.T
    vb, mse, x0_mse = (x0.new_empty(B, T) for _ in range(3))
    for i in reversed(range(T)):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        eps = randn_like(x0, generator)
        vb[:, i], x0_hat, eps_hat = _vlb_terms(model_fn, x0, t, eps, schedule, parameterization, log_variance)
        mse[:, i], x0_mse[:, i] = per_sample_mse(eps_hat, eps), per_sample_mse(x0_hat, x0)
    prior = prior_bpd(x0, schedule)
    return {"total_bpd": prior + vb.sum(dim=1), "prior_bpd": prior, "vb": vb, "mse": mse, "x0_mse": x0_mse}
