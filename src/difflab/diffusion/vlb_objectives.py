"""Losses of learned-variance models (Nichol & Dhariwal 2021, Sec. 3.1).

    L_hybrid = L_simple + lambda L_vlb,  L_vlb = sum_t L_t = T E_t[L_t]                 (Eq. 16)

Per sample this is mse + lambda * T * L_t with L_t in bits/dim (improved-diffusion's
RESCALED_MSE: `vb * num_timesteps / 1000` for lambda = 0.001). In the L_vlb term the mean
prediction is detached (stop-gradient): L_simple alone trains the mean, L_vlb trains Sigma.
L_t is the exact Gaussian KL for t > 1 and the discretised Gaussian decoder at t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.diffusion.likelihood import vlb_terms_bpd
from difflab.diffusion.objectives import ModelFn, check_min_snr_gamma, simple_term
from difflab.diffusion.process import Parameterization, check_parameterization, q_sample
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.variance import LEARNED_VARIANCES, LearnedVariance, ModelVariance, split_variance_output


def _check_learned(variance: str) -> None:
    if variance not in LEARNED_VARIANCES:
        raise ValueError(
            f"variance={variance!r}: the hybrid/VLB losses train a learned variance; choose one of {LEARNED_VARIANCES} "
            "(objective=simple for fixed variances)"
        )


def frozen_mean_model(prediction: Tensor, v: Tensor) -> ModelFn:
    """A model_fn returning [stop_gradient(prediction), v] whatever its input (Nichol & Dhariwal 2021, Sec. 3.1)."""
    frozen = torch.cat([prediction.detach(), v], dim=1)
    return lambda x_t, t: frozen


class HybridLoss:
    """L_simple + lambda L_vlb with the mean detached in L_vlb (Nichol & Dhariwal 2021, Eq. 16); lambda = 0.001."""

    def __init__(
        self,
        *,
        parameterization: Parameterization = "eps",
        variance: ModelVariance = "learned_range",
        lambda_vlb: float = 0.001,
        min_snr_gamma: float | None = None,
    ) -> None:
        check_parameterization(parameterization)
        _check_learned(variance)
        check_min_snr_gamma(min_snr_gamma)
        if not lambda_vlb >= 0:
            raise ValueError(f"lambda_vlb={lambda_vlb!r} must be >= 0 (0.001 in Nichol & Dhariwal 2021)")
        self.parameterization, self.variance = parameterization, variance
        self.lambda_vlb, self.min_snr_gamma = float(lambda_vlb), min_snr_gamma

    def terms(self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> dict[str, Tensor]:
        """{'mse': (B,), 'vlb': L_t in bits/dim (B,)} from one network call."""
        x_t = q_sample(x0, t, eps, schedule)
        prediction, v = split_variance_output(model_fn(x_t, t))
        mse = simple_term(prediction, x0, t, eps, schedule, self.parameterization, self.min_snr_gamma)
        vlb = vlb_terms_bpd(
            frozen_mean_model(prediction, v), x0, t, schedule, eps=eps,
            parameterization=self.parameterization, log_variance=LearnedVariance(schedule, self.variance),
        )
        return {"mse": mse, "vlb": vlb}

    def __call__(self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Per-sample mse + lambda * T * L_t (B,)."""
        terms = self.terms(model_fn, x0, t, eps, schedule)
        return terms["mse"] + self.lambda_vlb * schedule.T * terms["vlb"]


class VLBLoss:
    """L_vlb alone, T * L_t per sample in bits/dim, gradients through mean and variance (Nichol & Dhariwal 2021, Sec. 3.3)."""

    def __init__(self, *, parameterization: Parameterization = "eps", variance: ModelVariance = "learned_range") -> None:
        check_parameterization(parameterization)
        _check_learned(variance)
        self.parameterization, self.variance = parameterization, variance

    def __call__(self, model_fn: ModelFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Per-sample T * L_t (B,); with importance-sampled t this is the low-variance L_vlb estimate."""
        return schedule.T * vlb_terms_bpd(
            model_fn, x0, t, schedule, eps=eps, parameterization=self.parameterization,
            log_variance=LearnedVariance(schedule, self.variance),
        )
