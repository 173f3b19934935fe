"""The probability-flow ODE in (x_hat, log sigma_hat) and an adaptive black-box solver for it (scipy's RK45).

With u = log sigma_hat the PF-ODE dx_hat/dsigma = (x_hat - D) / sigma (Karras et al. 2022, Eq. 3;
Song et al. 2021, Eq. 13 rescaled) becomes dx_hat/du = x_hat - D(x_hat; e^u), smooth over the whole
range sigma_hat in [0.002, 160], which keeps the adaptive step count low.
"""

from __future__ import annotations

from typing import Callable, Literal, get_args

import numpy as np
import torch
from torch import Tensor

OdeMethod = Literal["RK45", "RK23", "DOP853"]
DenoiseFn = Callable[[Tensor, Tensor | float], Tensor]


def check_tolerances(rtol: float, atol: float, method: str) -> None:
    """Reject non-positive tolerances and unknown methods, naming the allowed ones."""
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol={rtol}, atol={atol} must both be > 0 (Song et al. 2021 use 1e-5)")
    if method not in get_args(OdeMethod):
        raise ValueError(f"method={method!r} is not supported; choose one of {get_args(OdeMethod)}")


def pf_ode_velocity(denoiser: DenoiseFn, x_hat: Tensor, u: float) -> Tensor:
    """dx_hat/du = x_hat - D(x_hat; e^u) with u = log sigma_hat (Karras et al. 2022, Eq. 3 in log sigma)."""
    return x_hat - denoiser(x_hat, float(np.exp(u)))


def integrate(
    fn: Callable[[Tensor, float], Tensor],
    y0: Tensor,
    u_start: float,
    u_end: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: OdeMethod = "RK45",
) -> tuple[Tensor, int]:
    """Solve dy/du = fn(y, u) from u_start to u_end with scipy.integrate.solve_ivp; returns (y(u_end), NFE)."""
    from scipy.integrate import solve_ivp

    check_tolerances(rtol, atol, method)
    shape, dtype, device = y0.shape, y0.dtype, y0.device

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        y_t = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        return fn(y_t, u).detach().to(torch.float64).cpu().numpy().reshape(-1)

    y_init = y0.detach().to(torch.float64).cpu().numpy().reshape(-1)
    sol = solve_ivp(rhs, (u_start, u_end), y_init, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver ({method}, rtol={rtol}, atol={atol}) failed: {sol.message}")
    y_end = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(device=device, dtype=dtype)
    return y_end, int(sol.nfev)
