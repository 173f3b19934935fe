"""Build the first stage of a latent diffusion run from its `first_stage` config, and describe it so the
run's checkpoint is self-contained.

Kinds (conf/first_stage/*.yaml):
- `ckpt`: an autoencoder trained by difflab (`difflab-train experiment=..._autoencoder`), `ckpt_path=` its checkpoint;
- `diffusers_vae`: a local folder holding a diffusers `AutoencoderKL` (e.g. Stable Diffusion's VAE),
  loaded with `from_pretrained`; its `scaling_factor` is the latent scale unless `scale_factor` is set;
- `embedded`: what a latent diffusion checkpoint stores instead of the two above: the autoencoder's
  structure (its config), its weights travelling in the checkpoint's state_dict. `difflab-sample` and
  `difflab-eval` therefore need nothing but the checkpoint, even after the autoencoder's files are gone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from difflab.nets.first_stage import FirstStage, check_scale_factor

KINDS = ("ckpt", "diffusers_vae", "embedded")
DIFFUSERS_HINT = "pip install 'difflab[latent]' (or: pip install diffusers)"


def _diffusers_autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(f"first_stage=diffusers_vae needs the diffusers package, which is not installed: "
                          f"{DIFFUSERS_HINT}") from err
    return AutoencoderKL


def load_diffusers_vae(path: str | os.PathLike) -> nn.Module:
    """A diffusers AutoencoderKL from a local folder (`save_pretrained` layout), frozen; refuses anything else."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"first_stage.path={str(path)!r} is not a diffusers AutoencoderKL folder: it has no "
                         "config.json (expected what AutoencoderKL.save_pretrained writes, e.g. the vae/ folder of a "
                         "Stable Diffusion download)")
    cls = _diffusers_autoencoder_class()
    declared = cls.load_config(folder).get("_class_name")
    if declared not in (None, "AutoencoderKL"):
        raise ValueError(f"first_stage.path={str(path)!r} holds a diffusers {declared}, not an AutoencoderKL")
    return cls.from_pretrained(folder, low_cpu_mem_usage=False).eval().requires_grad_(False)


def _diffusers_latent_shape(vae: nn.Module, image_size: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"data.image_size={image_size} is not divisible by the diffusers VAE's downsampling factor "
                         f"{factor}; choose an image size that is a multiple of {factor}")
    return int(vae.config.latent_channels), image_size // factor, image_size // factor


def _check_channels(got: int, in_channels: int, what: str) -> None:
    if got != in_channels:
        raise ValueError(f"{what} encodes {got}-channel images but the data has {in_channels} channels "
                         f"(data.channels={in_channels}); set data.channels={got} or use another first stage")


def build_first_stage(config: Mapping[str, Any] | None, *, image_size: int, in_channels: int,
                      autoencoder: nn.Module | None = None) -> FirstStage | None:
    """The FirstStage a run's `first_stage` config names (None: pixel space). Kinds `ckpt` and `embedded`
    of a difflab autoencoder take it as `autoencoder` (loaded by lit.checkpoint_io.load_first_stage, or
    rebuilt untrained by lit.from_config; an embedded one gets its weights from the checkpoint being loaded)."""
    if not config:
        return None
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"first_stage.kind={kind!r} is not supported; choose one of {KINDS} (or first_stage=null)")
    scale = config.get("scale_factor")
    check_scale_factor(scale)
    posterior = bool(config.get("sample_posterior", True))
    if is_difflab_autoencoder(config):
        if autoencoder is None:
            raise ValueError(f"first_stage.kind={kind!r} needs the difflab autoencoder it names")
        _check_channels(int(autoencoder.in_channels), in_channels, "the first stage")
        if int(autoencoder.image_size) != image_size:
            raise ValueError(f"the first stage was trained on {autoencoder.image_size}x{autoencoder.image_size} images "
                             f"but data.image_size={image_size}; use the same image size")
        shape = tuple(autoencoder.latent_shape)
    else:
        if kind == "diffusers_vae":
            vae = load_diffusers_vae(config.get("path"))
        else:
            vae = _diffusers_autoencoder_class().from_config(dict(config["config"])).eval().requires_grad_(False)
        _check_channels(int(vae.config.in_channels), in_channels, "the diffusers VAE")
        autoencoder, shape = vae, _diffusers_latent_shape(vae, image_size)
        if scale is None and kind == "diffusers_vae":
            scale = float(getattr(vae.config, "scaling_factor", 1.0))  # Stable Diffusion's 0.18215
    if kind == "embedded":
        scale = None  # the stored buffer (state_dict) holds it
    return FirstStage(autoencoder, latent_shape=shape, scale_factor=scale, sample_posterior=posterior)


def is_difflab_autoencoder(config: Mapping[str, Any]) -> bool:
    """Whether a first_stage config names a difflab autoencoder (kind ckpt, or embedded from one)."""
    return config.get("kind") == "ckpt" or (config.get("kind") == "embedded" and config.get("autoencoder") == "difflab")


def describe_first_stage(first_stage: FirstStage, config: Mapping[str, Any]) -> dict[str, Any]:
    """The `first_stage` entry a checkpoint stores: kind `embedded` with the autoencoder's structure, so the
    checkpoint alone rebuilds it (its weights and scale are in the state_dict)."""
    autoencoder = first_stage.autoencoder
    if hasattr(autoencoder, "config") and type(autoencoder).__module__.startswith("diffusers"):
        structure, origin = {k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")}, "diffusers"
        structure = {k: list(v) if isinstance(v, tuple) else v for k, v in structure.items()}
    else:
        structure, origin = dict(getattr(autoencoder, "stored_config")), "difflab"
    return {"kind": "embedded", "autoencoder": origin, "config": structure,
            "sample_posterior": first_stage.sample_posterior, "source": dict(config)}
