"""Which sampler runs on which model family, and the default sampler of each family."""

from __future__ import annotations

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily, as_family
from difflab.samplers.ddim import DDIM
from difflab.samplers.ddpm import DDPM
from difflab.samplers.predictor_corrector import PC

FAMILIES = ("ddpm", "ncsn", "vp", "subvp", "ve")
# the sampler config (conf/sampler/<name>.yaml) difflab-sample uses when none is named
DEFAULT_SAMPLER = {"ddpm": "ddim", "ncsn": "ald", "vp": "pc", "subvp": "pc", "ve": "pc"}


def check_sampler_fits(sampler: object, family: NoiseFamily | NoiseSchedule) -> None:
    """Raise a clear error when a sampler is not valid for a model family."""
    fam = as_family(family)
    if isinstance(sampler, (DDPM, DDIM)) and fam.name != "ddpm":
        raise ValueError(
            f"sampler {sampler.name!r} needs a discrete-time DDPM model; this model is {fam.name!r}. "
            "Use heun, dpmpp, ode or ald (any model) or pc (score SDEs)"
        )
    if isinstance(sampler, PC):
        sampler.check_family(fam)


def default_sampler_name(family: str) -> str:
    """conf/sampler option used by difflab-sample for a checkpoint of this family."""
    if family not in DEFAULT_SAMPLER:
        raise ValueError(f"model family {family!r} is unknown; known families: {FAMILIES}")
    return DEFAULT_SAMPLER[family]
