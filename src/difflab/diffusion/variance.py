"""The reverse-process variance Sigma_theta(x_t, t): fixed or learned (Nichol & Dhariwal 2021, Sec. 3.1).

    fixed_small    Sigma_t = beta_tilde_t        (Ho et al. 2020, Sec. 3.2)
    fixed_large    Sigma_t = beta_t
    learned        log Sigma_t = v               the network's extra C channels are the log variance
    learned_range  log Sigma_t = v' log beta_t + (1 - v') log beta_tilde_t,  v' = (v + 1) / 2
                                                 (Nichol & Dhariwal 2021, Eq. 15; v in [-1, 1] spans
                                                 [beta_tilde_t, beta_t], v is not constrained)

A learned-variance network outputs 2C channels: [eps/x0/v prediction (C), variance output v (C)].
On a respaced sub-sequence tau (Nichol & Dhariwal 2021, Sec. 4, App.: respacing) beta_t and
beta_tilde_t are those of the respaced process, so a schedule built by `respace` is passed in.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from difflab.diffusion.schedules import NoiseSchedule, extract

ModelVariance = Literal["fixed", "learned", "learned_range"]
MODEL_VARIANCES: tuple[str, ...] = get_args(ModelVariance)
LEARNED_VARIANCES = ("learned", "learned_range")


def check_model_variance(model_variance: str) -> None:
    """Reject anything but fixed, learned or learned_range, naming the allowed values."""
    if model_variance not in MODEL_VARIANCES:
        raise ValueError(f"variance={model_variance!r} is not supported; choose one of {MODEL_VARIANCES}")


def split_variance_output(output: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 2C, ...) network output -> (the eps/x0/v prediction (B, C, ...), variance output v (B, C, ...))."""
    if output.shape[1] % 2:
        raise ValueError(
            f"a learned-variance network must output 2C channels, got {output.shape[1]}; "
            "set model.out_channels to twice the image channels (or leave it null)"
        )
    return output.chunk(2, dim=1)


def learned_log_variance(v: Tensor, t: Tensor, schedule: NoiseSchedule, kind: ModelVariance) -> Tensor:
    """log Sigma_theta from the variance output v at indices t (Nichol & Dhariwal 2021, Eq. 15 for learned_range)."""
    if kind == "learned":
        return v
    if kind != "learned_range":
        raise ValueError(f"variance={kind!r} is not a learned variance; choose one of {LEARNED_VARIANCES}")
    min_log = extract(schedule.posterior_log_variance_clipped, t, v)  # log beta_tilde_t
    max_log = extract(schedule.betas.log(), t, v)  # log beta_t
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


class LearnedVariance:
    """VarianceHead for likelihood.py: (B, 2C) output, t -> (prediction (B, C), log Sigma_theta (B, C))."""

    def __init__(self, schedule: NoiseSchedule, kind: ModelVariance = "learned_range") -> None:
        if kind not in LEARNED_VARIANCES:
            raise ValueError(f"variance={kind!r} is not a learned variance; choose one of {LEARNED_VARIANCES}")
        self.schedule, self.kind = schedule, kind

    def __call__(self, output: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        prediction, v = split_variance_output(output)
        return prediction, learned_log_variance(v, t, self.schedule.to(output.device), self.kind)


def respace(schedule: NoiseSchedule, timesteps: list[int] | tuple[int, ...]) -> NoiseSchedule:
    """The process on a sub-sequence tau: beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} (Nichol & Dhariwal 2021, Sec. 4).

    `timesteps` are indices into `schedule` in any order (sorted ascending here); index i of the
    result is the i-th smallest of them. Its posterior terms (beta_tilde', mu_tilde') are then
    those of the sub-sequence, which is what DDPM/DDIM on fewer steps need.
    """
    tau = sorted(set(int(t) for t in timesteps))
    if not tau or tau[0] < 0 or tau[-1] >= schedule.T:
        raise ValueError(f"timesteps {tau[:3]}...{tau[-3:]} must be non-empty indices in [0, T={schedule.T})")
    alpha_bar = schedule.alpha_bar[torch.tensor(tau, device=schedule.device)]
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return NoiseSchedule.from_betas(1.0 - alpha_bar / prev)
