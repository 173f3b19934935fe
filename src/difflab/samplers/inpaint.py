"""Known pixels imposed at every step of a sampler: inpainting (RePaint; the score-SDE inpainter), colorization
and super-resolution, all as one operation over a projection onto what is known.

Notation: y the source in [-1, 1]; P the orthogonal projection onto what is known of y; the model's family
perturbs data as x_t = alpha(t) x0 + sigma(t) eps. Three kinds of P:

    pixel mask m (1 = known)            P x = m * x                         inpainting, super-resolution lattice
    channel mask in a colour basis B    P x = B (m * B^T x)  (B orthonormal) colorization (Song et al. 2021, App. I.3)
    block low-pass of factor f          P x = up_f(mean_f(x))               ILVR super-resolution (Choi et al. 2021)

    impose:  x_t <- x_t + P (alpha(t) y + sigma(t) z - x_t),  z ~ N(0, I)
             (Lugmayr et al. 2022, Eq. 8; Song et al. 2021, App. I.2; Choi et al. 2021, Eq. 7)
    renoise: x_u <- (alpha_u / alpha_t) x_t + sqrt(sigma_u^2 - (alpha_u / alpha_t)^2 sigma_t^2) z,  u > t
             (RePaint's jump back in time: q(x_u | x_t) of the forward process; Kingma et al. 2021, Eq. 4)

RePaint's schedule (Lugmayr et al. 2022, Sec. 4.2, Fig. 9): descending over the sampler's n levels; every j
levels it goes back up j levels and comes down again, r - 1 times (r = 1: no resampling, plain replacement).
The sampler loops (samplers/base.reverse_loop for DDPM/DDIM, predictor_corrector.pc_sample) walk `repaint_path`
and call `KnownGuide.impose` after each step and `KnownGuide.renoise` on each step up; nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion.process import randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily

Generators = torch.Generator | Sequence[torch.Generator] | None
# time -> (alpha, sigma) of the family's marginal; None means the data itself (alpha 1, sigma 0)
Marginal = Callable[[float | int | Tensor | None], tuple[Tensor, Tensor]]


def decorrelated_basis(channels: int = 3) -> Tensor:
    """Orthonormal colour basis B (C, C), first column (1, ..., 1)/sqrt(C): B^T x puts the grey level first
    (Song et al. 2021, App. I.3)."""
    if channels != 3:
        raise ValueError(f"colorization needs a 3-channel (RGB) model; this model has {channels} channel(s)")
    s3, s6, s2 = math.sqrt(3.0), math.sqrt(6.0), math.sqrt(2.0)
    return torch.tensor([[1 / s3, -2 / s6, 0.0], [1 / s3, 1 / s6, 1 / s2], [1 / s3, 1 / s6, -1 / s2]],
                        dtype=torch.float64)


@dataclass(frozen=True)
class KnownPixels:
    """values y (B, C, H, W) in [-1, 1], known where mask (B, C, H, W) bool is True, in the coordinates of an
    orthonormal per-pixel colour basis (C, C) (None: the pixels themselves)."""

    values: Tensor
    mask: Tensor
    basis: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 4 or self.mask.shape != self.values.shape or self.mask.dtype != torch.bool:
            raise ValueError(f"known pixels need values (B, C, H, W) and a bool mask of the same shape; got values "
                             f"{tuple(self.values.shape)} and mask {tuple(self.mask.shape)} ({self.mask.dtype})")
        c = self.values.shape[1]
        if self.basis is not None and self.basis.shape != (c, c):
            raise ValueError(f"colour basis of shape {tuple(self.basis.shape)} does not fit {c} channels; "
                             f"need ({c}, {c})")

    def _to_basis(self, x: Tensor) -> Tensor:
        return x if self.basis is None else torch.einsum("bihw,ij->bjhw", x, self.basis.to(x))

    def _from_basis(self, x: Tensor) -> Tensor:
        return x if self.basis is None else torch.einsum("bjhw,ij->bihw", x, self.basis.to(x))

    def project(self, x: Tensor) -> Tensor:
        """P x: the known coordinates of x, zero elsewhere (back in pixel coordinates)."""
        return self._from_basis(torch.where(self.mask, self._to_basis(x), 0.0))

    def impose(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """x_t with its known coordinates replaced by alpha y + sigma z (exact copies, no arithmetic, at sigma = 0)."""
        target = alpha * self.values.to(x_t) + sigma * noise
        return self._from_basis(torch.where(self.mask, self._to_basis(target), self._to_basis(x_t)))

    def map(self, fn: Callable[[Tensor], Tensor]) -> KnownPixels:
        """fn (a device move, a batch slice) applied to values and mask."""
        return replace(self, values=fn(self.values), mask=fn(self.mask))


@dataclass(frozen=True)
class LowPass:
    """ILVR: the f x f block means of values y (B, C, H, W) are known; P x = nearest-upsampled block means of x."""

    values: Tensor
    factor: int

    def __post_init__(self) -> None:
        h, w = self.values.shape[-2:]
        if not isinstance(self.factor, int) or self.factor < 2 or h % self.factor or w % self.factor:
            raise ValueError(f"factor={self.factor!r} must be an integer >= 2 dividing the image size {h}x{w}")

    def project(self, x: Tensor) -> Tensor:
        """P x = up_f(mean_f(x)), the orthogonal projection onto images constant on f x f blocks."""
        return F.interpolate(F.avg_pool2d(x, self.factor), scale_factor=self.factor, mode="nearest")

    def impose(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """x_t - P x_t + P(alpha y + sigma z) (Choi et al. 2021, Eq. 7)."""
        return x_t + self.project(alpha * self.values.to(x_t) + sigma * noise - x_t)

    @property
    def mask(self) -> Tensor:
        """No pixel is known exactly: an all-False mask (what the outputs record)."""
        return torch.zeros_like(self.values, dtype=torch.bool)

    def map(self, fn: Callable[[Tensor], Tensor]) -> LowPass:
        return replace(self, values=fn(self.values))


Known = KnownPixels | LowPass


def clamp_to_known(known: Known, x: Tensor, *, iterations: int = 100) -> Tensor:
    """x moved into [-1, 1] while keeping P x = P y: alternating projections onto the box and the known set
    (POCS, Youla & Webb 1982), ending on the known set; for a pixel mask (y in range) one step. The plain clamp
    of to_uint8 would break a colour basis' grey level or ILVR's block means."""
    for _ in range(iterations):
        if bool(((x >= -1) & (x <= 1)).all()):
            break
        x = x.clamp(-1.0, 1.0)
        x = x + known.project(known.values.to(x) - x)
    return x


def check_jumps(jump_length: int, resamplings: int) -> None:
    """RePaint's j and r must be integers >= 1."""
    for name, v in (("jump_length", jump_length), ("resamplings", resamplings)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1 (1 = no resampling)")


def check_repaint(levels: int, jump_length: int, resamplings: int) -> None:
    """Refuse RePaint settings that do not fit a sampler of `levels` steps, naming what is allowed."""
    check_jumps(jump_length, resamplings)
    if resamplings > 1 and jump_length >= levels:
        raise ValueError(f"jump_length={jump_length} does not fit a sampler of {levels} steps: RePaint jumps back "
                         f"j < steps levels; use jump_length <= {levels - 1}, more steps, or resamplings=1")


def repaint_path(levels: int, jump_length: int = 1, resamplings: int = 1) -> list[tuple[int, int]]:
    """RePaint's schedule as (from, to) level pairs: to = from - 1 is a sampler step, to = from + 1 a step back up;
    levels run n-1 .. 0 and -1 is the data (Lugmayr et al. 2022, Sec. 4.2; their get_schedule_jump)."""
    check_repaint(levels, jump_length, resamplings)
    jumps = {k: resamplings - 1 for k in range(0, levels - jump_length, jump_length)}
    order, k = [levels - 1], levels - 1
    while k >= 0:
        k -= 1
        order.append(k)
        if k >= 0 and jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                order.append(k)
    return list(zip(order[:-1], order[1:]))


def repaint_nfe(levels: int, jump_length: int = 1, resamplings: int = 1) -> int:
    """Sampler steps RePaint's schedule runs: n + (r - 1) j per jump point."""
    return sum(b < a for a, b in repaint_path(levels, jump_length, resamplings))


@dataclass(frozen=True)
class Inpaint:
    """An edit by known pixels: `known` imposed after every step, with RePaint's jumps of j levels taken r - 1 times."""

    known: Known
    jump_length: int = 1
    resamplings: int = 1

    def __post_init__(self) -> None:
        check_jumps(self.jump_length, self.resamplings)  # against the step count: when the sampler walks the path

    def map(self, fn: Callable[[Tensor], Tensor]) -> Inpaint:
        """fn applied to the known tensors (a device move, a batch slice)."""
        return replace(self, known=self.known.map(fn))


def discrete_marginal(schedule: NoiseSchedule) -> Marginal:
    """t -> (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) for integer t; t < 0 or None is the data
    (Ho et al. 2020, Eq. 4)."""
    def marginal(t):
        if t is None or int(t) < 0:
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        ab = schedule.alpha_bar[int(t)].to(torch.float64)
        return ab.sqrt(), (1 - ab).sqrt()

    return marginal


def family_marginal(family: NoiseFamily) -> Marginal:
    """t -> (alpha(t), sigma(t)) of a continuous family (Song et al. 2021, Eq. 29); None is the data."""
    def marginal(t):
        if t is None:
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64)
        return family.alpha(t), family.sigma(t)

    return marginal


class KnownGuide:
    """An Inpaint request bound to a sampler loop's marginal: what the loop calls between its steps."""

    def __init__(self, inpaint: Inpaint, marginal: Marginal, generator: Generators) -> None:
        self.known, self.marginal, self.generator = inpaint.known, marginal, generator

    def impose(self, x: Tensor, t: float | int | Tensor | None) -> Tensor:
        """x at time t with the known part replaced by alpha(t) y + sigma(t) z (t None or < 0: y itself)."""
        alpha, sigma = (v.to(x.device, x.dtype) for v in self.marginal(t))
        noise = randn_like(x, self.generator) if float(sigma) > 0 else torch.zeros_like(x)
        return self.known.impose(x, alpha, sigma, noise)

    def renoise(self, x: Tensor, t: float | int | Tensor, u: float | int | Tensor) -> Tensor:
        """A draw of q(x_u | x_t), u later than t: (a_u/a_t) x + sqrt(s_u^2 - (a_u/a_t)^2 s_t^2) z with a = alpha,
        s = sigma (Kingma et al. 2021, Eq. 4)."""
        (a_t, s_t), (a_u, s_u) = self.marginal(t), self.marginal(u)
        ratio = a_u / a_t
        std = (s_u**2 - ratio**2 * s_t**2).clamp(min=0).sqrt()
        return ratio.to(x) * x + std.to(x) * randn_like(x, self.generator)


def loop_path(levels: int, inpaint: Inpaint | None) -> list[tuple[int, int]]:
    """The (from, to) level pairs a sampler loop walks: plain descent, or RePaint's schedule when inpainting."""
    if inpaint is None:
        return [(k, k - 1) for k in range(levels - 1, -1, -1)]
    return repaint_path(levels, inpaint.jump_length, inpaint.resamplings)
