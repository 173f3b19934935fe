"""Gaussian noise families in continuous time: the DDPM table seen as a family, and the score SDEs.

Every family here perturbs data the same way (Kingma et al. 2021, Eq. 1; Song et al. 2021, Eq. 29):

    x_t = alpha(t) x0 + sigma(t) eps,           eps ~ N(0, I)

and so defines the EDM noise level sigma_hat(t) = sigma(t) / alpha(t) and the scaled variable
x_hat = x_t / alpha(t) = x0 + sigma_hat eps (Karras et al. 2022, Sec. 2, Eq. 4 with s(t) = alpha).
Samplers that work in (x_hat, sigma_hat) coordinates (Heun, DPM-Solver++, ALD, the PF-ODE) thus run on
every family; each family only says how sigma_hat maps back to its own time and to the network input.

    family      alpha(t)                 sigma(t)                   net input c_noise
    ddpm        sqrt(alpha_bar_t)        sqrt(1 - alpha_bar_t)      t (fractional index in [0, T-1])
    vp          exp(m(t))                sqrt(1 - exp(2 m(t)))      999 t
    subvp       exp(m(t))                1 - exp(2 m(t))            999 t
    ve / ncsn   1                        s_min (s_max/s_min)^t      999 t

with m(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 (Song et al. 2021, Eqs. 11, 33, App. B).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule

Spacing = Literal["karras", "logsnr", "time"]


def _as_t(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64, device=None if like is None else like.device)


class NoiseFamily:
    """Common interface: alpha(t), sigma(t), sigma_hat(t), its inverse, the network input and the prior."""

    name: str = "family"
    variance_preserving: bool = False  # alpha^2 + sigma^2 = 1 (needed by the v parameterization)
    t_min: float = 0.0
    t_max: float = 1.0
    prior_std: float = 1.0  # std of the prior N(0, prior_std^2 I) of x_t at t_max
    levels: int | None = None  # number of discrete noise levels the model is trained on (NCSN, DDPM)

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_sigma_hat(self, sigma_hat: Tensor) -> Tensor:
        raise NotImplementedError

    def c_noise(self, t: Tensor) -> Tensor:
        """What the network sees as its time / noise input."""
        return 999.0 * t

    def sigma_hat(self, t: Tensor) -> Tensor:
        """sigma_hat(t) = sigma(t) / alpha(t), the EDM noise level (Karras et al. 2022, Eq. 4)."""
        t = _as_t(t)
        return self.sigma(t) / self.alpha(t)

    @property
    def sigma_hat_min(self) -> float:
        return float(self.sigma_hat(_as_t(self.t_min)))

    @property
    def sigma_hat_max(self) -> float:
        return float(self.sigma_hat(_as_t(self.t_max)))

    @property
    def x_hat_prior_std(self) -> float:
        """Std of the prior in x_hat = x_t / alpha(t_max) coordinates."""
        return self.prior_std / float(self.alpha(_as_t(self.t_max)))

    @property
    def T(self) -> int:
        """Number of discrete levels, or 1000 as the nominal step count of a continuous family."""
        return self.levels or 1000

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not k.startswith('_'))})"


class DiscreteVP(NoiseFamily):
    """The DDPM table (Ho et al. 2020) as a family over fractional t in [0, T-1]; log sigma_hat is interpolated."""

    name = "ddpm"
    variance_preserving = True

    def __init__(self, schedule: NoiseSchedule) -> None:
        ab = schedule.alpha_bar.to(torch.float64).cpu()
        self._log_sigma = 0.5 * ((1 - ab) / ab).log()  # (T,), increasing in t
        self.levels = schedule.T
        self.t_min, self.t_max = 0.0, float(schedule.T - 1)

    def _interp(self, t: Tensor) -> Tensor:
        ls = self._log_sigma.to(t.device)
        t = t.clamp(0, self.t_max)
        lo = t.floor().long().clamp(max=max(self.levels - 2, 0))
        hi = (lo + 1).clamp(max=self.levels - 1)
        w = t - lo
        return ls[lo] * (1 - w) + ls[hi] * w

    def sigma_hat(self, t: Tensor) -> Tensor:
        return self._interp(_as_t(t)).exp()

    def alpha(self, t: Tensor) -> Tensor:
        return (1 + self.sigma_hat(t) ** 2).rsqrt()

    def sigma(self, t: Tensor) -> Tensor:
        s = self.sigma_hat(t)
        return s * (1 + s**2).rsqrt()

    def t_of_sigma_hat(self, sigma_hat: Tensor) -> Tensor:
        """Fractional index whose interpolated log sigma_hat equals log sigma_hat (clamped to the table)."""
        ls = self._log_sigma.to(sigma_hat.device)
        log_s = _as_t(sigma_hat).log().clamp(float(ls[0]), float(ls[-1]))
        hi = torch.searchsorted(ls, log_s.contiguous()).clamp(1, self.levels - 1)
        lo = hi - 1
        w = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return lo.to(torch.float64) + w

    def c_noise(self, t: Tensor) -> Tensor:
        return t


class _VPMean(NoiseFamily):
    """The mean coefficient m(t) shared by the VP and sub-VP SDEs (Song et al. 2021, Eqs. 11, 33)."""

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"beta_min={beta_min}, beta_max={beta_max}: need 0 < beta_min < beta_max")
        if not 0 < eps < 1:
            raise ValueError(f"eps={eps} is the smallest time; need 0 < eps < 1")
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, eps

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, App. B)."""
        return self.beta_min + _as_t(t) * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """m(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2, so alpha(t) = exp(m(t)) (Song et al. 2021, Eq. 33)."""
        t = _as_t(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_mean_coeff(t).exp()

    def _t_of_log_alpha(self, log_alpha: Tensor) -> Tensor:
        """Invert m(t) = log_alpha: the positive root of (b1-b0)/4 t^2 + b0/2 t + log_alpha = 0."""
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return (-b + (b**2 - 4 * a * log_alpha).clamp(min=0).sqrt()) / (2 * a)

    def drift_diffusion(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class VPSDE(_VPMean):
    """dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (Song et al. 2021, Eq. 11)."""

    name = "vp"
    variance_preserving = True

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self.log_mean_coeff(t))).sqrt()

    def t_of_sigma_hat(self, sigma_hat: Tensor) -> Tensor:
        return self._t_of_log_alpha(-0.5 * torch.log1p(_as_t(sigma_hat) ** 2))

    def drift_diffusion(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f(x, t), g(t)) of Eq. 11; g is shaped to broadcast against x."""
        beta = _bcast(self.beta(t), x)
        return -0.5 * beta * x, beta.sqrt()

    def discretize(self, x: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """DDPM discretisation f_i = (sqrt(1 - beta_i) - 1) x, G_i = sqrt(beta_i), beta_i = beta(t) dt (Song et al. 2021, App. E)."""
        beta_i = _bcast(self.beta(t) * dt, x)
        return ((1 - beta_i).sqrt() - 1) * x, beta_i.sqrt()

    def ancestral(self, x: Tensor, score: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """(mean, std) of the DDPM ancestral step x_{i-1} = (x + beta_i s) / sqrt(1 - beta_i) + sqrt(beta_i) z (Song et al. 2021, Eq. 47)."""
        beta_i = _bcast(self.beta(t) * dt, x)
        return (x + beta_i * score) / (1 - beta_i).sqrt(), beta_i.sqrt()


class SubVPSDE(_VPMean):
    """dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Song et al. 2021, Eq. 12)."""

    name = "subvp"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(2 * self.log_mean_coeff(t))

    def t_of_sigma_hat(self, sigma_hat: Tensor) -> Tensor:
        s = _as_t(sigma_hat)
        alpha = 0.5 * ((s**2 + 4).sqrt() - s)  # root of alpha^2 + sigma_hat alpha - 1 = 0
        return self._t_of_log_alpha(alpha.log())

    def drift_diffusion(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f, g) of Eq. 12: g^2 = beta(t) (1 - exp(4 m(t)))."""
        beta = self.beta(t)
        discount = -torch.expm1(4 * self.log_mean_coeff(t))
        return -0.5 * _bcast(beta, x) * x, _bcast((beta * discount).sqrt(), x)


class VESDE(NoiseFamily):
    """dx = sqrt(d sigma^2(t)/dt) dw, sigma(t) = s_min (s_max/s_min)^t (Song et al. 2021, Eq. 9; NCSN's levels when levels=L).

    With `levels = L` the model is an NCSN (Song & Ermon 2019): it is trained only on the L geometric
    levels sigma_i = sigma(t_i), t_i = (L - i) / (L - 1), i = 1..L, and annealed Langevin uses them.
    As in Song et al. 2021, p_0 is the data convolved with N(0, s_min^2) so the marginal std is sigma(t).
    """

    name = "ve"

    def __init__(self, *, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5,
                 levels: int | None = None) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        if levels is not None and (not isinstance(levels, int) or levels < 2):
            raise ValueError(f"levels={levels!r} must be null (continuous) or an integer >= 2")
        self.sigma_min, self.sigma_max, self.levels = sigma_min, sigma_max, levels
        self.t_min = 0.0 if levels else eps
        self.prior_std = sigma_max
        if levels:
            self.name = "ncsn"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_t(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_t(t)

    def t_of_sigma_hat(self, sigma_hat: Tensor) -> Tensor:
        return (_as_t(sigma_hat) / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)

    def level_sigmas(self) -> Tensor:
        """NCSN's sigma_1 > ... > sigma_L, geometric (Song & Ermon 2019, Sec. 4.1)."""
        if not self.levels:
            raise ValueError("this VE SDE is continuous (levels=null); it has no discrete noise levels")
        return self.sigma(torch.linspace(1.0, 0.0, self.levels, dtype=torch.float64))

    def drift_diffusion(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(0, sigma(t) sqrt(2 log(s_max/s_min))) of Eq. 9."""
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), _bcast(g, x)

    def _sigma_prev(self, t: Tensor, dt: float) -> Tensor:
        t = _as_t(t)
        return torch.where(t - dt > 1e-12, self.sigma((t - dt).clamp(min=0)), torch.zeros_like(t))

    def discretize(self, x: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """SMLD discretisation f_i = 0, G_i = sqrt(sigma_i^2 - sigma_{i-1}^2) (Song et al. 2021, Eq. 45)."""
        g2 = self.sigma(t) ** 2 - self._sigma_prev(t, dt) ** 2
        return torch.zeros_like(x), _bcast(g2.sqrt(), x)

    def ancestral(self, x: Tensor, score: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
        """(mean, std) of the SMLD ancestral step (Song et al. 2021, Eq. 47 for VE)."""
        s2, p2 = self.sigma(t) ** 2, self._sigma_prev(t, dt) ** 2
        return x + _bcast(s2 - p2, x) * score, _bcast((p2 * (s2 - p2) / s2).sqrt(), x)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample (B,) or scalar values shaped to broadcast against x, in x's dtype."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v.to(x.dtype)
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def generic_discretize(family: NoiseFamily, x: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama discretisation f dt, g sqrt(dt) of the forward SDE (Song et al. 2021, App. E)."""
    f, g = family.drift_diffusion(x, t)  # type: ignore[attr-defined]
    return f * dt, g * math.sqrt(dt)


def as_family(schedule: NoiseSchedule | NoiseFamily) -> NoiseFamily:
    """A discrete NoiseSchedule becomes DiscreteVP; a family is returned as is."""
    if isinstance(schedule, NoiseFamily):
        return schedule
    if isinstance(schedule, NoiseSchedule):
        return DiscreteVP(schedule)
    raise TypeError(f"expected a NoiseSchedule or a NoiseFamily, got {type(schedule).__name__}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0 (Karras et al. 2022, Eq. 5)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"steps={n!r} must be an integer >= 1")
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}: need 0 < sigma_min < sigma_max, rho > 0")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(inv_max + ramp * (inv_min - inv_max)) ** rho, torch.zeros(1, dtype=torch.float64)])


def sigma_steps(family: NoiseFamily, n: int, spacing: Spacing = "karras", rho: float = 7.0) -> Tensor:
    """n decreasing noise levels from the family's sigma_hat_max to sigma_hat_min, then 0.

    karras: Karras et al. 2022, Eq. 5; logsnr: uniform in lambda = -log sigma_hat; time: uniform
    in the family's own t (both from Lu et al. 2022b, Sec. 5/App. D).
    """
    if spacing not in get_args(Spacing):
        raise ValueError(f"spacing={spacing!r} is not supported; choose one of {get_args(Spacing)}")
    s_min, s_max = family.sigma_hat_min, family.sigma_hat_max
    if spacing == "karras":
        return karras_sigmas(n, s_min, s_max, rho)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"steps={n!r} must be an integer >= 1")
    if spacing == "logsnr":
        sig = torch.linspace(math.log(s_max), math.log(s_min), n, dtype=torch.float64).exp()
    else:
        sig = family.sigma_hat(torch.linspace(family.t_max, family.t_min, n, dtype=torch.float64))
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


# --- the one place that turns a network output into x0 for any family (alpha, sigma form) ---


def x0_from_output(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """x0 implied by an eps / x0 / v / score prediction at x_t = alpha x0 + sigma eps (Kingma et al. 2021, Eq. 1).

    eps: x0 = (x_t - sigma eps) / alpha; score = grad log p(x_t) = -eps / sigma (Song et al. 2021,
    Eq. 7 for a Gaussian kernel); v (variance-preserving only, Salimans & Ho 2022): x0 = alpha x_t - sigma v.
    """
    if prediction == "eps":
        return (x_t - sigma * output) / alpha
    if prediction == "x0":
        return output
    if prediction == "score":
        return (x_t + sigma**2 * output) / alpha
    if prediction == "v":
        return alpha * x_t - sigma * output
    raise ValueError(f"prediction={prediction!r} is not supported; choose one of eps, x0, v, score")
