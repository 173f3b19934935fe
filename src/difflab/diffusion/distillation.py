"""Distillation targets: progressive distillation (Salimans & Ho 2022) and consistency distillation (Song et al. 2023).

Notation. Progressive distillation works in the DDPM table's variables: z_t = alpha_t x + sigma_t eps with
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t); t > t' > t'' are a student step t -> t'' and the
teacher's midpoint t'. Consistency distillation works in EDM's (x_hat, sigma_hat) = (x_t / alpha, sigma / alpha)
(Karras et al. 2022, Sec. 2), where the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma.

    progressive_target    x~ of Algorithm 2: the x0 whose one DDIM step t -> t'' lands where two teacher steps do
    truncated_snr_weight  max(SNR, 1), the "truncated SNR" weighting of the x-space loss (Sec. 4)
    consistency_function  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma), f(x, sigma_min) = x (App. C)
    n_schedule, mu_schedule  the paper's N(k) and mu(k) (Song et al. 2023, App. C)
    teacher_ode_step      one Heun (Karras et al. 2022, Alg. 1) or DDIM (Euler in x_hat) step sigma_{n+1} -> sigma_n
    consistency_distance  squared L2 or pseudo-Huber (Song & Dhariwal 2023, Sec. 3.3) per sample
"""

from __future__ import annotations

import math
from typing import Callable, Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.process import eps_from_x0

X0Fn = Callable[[Tensor, Tensor], Tensor]  # x0_fn(x, t or sigma) -> E[x0 | x], the teacher's denoiser
Solver = Literal["heun", "ddim"]
Distance = Literal["pseudo_huber", "l2"]


def _col(v: Tensor, x: Tensor) -> Tensor:
    """A (B,) or scalar coefficient shaped to broadcast over x (B, C, H, W), in x's dtype."""
    v = torch.as_tensor(v, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def ddim_step(z_t: Tensor, x0: Tensor, alpha_bar_t: Tensor, alpha_bar_s: Tensor) -> Tensor:
    """z_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps(z_t, x0): a deterministic DDIM step t -> s (Song et al. 2021, Eq. 12, sigma=0)."""
    ab_t, ab_s = _col(alpha_bar_t, z_t), _col(alpha_bar_s, z_t)
    return ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps_from_x0(z_t, x0, ab_t)


def progressive_target(
    x0_fn: X0Fn, z_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor, alpha_bar: Tensor
) -> Tensor:
    """x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) after two teacher DDIM steps
    t -> t' -> t'' (Salimans & Ho 2022, Alg. 2). t_next = -1 is the data (alpha = 1, sigma = 0): then x~ = z_t''.

    x0_fn(z, t) is the teacher's x0 prediction at integer timesteps t (B,); alpha_bar is the schedule's table.
    """
    table = torch.cat([alpha_bar.new_ones(1), alpha_bar]).to(z_t.device)  # index t + 1: t = -1 is the data
    ab_t, ab_mid, ab_next = (table[s.to(z_t.device) + 1] for s in (t, t_mid, t_next))
    z_mid = ddim_step(z_t, x0_fn(z_t, t), ab_t, ab_mid)
    z_next = ddim_step(z_mid, x0_fn(z_mid, t_mid), ab_mid, ab_next)
    ratio = _col(((1 - ab_next) / (1 - ab_t)).sqrt(), z_t)  # sigma_t'' / sigma_t
    return (z_next - ratio * z_t) / (_col(ab_next.sqrt(), z_t) - ratio * _col(ab_t.sqrt(), z_t))


def truncated_snr_weight(alpha_bar: Tensor) -> Tensor:
    """w = max(alpha^2 / sigma^2, 1) on ||x - x_hat||^2: the truncated SNR weighting (Salimans & Ho 2022, Sec. 4)."""
    return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)


def check_progressive_steps(start_steps: int, end_steps: int, T: int) -> int:
    """Rounds of halving from start_steps to end_steps; refuses counts that are not start = end * 2^rounds <= T."""
    for name, v in (("start_steps", start_steps), ("end_steps", end_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    ratio = start_steps // end_steps
    if start_steps <= end_steps or start_steps % end_steps or ratio & (ratio - 1):
        allowed = [end_steps * 2**k for k in range(1, 8) if end_steps * 2**k <= T]
        raise ValueError(f"start_steps={start_steps} is not a power of two times end_steps={end_steps} (each round halves "
                         f"the steps); with end_steps={end_steps} use start_steps in {allowed}")
    if start_steps > T:
        raise ValueError(f"start_steps={start_steps} exceeds the schedule's T={T}; use start_steps <= {T}")
    return int(math.log2(ratio))


# -- consistency models ------------------------------------------------------------------------------------


def consistency_scalings(sigma: Tensor, sigma_min: float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2), c_out = s_d (sigma - sigma_min) / sqrt(s_d^2 + sigma^2)
    (Song et al. 2023, App. C): c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    d = (sigma - torch.as_tensor(sigma_min, dtype=sigma.dtype)).clamp(min=0)
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / (sigma_data**2 + sigma**2).sqrt()


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2) (Karras et al. 2022, Table 1)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def consistency_function(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """f(x, sigma) = c_skip x + c_out F, with F = (D - c_skip^EDM x) / c_out^EDM the EDM network output implied by the
    denoiser D (Song et al. 2023, Eq. 5 and App. C; Karras et al. 2022, Eq. 7). sigma (B,); f(x, sigma_min) = x."""
    sigma = torch.as_tensor(sigma, device=x.device)  # in its own dtype: sigma == sigma_min compares exactly there
    sigma = sigma if sigma.is_floating_point() else sigma.double()
    c_skip, c_out = consistency_scalings(sigma, sigma_min, sigma_data)
    e_skip, e_out = edm_scalings(sigma, sigma_data)
    # c_out / c_out^EDM = (sigma - sigma_min) / sigma: bounded, and exactly 0 at sigma_min
    ratio = c_out / e_out
    return _col(c_skip, x) * x + _col(ratio, x) * (denoised - _col(e_skip, x) * x)


def check_sigma_range(sigma_min: float, sigma_max: float, *, lowest: float, highest: float) -> None:
    """0 < sigma_min < sigma_max, inside the teacher's noise levels [lowest, highest]; names the bad value."""
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min:g} >= sigma_max={sigma_max:g}: need sigma_min < sigma_max")
    if sigma_min < lowest * (1 - 1e-9) or sigma_max > highest * (1 + 1e-9):
        raise ValueError(f"sigma_min={sigma_min:g}, sigma_max={sigma_max:g} lie outside the teacher's noise levels "
                         f"[{lowest:.6g}, {highest:.6g}] (sigma_hat of its schedule); use values in that range, or null for its ends")


def n_schedule(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 discretisation points at step k of K (Song et al. 2023, App. C)."""
    return int(math.ceil(math.sqrt(min(k, K) / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1)


def mu_schedule(N: int, s0: int, mu0: float) -> float:
    """mu(k) = exp(s0 log(mu0) / N(k)), the target network's EMA decay (Song et al. 2023, App. C)."""
    return math.exp(s0 * math.log(mu0) / N) if mu0 > 0 else 0.0


@torch.no_grad()
def target_ema_update(target: list[Tensor], online: list[Tensor], mu: float) -> None:
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta) (Song et al. 2023, Alg. 2)."""
    torch._foreach_lerp_(target, online, 1.0 - mu)


def teacher_ode_step(denoiser: X0Fn, x: Tensor, sigma: Tensor, sigma_next: Tensor, solver: Solver = "heun") -> Tensor:
    """x_hat at sigma_next from x_hat at sigma along dx/dsigma = (x - D(x; sigma)) / sigma: DDIM (Euler; one call) or
    Heun (two calls; Karras et al. 2022, Alg. 1). sigma, sigma_next: (B,); denoiser(x_hat, sigma) -> D."""
    if solver not in get_args(Solver):
        raise ValueError(f"solver={solver!r} is not supported; choose one of {get_args(Solver)}")
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    d = (x - denoiser(x, sigma)) / s
    x_next = x + (s_next - s) * d
    if solver == "ddim":
        return x_next
    d_next = (x_next - denoiser(x_next, sigma_next)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


def consistency_distance(a: Tensor, b: Tensor, kind: Distance = "pseudo_huber") -> Tensor:
    """Per-sample distance (B,): ||a - b||^2 / d ('l2') or sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d)
    ('pseudo_huber'; Song & Dhariwal 2023, Sec. 3.3), d the dimension of one sample."""
    if kind not in get_args(Distance):
        raise ValueError(f"distance={kind!r} is not supported; choose one of {get_args(Distance)}")
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(dim=1)
    dim = a[0].numel()
    if kind == "l2":
        return sq / dim
    c = 0.00054 * math.sqrt(dim)
    return (sq + c**2).sqrt() - c
