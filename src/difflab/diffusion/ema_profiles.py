"""Power-function EMA profiles and their post-hoc least-squares reconstruction (Karras et al. 2024, EDM2).

Notation (EDM2, Sec. 3 and App. C). Training step t = 1, 2, ... counts optimizer steps; theta_i are the
weights after step i, taken as constant on the interval (i - 1, i].

    gamma         exponent of the power-function profile  p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),
                  0 <= tau <= t (Eq. 3); gamma > -1
    sigma_rel     the profile's standard deviation relative to t: sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
                  (Eq. 123); largest, SIGMA_REL_MAX ~ 0.3003, at gamma = (sqrt 5 - 3) / 2; difflab uses the
                  branch gamma >= that peak, where sigma_rel falls as gamma grows (EDM2's largest root)
    beta_t        (1 - 1/t)^(gamma + 1): theta_hat(t) = beta_t theta_hat(t - 1) + (1 - beta_t) theta_t (Eq. 4)

The update is exact for every t: theta_hat(t) = sum_i w_i theta_i with w_i = (i^(gamma+1) - (i-1)^(gamma+1)) /
t^(gamma+1), the integral of p_{t,gamma} over (i - 1, i] (`power_profile_weights`). Reconstruction solves the
least-squares problem of App. C.3 (Algorithm 3) with the closed-form inner products of profiles (Eq. 151).
Everything is float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "GAMMA_PEAK",
    "SIGMA_REL_MAX",
    "gamma_of_sigma_rel",
    "posthoc_coefficients",
    "power_beta",
    "power_profile_weights",
    "profile_inner_product",
    "sigma_rel_of_gamma",
    "weighting_tv_distance",
]

GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # where sigma_rel(gamma) is largest (d/dgamma = 0: (g+1)^2 + (g+1) = 1)


def sigma_rel_of_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent gamma (EDM2, Eq. 123)."""
    if not gamma > -1.0:
        raise ValueError(f"gamma={gamma!r} is not a power-function EMA exponent; it must be > -1")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_PEAK)  # ~0.30028: no power-function profile is wider


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma >= GAMMA_PEAK whose profile has this sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2 = 0 (EDM2, Eq. 126, Algorithm 2)."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel!r} has no power-function EMA profile; it must lie in "
                         f"(0, {SIGMA_REL_MAX:.5f}] (the widest profile, gamma = {GAMMA_PEAK:.4f})")
    lo, hi = GAMMA_PEAK, 1.0
    while sigma_rel_of_gamma(hi) > s:  # sigma_rel falls monotonically on [GAMMA_PEAK, inf)
        lo, hi = hi, 2.0 * hi + 1.0
    for _ in range(200):  # bisection to float64 resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if sigma_rel_of_gamma(mid) > s else (lo, mid)
    return lo if abs(sigma_rel_of_gamma(lo) - s) <= abs(sigma_rel_of_gamma(hi) - s) else hi


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of the power-function EMA update after training step t >= 1 (EDM2, Eq. 4)."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t={t!r} is not a training step; the power-function EMA counts steps t = 1, 2, ...")
    return (1.0 - 1.0 / t) ** (float(gamma) + 1.0)


def power_profile_weights(gamma: float, t: int) -> Tensor:
    """(t,) weights w_i of theta_1..theta_t in the power-function EMA after step t: the integral of
    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) over (i - 1, i] (EDM2, Eq. 3-4)."""
    power_beta(gamma, t)  # checks t
    edges = (torch.arange(t + 1, dtype=torch.float64) / t) ** (float(gamma) + 1.0)  # (i / t)^(gamma + 1), i = 0..t
    return edges[1:] - edges[:-1]


def profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = (ga + 1)(gb + 1) (t_a / t_b)^e / ((ga + gb + 1) max(t_a, t_b)), e = gb if
    t_a < t_b else -ga: the L2 inner product of two power-function profiles (EDM2, Eq. 151). Broadcasts."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** exponent
    return num / ((gamma_a + gamma_b + 1.0) * torch.maximum(t_a, t_b))


def posthoc_coefficients(
    t_in: Sequence[float] | Tensor, gamma_in: Sequence[float] | Tensor,
    t_out: Sequence[float] | Tensor, gamma_out: Sequence[float] | Tensor,
) -> tuple[Tensor, Tensor]:
    """(x, error): x (N_in, N_out) solves A x = B with A_ij = <p_i, p_j>, B_ij = <p_i, p_out_j> (EDM2, App. C.3,
    Algorithm 3), each column scaled to sum to 1; error (N_out,) is ||sum_i x_i p_i - p_out|| / ||p_out||."""
    t_in, gamma_in, t_out, gamma_out = (torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                                        for v in (t_in, gamma_in, t_out, gamma_out))
    if t_in.numel() == 0 or t_in.shape != gamma_in.shape or t_out.shape != gamma_out.shape:
        raise ValueError(f"need as many snapshot times as exponents (got {t_in.numel()} and {gamma_in.numel()}, at "
                         f"least one) and target times as exponents (got {t_out.numel()} and {gamma_out.numel()})")
    if bool((t_in <= 0).any()) or bool((t_out <= 0).any()):
        raise ValueError("snapshot and target times are training steps > 0")
    A = profile_inner_product(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])  # (N_in, N_in)
    B = profile_inner_product(t_in[:, None], gamma_in[:, None], t_out[None, :], gamma_out[None, :])  # (N_in, N_out)
    x = torch.linalg.solve(A, B)
    x = x / x.sum(dim=0, keepdim=True)
    self_out = (gamma_out + 1.0) ** 2 / ((2.0 * gamma_out + 1.0) * t_out)  # <p_out, p_out>
    residual = (x * (A @ x)).sum(0) - 2.0 * (x * B).sum(0) + self_out  # ||sum x_i p_i - p_out||^2
    return x, (residual.clamp_min(0.0) / self_out).sqrt()


def weighting_tv_distance(
    t_in: Sequence[int] | Tensor, gamma_in: Sequence[float] | Tensor, x: Tensor,
    t_out: Sequence[int] | Tensor, gamma_out: Sequence[float] | Tensor, *, chunk: int = 1 << 16,
) -> Tensor:
    """(N_out,) total-variation distance 1/2 sum_i |w_rec_i - w_out_i| between the weights that sum_j x_j theta_hat_j
    gives the training steps' theta_i and those of the target profile (EDM2, Eq. 3-4, exact per step): the
    reconstructed EMA differs from the target's by at most this times the spread (max - min) of the weights."""
    t_in = torch.as_tensor(t_in, dtype=torch.float64).reshape(-1, 1)  # (N_in, 1)
    gamma_in = torch.as_tensor(gamma_in, dtype=torch.float64).reshape(-1, 1)
    t_out = torch.as_tensor(t_out, dtype=torch.float64).reshape(-1, 1)  # (N_out, 1)
    gamma_out = torch.as_tensor(gamma_out, dtype=torch.float64).reshape(-1, 1)
    x = torch.as_tensor(x, dtype=torch.float64)  # (N_in, N_out)

    def cdf_gap(i: Tensor) -> Tensor:  # (N_out, len(i)): reconstructed minus target cumulative weight up to step i
        within = (torch.minimum(i[None], t_in) / t_in) ** (gamma_in + 1.0)  # (N_in, len(i))
        target = (torch.minimum(i[None], t_out) / t_out) ** (gamma_out + 1.0)
        return x.T @ within - target

    last = int(max(t_in.max(), t_out.max()))
    total = torch.zeros(t_out.shape[0], dtype=torch.float64)
    for start in range(0, last, chunk):  # steps start+1 .. stop, in chunks (memory stays N x chunk)
        edges = torch.arange(start, min(start + chunk, last) + 1, dtype=torch.float64)
        total += cdf_gap(edges).diff(dim=1).abs().sum(dim=1)
    return 0.5 * total
