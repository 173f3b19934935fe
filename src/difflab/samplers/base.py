"""The one reverse loop every discrete-time sampler runs, and the pieces samplers share.

A sampler never sees a network: it sees `model_fn(x_t, t) -> output`, where output is the
network's eps, x0 or v prediction for integer timesteps t (B,) in [0, T).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from difflab.diffusion.denoiser import Denoiser, Prediction
from difflab.diffusion.process import Parameterization, eps_from_x0, x0_eps_from_output
from difflab.diffusion.schedules import NoiseSchedule, extract
from difflab.diffusion.sde import NoiseFamily, as_family
from difflab.diffusion.thresholding import check_dynamic_percentile, dynamic_threshold, threshold_x0  # noqa: F401 (re-exported)
from difflab.diffusion.variance import split_variance_output
from difflab.samplers.inpaint import Inpaint, KnownGuide, discrete_marginal, loop_path

ModelFn = Callable[[Tensor, Tensor], Tensor]
# cond_fn(x_t, t) -> s * grad_x log p(y | x_t), the classifier-guidance gradient (Dhariwal & Nichol 2021)
CondFn = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None
# step(x_t, x0, eps, t, t_prev) -> x_{t_prev}; t_prev = -1 means "to the data" (alpha_bar = 1).
# With learned_variance=True the loop calls step(x_t, x0, eps, t, t_prev, v), v the variance output.
StepFn = Callable[[Tensor, Tensor, Tensor, int, int], Tensor]


class Sampler(Protocol):
    """What generate() relies on (every sampler derives from SamplerBase, which supplies the defaults).

    Capabilities are declared, not inferred from types: a sampler with
    `supports_learned_variance` takes the keyword `model_variance` ('fixed' | 'learned' |
    'learned_range') and reads the net's variance channels; one with `supports_classifier_guidance`
    takes `cond_fn`; one with `supports_inpainting` takes `inpaint` (known pixels imposed after every step,
    samplers/inpaint.py); one with `supports_sdedit` starts at its family's t_max, so SDEdit can start it part-way
    (samplers/sdedit.py). generate() passes them only to samplers that declare them.
    """

    supports_learned_variance: bool
    supports_classifier_guidance: bool
    supports_inpainting: bool
    supports_sdedit: bool

    @property
    def name(self) -> str: ...

    def nfe(self, T: int) -> int: ...

    def validate(self, T: int) -> None: ...

    def check_model(self, family: NoiseFamily, model_variance: str) -> None: ...

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


class SamplerBase:
    """Defaults of the Sampler protocol: no learned variance, no classifier guidance, no inpainting, SDEdit (a start
    part-way, at the family's t_max), any model family."""

    supports_learned_variance = False
    supports_classifier_guidance = False
    supports_inpainting = False
    supports_sdedit = True

    def validate(self, T: int) -> None:
        """Fail before sampling when a setting does not fit a model of T steps (default: every setting fits)."""

    def check_model(self, family: NoiseFamily, model_variance: str) -> None:
        """Fail before sampling when this sampler cannot run on the model (default: it runs on every family)."""


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
    inpaint: Inpaint | None = None,
    generator: Generator = None,
) -> Tensor:
    """Run x_T -> x_0 over descending `timesteps`; callback gets {i, t, x, x0} after every step (k-diffusion style).

    With `inpaint` the loop walks RePaint's schedule: the known part is imposed after every step and a step
    back up draws q(x_u | x_t) without a network call (samplers/inpaint.py); `generator` draws that noise.
    """
    schedule = schedule.to(x_T.device)
    times = sorted(timesteps) + [-1]  # level k -> timestep; level -1 (times[-1]) is the data
    guide = None if inpaint is None else KnownGuide(inpaint, discrete_marginal(schedule), generator)
    x = x_T if guide is None else guide.impose(x_T, times[-2])
    for i, (k, k_next) in enumerate(loop_path(len(timesteps), inpaint)):
        t, t_prev = times[k], times[k_next]
        if k_next > k:  # RePaint: one level back up
            x = guide.renoise(x, t, t_prev)
            continue
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps, v = predict(model_fn, x, t_vec, schedule, parameterization, clip_x0=clip_x0,
                             dynamic_percentile=dynamic_percentile, learned_variance=learned_variance)
        x = step(x, x0, eps, t, t_prev, v) if learned_variance else step(x, x0, eps, t, t_prev)
        if guide is not None:
            x = guide.impose(x, t_prev)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def check_discrete_family(sampler_name: str, family: NoiseFamily) -> None:
    """The discrete-time samplers (DDPM, DDIM) run on DDPM models only; name the samplers that run on others."""
    if family.name != "ddpm":
        raise ValueError(
            f"sampler {sampler_name!r} needs a discrete-time DDPM model; this model is {family.name!r}. "
            "Use heun, dpmpp, ode or ald (any model) or pc (score SDEs)"
        )


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the option, its bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")


def start_noise(x_T: Tensor, family: NoiseFamily) -> Tensor:
    """x_hat at sigma_hat_max from standard normal x_T: x_T times the prior std in x_hat coordinates."""
    return x_T * family.x_hat_prior_std


class DenoiserSampler(SamplerBase):
    """Base of the samplers that work through the one denoiser adapter: any family, any prediction.

    __call__ has the signature of every sampler (model_fn, x_T, schedule); subclasses implement run()
    on the Denoiser it builds, with x_T ~ N(0, I) unscaled.
    """

    clip_x0 = False
    dynamic_percentile: float | None = None  # subclasses make both dataclass fields

    def check_thresholding(self) -> None:
        """Refuse a bad dynamic_percentile when the sampler is built (called from __post_init__)."""
        check_dynamic_percentile(self.dynamic_percentile)

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback) -> Tensor:
        """Images from standard normal x_T under `family`, sampled through `denoiser`."""
        raise NotImplementedError

    def __call__(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        schedule: NoiseSchedule | NoiseFamily,
        *,
        parameterization: Prediction = "eps",
        generator: Generator = None,
        callback: Callback = None,
        inpaint: Inpaint | None = None,
    ) -> Tensor:
        family = as_family(schedule)
        denoiser = Denoiser(model_fn, family, parameterization, clip_x0=self.clip_x0,
                            dynamic_percentile=self.dynamic_percentile)
        if inpaint is None:
            return self.run(denoiser, family, x_T, generator, callback)
        if not self.supports_inpainting:
            raise ValueError(f"sampler {self.name!r} cannot impose known pixels (inpaint); use ddpm, ddim or pc")
        return self.run(denoiser, family, x_T, generator, callback, inpaint=inpaint)  # type: ignore[call-arg]
