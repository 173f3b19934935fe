"""Which sampler runs on which model family, and the default sampler of each family."""

from __future__ import annotations

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily, as_family
from difflab.samplers.base import Sampler

FAMILIES = ("ddpm", "ncsn", "vp", "subvp", "ve")
# the sampler config (conf/sampler/<name>.yaml) used when neither the command nor the run names one
DEFAULT_SAMPLER = {"ddpm": "ddim", "ncsn": "ald", "vp": "pc", "subvp": "pc", "ve": "pc"}


def check_sampler_fits(sampler: Sampler, family: NoiseFamily | NoiseSchedule, model_variance: str = "fixed") -> None:
    """Raise a clear error when a sampler cannot run on a model (its family, its step count, its variance)."""
    fam = as_family(family)
    sampler.validate(fam.T)
    sampler.check_model(fam, model_variance)


def default_sampler_name(family: str) -> str:
    """conf/sampler option used by difflab-sample for a checkpoint of this family."""
    if family not in DEFAULT_SAMPLER:
        raise ValueError(f"model family {family!r} is unknown; known families: {FAMILIES}")
    return DEFAULT_SAMPLER[family]
