"""SDEdit (Meng et al. 2022, Alg. 1): noise a source part-way and let any sampler denoise it.

    t0 = strength * t_max              (DDPM: the first round(strength T) levels)
    x_{t0} = alpha(t0) y + sigma(t0) z,  z the sample's own x_T noise

then run the sampler on the family truncated at t0 (its t_max lowered, or the DDPM table cut to t0's levels):
every sampler that starts at its family's t_max (`supports_sdedit`) thus starts at x_{t0}, with its step count
scaled by `strength` (ceil, at least 1) so a step costs about the same noise range as in a full run. The
network sees the same times as in a full run (the truncated table keeps the first levels, a continuous family
keeps its time axis). strength = 0 returns the source, strength = 1 starts from (almost) pure noise.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily, _bcast
from difflab.samplers.base import Sampler


def check_strength(strength: float) -> None:
    """strength must be a number in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} is outside [0, 1]; 0 returns the source, 1 ignores it "
                         "(starts from noise), e.g. strength=0.5")


@dataclass(frozen=True)
class SDEdit:
    """source y (B, C, H, W) in [-1, 1], noised to t0 = strength * t_max and denoised (Meng et al. 2022)."""

    source: Tensor
    strength: float

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if self.source.ndim != 4:
            raise ValueError(f"the SDEdit source must be images (B, C, H, W); got shape {tuple(self.source.shape)}")

    def map(self, fn: Callable[[Tensor], Tensor]) -> SDEdit:
        """fn (a device move, a batch slice, an encoder) applied to the source."""
        return dataclasses.replace(self, source=fn(self.source))


def truncate(family: NoiseSchedule | NoiseFamily, strength: float) -> NoiseSchedule | NoiseFamily:
    """The family restricted to t <= t0 = strength t_max (a DDPM table: its first max(1, round(strength T)) levels)."""
    check_strength(strength)
    if isinstance(family, NoiseSchedule):
        return NoiseSchedule.from_betas(family.betas[: max(1, round(strength * family.T))])
    cut = copy.copy(family)
    cut.t_max = max(family.t_min, strength * family.t_max)
    return cut


def scaled_sampler(sampler: Sampler, strength: float, levels: int | None = None) -> Sampler:
    """The sampler with its integer `steps` scaled by strength (ceil, 1 .. levels); one without steps (adaptive,
    or DDPM's all-levels) as it is."""
    steps = getattr(sampler, "steps", None)
    if not dataclasses.is_dataclass(sampler) or isinstance(steps, bool) or not isinstance(steps, int):
        return sampler
    scaled = max(1, math.ceil(steps * strength))
    return dataclasses.replace(sampler, steps=scaled if levels is None else min(scaled, levels))


def start_point(family: NoiseSchedule | NoiseFamily, source: Tensor, x_T: Tensor) -> Tensor:
    """What the sampler takes as x_T to start at x_{t0} = alpha(t0) y + sigma(t0) x_T of the truncated family
    (Meng et al. 2022, Alg. 1)."""
    if isinstance(family, NoiseSchedule):  # discrete samplers start at x_{T-1} = x_T itself (prior std 1)
        ab = family.alpha_bar[-1].to(source.device, torch.float64)
        return (ab.sqrt() * source.double() + (1 - ab).sqrt() * x_T.double()).to(x_T.dtype)
    t0 = torch.as_tensor(family.t_max, dtype=torch.float64)
    alpha, sigma = _bcast(family.alpha(t0), source), _bcast(family.sigma(t0), source)
    return (alpha * source + sigma * x_T) / family.prior_std  # samplers scale x_T by the prior std
