"""difflab: Lightning + Hydra diffusion image models."""

__version__ = "0.1.0"
