"""Predictor-corrector sampling of a score SDE (Song et al. 2021, Alg. 1-3 and App. G).

Predictors: 'reverse_diffusion' (App. E), 'euler_maruyama', 'ancestral' (App. F; VP and VE only),
'none'; corrector: 'langevin' with signal-to-noise ratio r (Alg. 4-5), or 'none'. Time runs over
t_i = linspace(1, eps, N) with dt = 1/N as in the paper's code; the last step returns the noise-free mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.process import randn_like
from difflab.diffusion.sde import NoiseFamily, VESDE, VPSDE, SubVPSDE, _bcast, _VPMean, generic_discretize
from difflab.samplers.base import Callback, DenoiserSampler, Generator
from difflab.samplers.inpaint import Inpaint, KnownGuide, family_marginal, loop_path

Predictor = Literal["reverse_diffusion", "euler_maruyama", "ancestral", "none"]
Corrector = Literal["langevin", "none"]
SnrNorm = Literal["sample", "batch"]


def predictor_step(kind: Predictor, family: NoiseFamily, denoiser: Denoiser, x: Tensor, t: Tensor, dt: float,
                   generator: Generator) -> tuple[Tensor, Tensor]:
    """One predictor step from t to t - dt; returns (x, x_mean)."""
    if kind == "none":
        return x, x
    score = denoiser.score_t(x, t)
    if kind == "euler_maruyama":  # x <- x - [f - g^2 s] dt + g sqrt(dt) z (reverse SDE, Eq. 6)
        f, g = family.drift_diffusion(x, t)
        mean, std = x - (f - g**2 * score) * dt, g * dt**0.5
    elif kind == "reverse_diffusion":  # x <- x - f_i + G_i^2 s + G_i z (Eq. 46)
        f, g = family.discretize(x, t, dt) if hasattr(family, "discretize") else generic_discretize(family, x, t, dt)
        mean, std = x - f + g**2 * score, g
    else:
        mean, std = family.ancestral(x, score, t, dt)
    return mean + std * randn_like(x, generator), mean


def langevin_corrector(family: NoiseFamily, denoiser: Denoiser, x: Tensor, t: Tensor, dt: float, *, snr: float,
                       n_steps: int, generator: Generator, norm: SnrNorm = "sample") -> tuple[Tensor, Tensor]:
    """x <- x + e s + sqrt(2 e) z with e = 2 a (r ||z|| / ||s||)^2 (Song et al. 2021, Alg. 4/5).

    norm='batch' averages ||z|| and ||s|| over the batch as the paper's code does (needed in low
    dimension, where a per-sample ||s|| near 0 gives huge steps); norm='sample' uses each sample's
    own norms so a sample never depends on the rest of its batch (fine for images: norms concentrate).
    """
    alpha = _bcast(1 - family.beta(t) * dt, x) if isinstance(family, _VPMean) else 1.0
    mean = x
    for _ in range(n_steps):
        score = denoiser.score_t(x, t)
        z = randn_like(x, generator)
        z_norm, s_norm = z.flatten(1).norm(dim=1), score.flatten(1).norm(dim=1)
        if norm == "batch":
            z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
        ratio = z_norm / s_norm.clamp(min=1e-12)
        step = 2 * alpha * _bcast((snr * ratio) ** 2, x)
        mean = x + step * score
        x = mean + (2 * step).sqrt() * z
    return x, mean


def pc_sample(denoiser: Denoiser, x: Tensor, *, steps: int, predictor: Predictor, corrector: Corrector, snr: float,
              corrector_steps: int, snr_norm: SnrNorm = "sample", denoise: bool = True, generator: Generator = None,
              callback: Callback = None, inpaint: Inpaint | None = None) -> Tensor:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1): per t_i, corrector then predictor.

    With `inpaint`, the score-SDE inpainter / colorizer (Song et al. 2021, App. I): the known part is imposed
    after the corrector and after the predictor, over RePaint's schedule when it resamples (samplers/inpaint.py).
    """
    family = denoiser.family
    ts = torch.linspace(family.t_max, family.t_min, steps, dtype=torch.float64, device=x.device)
    dt = family.t_max / steps  # 1/N over (0, 1] as in the paper's code; SDEdit's start part-way lowers t_max
    guide = None if inpaint is None else KnownGuide(inpaint, family_marginal(family), generator)
    level_t = lambda k: ts[steps - 1 - k] if k >= 0 else None  # noqa: E731 (level k -> its time; -1: the data)
    x = x if guide is None else guide.impose(x, ts[0])
    mean = x
    for i, (k, k_next) in enumerate(loop_path(steps, inpaint)):
        t = level_t(k)
        if k_next > k:  # RePaint: one level back up
            x = guide.renoise(x, t, level_t(k_next))
            continue
        t_vec = t.expand(x.shape[0])
        if corrector == "langevin":
            x, mean = langevin_corrector(family, denoiser, x, t_vec, dt, snr=snr, n_steps=corrector_steps,
                                         generator=generator, norm=snr_norm)
            x = x if guide is None else guide.impose(x, t)
        x, mean = predictor_step(predictor, family, denoiser, x, t_vec, dt, generator)
        if guide is not None:
            x, mean = guide.impose(x, level_t(k_next)), guide.impose(mean, level_t(k_next))
        if callback is not None:
            callback({"i": i, "t": float(t), "x": x, "x0": mean})
    return mean if denoise else x


def check_pc_family(family: NoiseFamily, predictor: str, steps: int | None = None) -> None:
    """PC needs a continuous SDE; the ancestral predictor only exists for VP and VE; the VP SDE's DDPM
    discretisation needs beta_i = beta(t) / N < 1 (else sqrt(1 - beta_i) is NaN)."""
    if not isinstance(family, (VPSDE, SubVPSDE, VESDE)):
        raise ValueError(
            f"sampler pc needs a continuous-time SDE model (vp, subvp, ve, ncsn); this model is {family.name!r}. "
            "Use heun, dpmpp, ode or ald (any model), or ddpm / ddim (discrete DDPM models)"
        )
    if predictor == "ancestral" and isinstance(family, SubVPSDE):
        raise ValueError("predictor='ancestral' exists for the vp and ve SDEs only (Song et al. 2021, App. F); "
                         "use reverse_diffusion or euler_maruyama for subvp")
    if (steps is not None and isinstance(family, VPSDE) and predictor in ("reverse_diffusion", "ancestral")
            and family.beta_max * family.t_max / steps >= 1.0):
        raise ValueError(
            f"steps={steps} is too few for predictor={predictor!r} on the vp SDE: its DDPM discretisation needs "
            f"beta_max / steps < 1 (beta_max={family.beta_max:g}); use steps > {int(family.beta_max)} "
            "or predictor=euler_maruyama"
        )


@dataclass(frozen=True, kw_only=True)
class PC(DenoiserSampler):
    """Config object for `pc_sample`: N steps, predictor, corrector, snr r, corrector steps M; NFE = N (1 + M)."""

    steps: int = 1000
    predictor: Predictor = "reverse_diffusion"
    corrector: Corrector = "langevin"
    snr: float = 0.16
    corrector_steps: int = 1
    snr_norm: SnrNorm = "sample"
    denoise: bool = True
    clip_x0: bool = False
    dynamic_percentile: float | None = None  # Imagen dynamic thresholding of x0 (takes precedence over clip_x0)

    def __post_init__(self) -> None:
        self.check_thresholding()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1")
        if self.predictor not in get_args(Predictor):
            raise ValueError(f"predictor={self.predictor!r} is not supported; choose one of {get_args(Predictor)}")
        if self.corrector not in get_args(Corrector):
            raise ValueError(f"corrector={self.corrector!r} is not supported; choose one of {get_args(Corrector)}")
        if self.snr_norm not in get_args(SnrNorm):
            raise ValueError(f"snr_norm={self.snr_norm!r} is not supported; choose one of {get_args(SnrNorm)}")
        if self.snr <= 0 or not isinstance(self.corrector_steps, int) or self.corrector_steps < 1:
            raise ValueError(f"snr={self.snr} must be > 0 and corrector_steps={self.corrector_steps!r} an integer >= 1")

    @property
    def name(self) -> str:
        short = {"reverse_diffusion": "rd", "euler_maruyama": "em", "ancestral": "anc", "none": "no"}
        c = "" if self.corrector == "none" else f"-lc{self.corrector_steps}"
        return f"pc-{short[self.predictor]}{c}-{self.steps}"

    def nfe(self, T: int) -> int:
        per_step = (self.predictor != "none") + (self.corrector_steps if self.corrector == "langevin" else 0)
        return self.steps * per_step

    def check_model(self, family: NoiseFamily, model_variance: str) -> None:
        """PC runs on continuous SDEs only (its predictor and step count must fit the family)."""
        check_pc_family(family, self.predictor, self.steps)

    supports_inpainting = True  # the score-SDE inpainter / colorizer (samplers/inpaint.py)

    def run(self, denoiser: Denoiser, family: NoiseFamily, x_T: Tensor, generator: Generator, callback: Callback,
            inpaint: Inpaint | None = None) -> Tensor:
        check_pc_family(family, self.predictor, self.steps)
        return pc_sample(denoiser, x_T * family.prior_std, steps=self.steps, predictor=self.predictor,
                         corrector=self.corrector, snr=self.snr, corrector_steps=self.corrector_steps,
                         snr_norm=self.snr_norm, denoise=self.denoise, generator=generator, callback=callback,
                         inpaint=inpaint)
