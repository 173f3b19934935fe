"""difflab-sample: draw images from a checkpoint; writes a PNG grid and an .npz of uint8 NHWC images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from difflab.callbacks.sample_grid import grid_image
from difflab.cli.trainer_setup import build_module
from difflab.cli.config import config_dir
from difflab.cli.process_setup import setup_process
from difflab.data.transforms import to_uint8
from difflab.lit import DiffusionModule, ScoreModule
from difflab.lit.checkpoint_io import CorruptCheckpointError, UnsafeCheckpointError, safe_load
from difflab.lit.resume import check_state_dict_fits
from difflab.samplers.ddpm import DDPM, resolve_variance
from difflab.samplers.families import check_sampler_fits, default_sampler_name
from difflab.nets.inference import autocast_dtype

log = logging.getLogger("difflab")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a difflab checkpoint safely (weights_only: no pickled code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist or is not a file")
    try:
        ckpt = safe_load(path, map_location="cpu")
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the reason
        raise ValueError(f"ckpt_path={str(path)!r} is not a readable difflab checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or not (ckpt.get("difflab") or {}).get("config"):
        raise ValueError(f"ckpt_path={str(path)!r} holds no difflab run config; was it written by difflab-train?")
    return ckpt


def module_from_checkpoint(path: str | Path, device: torch.device) -> DiffusionModule | ScoreModule:
    """Rebuild the run's module from the config stored in the checkpoint and load its weights."""
    ckpt = load_checkpoint(path)
    config = ckpt["difflab"]["config"]
    module = build_module(OmegaConf.create(config))
    check_state_dict_fits(module.state_dict(), ckpt["state_dict"], source=f"ckpt_path={str(path)!r}",
                          produced_by=config.get("model"))
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return device


def sample_labels(label: Any, num_samples: int) -> list[int] | None:
    """label=null -> None; an int -> that class for every sample; a list -> cycled over the samples."""
    if label is None:
        return None
    values = list(label) if isinstance(label, (list, tuple)) or OmegaConf.is_list(label) else [label]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"label={label!r} must be null, an int class index, or a non-empty list of them")
    return [values[i % len(values)] for i in range(num_samples)]


def guidance_kwargs(cfg: DictConfig, module: DiffusionModule, device: torch.device) -> dict[str, Any]:
    """labels, guidance_scale and (with classifier_ckpt) the noise-aware classifier for module.sample."""
    labels = sample_labels(cfg.get("label"), cfg.num_samples)
    scale, cls_scale = float(cfg.get("guidance_scale", 1.0)), float(cfg.get("classifier_scale", 0.0))
    if labels is not None and module.num_classes is not None:
        bad = [y for y in labels if not 0 <= y < module.num_classes]
        if bad:
            raise ValueError(f"label={bad[0]} is outside 0..{module.num_classes - 1} (the model's num_classes={module.num_classes})")
    if labels is not None and module.num_classes is None and not cfg.get("classifier_ckpt"):
        raise ValueError("label was given but this checkpoint is unconditional (model.num_classes=null); "
                         "train with model.num_classes=auto (e.g. experiment=digits_cfg) or pass classifier_ckpt=")
    if scale < 0 or cls_scale < 0:
        raise ValueError(f"guidance_scale={scale} and classifier_scale={cls_scale} must be >= 0")
    out: dict[str, Any] = {"labels": labels, "guidance_scale": scale}
    if cfg.get("classifier_ckpt"):
        from difflab.cli.classifier_io import load_noisy_classifier

        if labels is None:
            raise ValueError("classifier_ckpt is set but label is null; classifier guidance steers towards label=<class>")
        out["classifier"] = load_noisy_classifier(cfg.classifier_ckpt, module.schedule.T).to(device)
        out["classifier_scale"] = cls_scale
    return out


def sample_stem(cfg: DictConfig, name: str, kwargs: dict[str, Any]) -> str:
    """File stem naming the sampler, count, seed, any label / guidance settings and a reduced precision."""
    stem = f"{name}_n{cfg.num_samples}_seed{cfg.seed}"
    label = cfg.get("label")
    if kwargs.get("labels") is not None:
        stem += f"_label{label if isinstance(label, int) else 'list'}_w{kwargs['guidance_scale']:g}"
    if kwargs.get("classifier") is not None:
        stem += f"_s{kwargs['classifier_scale']:g}"
    if autocast_dtype(cfg.precision) is not None:  # reduced-precision samples never overwrite float32 ones
        stem += f"_{cfg.precision}"
    return stem


def checkpoint_family(path: str | Path) -> str:
    """The model family a checkpoint remembers ('ddpm' for checkpoints written before families existed)."""
    return load_checkpoint(path)["difflab"].get("family", "ddpm")


def choose_sampler(cfg: DictConfig, family: str):
    """The sampler named on the command line, else the family's default (conf/sampler/<default>.yaml)."""
    task = hydra.core.hydra_config.HydraConfig.get().overrides.task if hydra.core.hydra_config.HydraConfig.initialized() else []
    named = any(o.split("=")[0].lstrip("+~") == "sampler" for o in task)
    default = default_sampler_name(family)
    if named or default == "ddim":
        return hydra.utils.instantiate(cfg.sampler)
    tweaks = [o for o in task if o.lstrip("+~").startswith("sampler.")]
    if tweaks:
        raise ValueError(f"{tweaks} set sampler options without naming a sampler; this {family!r} checkpoint "
                         f"samples with sampler={default} by default: add sampler={default} (or another valid sampler)")
    log.info("no sampler named: using sampler=%s, the default for a %s model", default, family)
    return hydra.utils.instantiate(OmegaConf.load(Path(config_dir()) / "sampler" / f"{default}.yaml"))


def sample(cfg: DictConfig) -> dict[str, Path]:
    """Validate everything, then stream batches of samples into one uint8 array; return written paths."""
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size} must be >= 1")
    autocast_dtype(cfg.precision)  # a bad name fails before the checkpoint loads
    sampler = choose_sampler(cfg, checkpoint_family(cfg.ckpt_path))
    device = resolve_device(cfg.device)
    module = module_from_checkpoint(cfg.ckpt_path, device)
    check_sampler_fits(sampler, module.schedule)
    sampler.validate(module.schedule.T)
    if isinstance(sampler, DDPM):  # a learned-variance setting on a fixed-variance model fails here, not mid-run
        resolve_variance(sampler.variance, getattr(module, "model_variance", "fixed"))
    kwargs = guidance_kwargs(cfg, module, device)
    labels = kwargs.pop("labels")
    out_dir = Path(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = []
    for start in range(0, cfg.num_samples, cfg.batch_size):
        seeds = range(cfg.seed + start, cfg.seed + min(start + cfg.batch_size, cfg.num_samples))
        batch_labels = None if labels is None else labels[start : start + len(seeds)]
        x = module.sample(sampler, seeds, use_ema=cfg.use_ema, labels=batch_labels, precision=cfg.precision, **kwargs)
        batches.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, C)
        log.info("sampled %d / %d with %s", start + len(seeds), cfg.num_samples, sampler.name)
    images = np.concatenate(batches)
    stem = sample_stem(cfg, sampler.name, {"labels": labels, **kwargs})
    paths = {"npz": out_dir / f"{stem}.npz", "png": out_dir / f"{stem}.png"}
    extra = {} if labels is None else {"labels": np.asarray(labels)}
    np.savez(paths["npz"], images=images, seeds=np.arange(cfg.seed, cfg.seed + cfg.num_samples), **extra)
    grid = grid_image(torch.from_numpy(images[: cfg.grid_max]).permute(0, 3, 1, 2), cfg.nrow)
    Image.fromarray(grid).save(paths["png"])
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


@hydra.main(config_path=config_dir(), config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_process()
    sample(cfg)


if __name__ == "__main__":
    main()
