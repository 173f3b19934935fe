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
from difflab.diffusion.thresholding import check_dynamic_percentile, dynamic_threshold, threshold_x0  # noqa: F401 (re-exported)
from difflab.diffusion.variance import split_variance_output

ModelFn = Callable[[Tensor, Tensor], Tensor]
# cond_fn(x_t, t) -> s * grad_x log p(y | x_t), the classifier-guidance gradient (Dhariwal & Nichol 2021)
CondFn = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None
# step(x_t, x0, eps, t, t_prev) -> x_{t_prev}; t_prev = -1 means "to the data" (alpha_bar = 1).
# With learned_variance=True the loop calls step(x_t, x0, eps, t, t_prev, v), v the variance output.
StepFn = Callable[[Tensor, Tensor, Tensor, int, int], Tensor]


class Sampler(Protocol):
    """What the Lightning module, callbacks and CLI rely on.

    Samplers that support learned variances and classifier guidance (DDPM, DDIM) also take the
    keywords `model_variance` ('fixed' | 'learned' | 'learned_range') and `cond_fn`; callers pass
    them only when they are not the defaults, so other samplers need not accept them.
    """

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


def predict(
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    parameterization: Parameterization,
    *,
    clip_x0: bool,
    dynamic_percentile: float | None = None,
    learned_variance: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x0, eps, v): v is the variance output of a 2C-channel net (else None); x0 thresholded, eps made consistent.

    dynamic_percentile (Imagen's dynamic thresholding) takes precedence over static clipping.
    """
    alpha_bar = extract(schedule.alpha_bar, t, x_t)
    output = model_fn(x_t, t).to(x_t.dtype)
    v = None
    if learned_variance:
        output, v = split_variance_output(output)
    x0, eps = x0_eps_from_output(output, x_t, alpha_bar, parameterization)
    if dynamic_percentile is not None or clip_x0:
        x0 = threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
        eps = eps_from_x0(x_t, x0, alpha_bar)
    return x0, eps, v


def predict_x0_eps(
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    parameterization: Parameterization,
    clip_x0: bool,
    *,
    dynamic_percentile: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model; with clip_x0, x0 is clamped to [-1, 1] and eps made consistent with it."""
    x0, eps, _ = predict(model_fn, x_t, t, schedule, parameterization, clip_x0=clip_x0,
                         dynamic_percentile=dynamic_percentile)
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
    dynamic_percentile: float | None = None,
    learned_variance: bool = False,
) -> Tensor:
    """Run x_T -> x_0 over descending `timesteps`; callback gets {i, t, x, x0} after every step (k-diffusion style)."""
    schedule = schedule.to(x_T.device)
    x = x_T
    t_prevs = list(timesteps[1:]) + [-1]
    for i, (t, t_prev) in enumerate(zip(timesteps, t_prevs)):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps, v = predict(model_fn, x, t_vec, schedule, parameterization, clip_x0=clip_x0,
                             dynamic_percentile=dynamic_percentile, learned_variance=learned_variance)
        x = step(x, x0, eps, t, t_prev, v) if learned_variance else step(x, x0, eps, t, t_prev)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the option, its bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")
