"""Training objectives (per-sample losses) and timestep samplers, kept separate (as in improved-diffusion)."""

from __future__ import annotations

from typing import Any, Callable

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


class UniformTimesteps:
    """t ~ Uniform{1..T} (stored as indices 0..T-1), every sample weighted 1 (Ho et al. 2020, Alg. 1)."""

    def sample(
        self, batch_size: int, *, T: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Timestep indices (B,) and importance weights (B,)."""
        t = torch.randint(0, T, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state (protocol of every timestep sampler): uniform sampling has none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); refuses keys this sampler does not know."""
        if state:
            raise ValueError(f"UniformTimesteps has no state, but the checkpoint holds {sorted(state)}; "
                             "was it written with another timestep sampler?")


def per_sample_mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean of (output - target)^2 over every non-batch dimension: (B, ...) -> (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)


class SimpleLoss:
    """L_simple = E_t,x0,eps || target - net(x_t, t) ||^2 for eps, x0 or v targets (Ho et al. 2020, Eq. 14)."""

    def __init__(self, *, parameterization: Parameterization = "eps") -> None:
        check_parameterization(parameterization)
        self.parameterization = parameterization

    def __call__(
        self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule
    ) -> Tensor:
        """Per-sample loss (B,); the caller reduces it once."""
        x_t = q_sample(x0, t, eps, schedule)
        target = target_from_x0_eps(x0, eps, alpha_bar_at(t, schedule, x0), self.parameterization)
        return per_sample_mse(model_fn(x_t, t), target)
