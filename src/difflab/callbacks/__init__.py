"""Periodic work during training; callbacks reach a model only through its public sample()."""

from difflab.callbacks.checkpoint import PeriodicCheckpoint, RequeueOnSignal
from difflab.callbacks.ema_snapshots import EMASnapshots
from difflab.callbacks.evaluation import Evaluation
from difflab.callbacks.sample_grid import SampleGrid, grid_image

__all__ = ["EMASnapshots", "Evaluation", "PeriodicCheckpoint", "RequeueOnSignal", "SampleGrid", "grid_image"]
