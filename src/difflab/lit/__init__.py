"""LightningModules: orchestration of nets, schedules, objectives, EMA and optimizers."""

from difflab.lit.diffusion_module import DiffusionModule
from difflab.lit.score_module import ScoreModule

__all__ = ["DiffusionModule", "ScoreModule"]
