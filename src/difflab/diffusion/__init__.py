"""The mathematics of diffusion: schedules, forward process, posteriors, objectives. Plain torch only."""

from difflab.diffusion.vlb_objectives import HybridLoss, VLBLoss
from difflab.diffusion.likelihood import VarianceHead, bits_per_dim, prior_bpd, vlb_terms_bpd
from difflab.diffusion.objectives import SimpleLoss, min_snr_weight, offset_noise
from difflab.diffusion.timesteps import ImportanceTimesteps, UniformTimesteps
from difflab.diffusion.variance import LearnedVariance, learned_log_variance, respace
from difflab.diffusion.process import (
    PARAMETERIZATIONS,
    Parameterization,
    posterior_mean,
    posterior_mean_from_eps,
    q_sample,
    x0_eps_from_output,
)
from difflab.diffusion.schedules import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    quadratic_betas,
    sigmoid_betas,
)

__all__ = [
    "HybridLoss",
    "ImportanceTimesteps",
    "LearnedVariance",
    "VLBLoss",
    "learned_log_variance",
    "min_snr_weight",
    "offset_noise",
    "respace",
    "PARAMETERIZATIONS",
    "NoiseSchedule",
    "Parameterization",
    "SimpleLoss",
    "UniformTimesteps",
    "VarianceHead",
    "bits_per_dim",
    "prior_bpd",
    "vlb_terms_bpd",
    "cosine_betas",
    "linear_betas",
    "posterior_mean",
    "posterior_mean_from_eps",
    "q_sample",
    "quadratic_betas",
    "sigmoid_betas",
    "x0_eps_from_output",
]
