"""The one reverse loop every discrete-time sampler runs, and the pieces samplers share.

A sampler never sees a network: it sees `model_fn(x_t, t) -> output`, where output is the
network's eps, x0 or v prediction for integer timesteps t (B,) in [0, T).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from difflab.diffusion.process import Parameterization, eps_from_x0, x0_eps_from_output
from difflab.diffusion.schedules import NoiseSchedule, extract

ModelFn = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None
# step(x_t, x0, eps, t, t_prev) -> x_{t_prev}; t_prev = -1 means "to the data" (alpha_bar = 1)
StepFn = Callable[[Tensor, Tensor, Tensor, int, int], Tensor]


class Sampler(Protocol):
    """What the Lightning module, callbacks and CLI rely on."""

    @property
    def name(self) -> str: ...

    def nfe(self, T: int) -> int: ...

    def validate(self, T: int) -> None: ...

    def __call__(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        schedule: NoiseSchedule,
        *,
        parameterization: Parameterization = "eps",
        generator: Generator = None,
        callback: Callback = None,
    ) -> Tensor: ...


def predict_x0_eps(
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    parameterization: Parameterization,
    clip_x0: bool,
) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model; with clip_x0, x0 is clamped to [-1, 1] and eps made consistent with it."""
    alpha_bar = extract(schedule.alpha_bar, t, x_t)
    x0, eps = x0_eps_from_output(model_fn(x_t, t).to(x_t.dtype), x_t, alpha_bar, parameterization)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, alpha_bar)
    return x0, eps


def reverse_loop(
    model_fn: ModelFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    step: StepFn,
    *,
    parameterization: Parameterization,
    clip_x0: bool,
    callback: Callback,
) -> Tensor:
    """Run x_T -> x_0 over descending `timesteps`; callback gets {i, t, x, x0} after every step (k-diffusion style)."""
    schedule = schedule.to(x_T.device)
    x = x_T
    t_prevs = list(timesteps[1:]) + [-1]
    for i, (t, t_prev) in enumerate(zip(timesteps, t_prevs)):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = predict_x0_eps(model_fn, x, t_vec, schedule, parameterization, clip_x0)
        x = step(x, x0, eps, t, t_prev)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the option, its bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")
