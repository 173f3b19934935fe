"""LightningModules: orchestration of nets, schedules, objectives, EMA and optimizers."""

from difflab.lit.diffusion_module import DiffusionModule

__all__ = ["DiffusionModule"]
