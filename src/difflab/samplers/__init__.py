"""Samplers: pure functions over model_fn(x_t, t), plus small config objects Hydra instantiates."""

from difflab.samplers.base import Sampler, dynamic_threshold, predict, predict_x0_eps, reverse_loop
from difflab.samplers.ddim import DDIM, ddim_sample, ddim_timesteps
from difflab.samplers.ddpm import DDPM, ddpm_sample
from difflab.samplers.guidance import classifier_free_guidance, classifier_grad

__all__ = [
    "DDIM",
    "DDPM",
    "Sampler",
    "ddim_sample",
    "ddim_timesteps",
    "classifier_free_guidance",
    "classifier_grad",
    "ddpm_sample",
    "dynamic_threshold",
    "predict",
    "predict_x0_eps",
    "reverse_loop",
]
