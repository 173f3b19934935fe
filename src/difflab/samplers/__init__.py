"""Samplers: pure functions over model_fn(x_t, t), small config objects Hydra instantiates, and generate(), the one sampling path."""

from difflab.samplers.base import DenoiserSampler, Sampler, SamplerBase, dynamic_threshold, predict, reverse_loop
from difflab.samplers.consistency import Consistency, consistency_sample
from difflab.samplers.ddim import DDIM, ddim_sample, ddim_timesteps
from difflab.samplers.ddpm import DDPM, ddpm_sample
from difflab.samplers.generate import Guidance  # generate(): from difflab.samplers.generate (a name here would hide the module)
from difflab.samplers.guidance import classifier_free_guidance, classifier_grad
from difflab.samplers.langevin import ALD, annealed_langevin_sample
from difflab.samplers.pf_ode import PFODE, pf_ode_sample
from difflab.samplers.predictor_corrector import PC, pc_sample
from difflab.samplers.solvers import DPMSolverPP, Heun, dpmpp_2m_sample, edm_heun_sample

__all__ = [
    "ALD",
    "Consistency",
    "consistency_sample",
    "DenoiserSampler",
    "Guidance",
    "SamplerBase",
    "DPMSolverPP",
    "Heun",
    "PC",
    "PFODE",
    "annealed_langevin_sample",
    "dpmpp_2m_sample",
    "edm_heun_sample",
    "pc_sample",
    "pf_ode_sample",
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
    "reverse_loop",
]
