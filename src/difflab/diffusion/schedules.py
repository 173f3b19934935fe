"""Beta schedules and the discrete noise-schedule table of DDPM.

Notation (Ho et al. 2020): the paper's t = 1..T is stored at index t - 1, so every table
below has length T and is indexed by the integer timestep the network sees, t_idx in [0, T).

    beta_t        forward-process variance               q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t I)
    alpha_t       1 - beta_t
    alpha_bar_t   prod_{s<=t} alpha_s                      q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1-alpha_bar_t) I)
    beta_tilde_t  (1-alpha_bar_{t-1}) / (1-alpha_bar_t) beta_t   variance of q(x_{t-1} | x_t, x0)  (Eq. 7)

Tables are float64; `extract` gathers them per sample and casts to the caller's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "linear_betas",
    "quadratic_betas",
    "cosine_betas",
    "sigmoid_betas",
    "extract",
]


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} is not a valid number of diffusion steps; use an integer >= 1")


def _beta_range(T: int, beta_start: float, beta_end: float, reference_T: int | None) -> tuple[float, float]:
    """(beta_1, beta_T), scaled by reference_T / T so any T ends near pure noise (Nichol & Dhariwal 2021, Sec. 3.2 code)."""
    _check_T(T)
    scale = 1.0 if reference_T is None else reference_T / T
    start, end = beta_start * scale, beta_end * scale
    if not 0.0 < start <= end < 1.0:
        raise ValueError(
            f"beta_start={beta_start}, beta_end={beta_end} (x {scale:g} = reference_T/T) give "
            f"beta_1={start:g}, beta_T={end:g}: need 0 < beta_1 <= beta_T < 1; "
            "use a larger T, smaller betas, or reference_T=null to turn off the scaling"
        )
    return start, end


def linear_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, reference_T: int | None = 1000
) -> Tensor:
    """Linear beta_t from beta_1 to beta_T (Ho et al. 2020, Sec. 4); endpoints scaled by reference_T / T."""
    start, end = _beta_range(T, beta_start, beta_end, reference_T)
    return torch.linspace(start, end, T, dtype=torch.float64)


def quadratic_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, reference_T: int | None = 1000
) -> Tensor:
    """sqrt(beta_t) linear from sqrt(beta_1) to sqrt(beta_T) (DDPM reference code, 'quad'); scaled like linear."""
    start, end = _beta_range(T, beta_start, beta_end, reference_T)
    return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2


def _betas_from_alpha_bar(alpha_bar_fn, T: int, max_beta: float) -> Tensor:
    """beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), clipped at max_beta (Nichol & Dhariwal 2021, Eq. 17)."""
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = alpha_bar_fn(grid) / alpha_bar_fn(torch.zeros((), dtype=torch.float64))
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2) / alpha_bar(0) (Nichol & Dhariwal 2021, Eq. 17)."""
    _check_T(T)
    if s < 0:
        raise ValueError(f"s={s} must be >= 0")
    return _betas_from_alpha_bar(
        lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2, T, max_beta
    )


def sigmoid_betas(
    T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """alpha_bar(t) = (sigmoid(end/tau) - sigmoid((t(end-start)+start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)) (Jabri et al. 2022, Alg. 1; Chen 2023)."""
    _check_T(T)
    if not start < end or tau <= 0:
        raise ValueError(f"start={start}, end={end}, tau={tau}: need start < end and tau > 0")
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))

    def alpha_bar(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return _betas_from_alpha_bar(alpha_bar, T, max_beta)


def extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather table[t] per sample and reshape to broadcast against x: (B,) -> (B, 1, ..., 1)."""
    out = table.to(x.device)[t]
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM table derived from betas (Ho et al. 2020, Eqs. 4, 6, 7); build with NoiseSchedule.from_betas."""

    betas: Tensor
    alphas: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    sqrt_alpha_bar: Tensor
    sqrt_one_minus_alpha_bar: Tensor
    posterior_variance: Tensor  # beta_tilde_t, Eq. 7
    posterior_log_variance_clipped: Tensor  # log beta_tilde with beta_tilde_1 replaced by beta_tilde_2
    posterior_mean_coef_x0: Tensor  # mu_tilde = coef_x0 * x0 + coef_xt * x_t  (Eq. 7)
    posterior_mean_coef_xt: Tensor
    posterior_mean_eps_coef_xt: Tensor  # mu_tilde = eps_coef_xt * x_t - eps_coef_eps * eps  (Eq. 11)
    posterior_mean_eps_coef_eps: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> "NoiseSchedule":
        """Every derived quantity of the discrete forward process, in float64."""
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D sequence with every value in (0, 1)")
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        post_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(betas) > 1 else betas.clone()
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1.0 - alpha_bar).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=clipped.log(),
            posterior_mean_coef_x0=betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            posterior_mean_coef_xt=(1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
            posterior_mean_eps_coef_xt=1.0 / alphas.sqrt(),
            posterior_mean_eps_coef_eps=betas / (alphas.sqrt() * (1.0 - alpha_bar).sqrt()),
        )

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy with every table on `device` (kept in float64)."""
        if torch.device(device) == self.device:
            return self
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
