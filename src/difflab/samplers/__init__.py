"""Samplers: pure functions over model_fn(x_t, t), plus small config objects Hydra instantiates."""

from difflab.samplers.base import Sampler, predict_x0_eps, reverse_loop
from difflab.samplers.ddim import DDIM, ddim_sample, ddim_timesteps
from difflab.samplers.ddpm import DDPM, ddpm_sample

__all__ = [
    "DDIM",
    "DDPM",
    "Sampler",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "predict_x0_eps",
    "reverse_loop",
]
