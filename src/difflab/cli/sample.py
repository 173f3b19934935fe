"""difflab-sample: draw images from a checkpoint; writes a PNG grid and an .npz of uint8 NHWC images."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from difflab.callbacks.sample_grid import grid_image
from difflab.cli.process_setup import hydra_entry_point
from difflab.data.transforms import to_uint8
from difflab.lit import DiffusionModule
from difflab.lit.base import check_clip_schedule
from difflab.lit.checkpoint_io import LoadedRun, load_classifier, load_clip, load_run
from difflab.lit.from_config import sampler_from_config
from difflab.nets.inference import autocast_dtype
from difflab.samplers.base import Sampler
from difflab.samplers.families import default_sampler_name
from difflab.samplers.generate import Guidance, check_clip_fits, labels_tensor, prompt_list

log = logging.getLogger("difflab")


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


def sample_prompts(cfg: DictConfig, num_samples: int) -> list[str] | None:
    """prompt="..." -> that prompt for every sample; prompts_file=F -> each non-empty line of F, num_samples times each."""
    prompt, path = cfg.get("prompt"), cfg.get("prompts_file")
    if prompt is not None and path:
        raise ValueError(f"give prompt= or prompts_file=, not both (prompt={prompt!r}, prompts_file={path!r})")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r} must be a text in quotes, e.g. prompt=\"a pair of trousers\"")
        return [prompt] * num_samples
    if not path:
        return None
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ValueError(f"prompts_file={str(path)!r} is not a file; give a text file with one prompt a line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts_file={str(path)!r} holds no prompt; write one prompt a line")
    return [line for line in lines for _ in range(num_samples)]


GUIDANCE_KINDS = (None, "clip")


def clip_requested(cfg: DictConfig) -> bool:
    """guidance=clip (with clip_ckpt_path and a prompt); guidance=null refuses a clip_ckpt_path given without it."""
    kind = cfg.get("guidance")
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"guidance={kind!r} is not allowed; choose null or clip (classifier-free guidance is "
                         "guidance_scale=, classifier guidance classifier_ckpt= with classifier_scale=)")
    if kind is None:
        if cfg.get("clip_ckpt_path"):
            raise ValueError(f"clip_ckpt_path={cfg.clip_ckpt_path!r} is set but guidance=null; add guidance=clip "
                             "(and prompt=\"...\") for CLIP guidance")
        return False
    if not cfg.get("clip_ckpt_path"):
        raise ValueError("guidance=clip needs clip_ckpt_path=<a mini_clip checkpoint> (difflab-train experiment=digits_clip "
                         "writes one)")
    if cfg.get("prompt") is None and not cfg.get("prompts_file"):
        raise ValueError("guidance=clip needs prompt=\"...\" (or prompts_file=): CLIP guidance steers towards a text")
    return True


def check_text_request(cfg: DictConfig, module: Any, prompts: list[str] | None, labels: list[int] | None) -> None:
    """A text model needs a prompt and takes no label; other models take a prompt only for CLIP guidance (checked
    before sampling)."""
    is_text = getattr(getattr(module, "net", None), "text_encoder", None) is not None
    clip = clip_requested(cfg)
    if is_text and labels is not None:
        raise ValueError(f"label={cfg.get('label')!r} was given but ckpt_path={cfg.ckpt_path!r} is a text-to-image model: "
                         "condition it with prompt=\"...\" (or prompts_file=), not label=")
    if is_text and prompts is None:
        raise ValueError(f"ckpt_path={cfg.ckpt_path!r} is a text-to-image model: give prompt=\"...\" (e.g. "
                         "prompt=\"a pair of trousers\") or prompts_file=<one prompt a line>")
    if cfg.get("negative_prompt") is not None and (prompts is None or not is_text):
        raise ValueError(f"negative_prompt={cfg.negative_prompt!r} needs prompt= or prompts_file= on a text-to-image model")
    if prompts is not None and not is_text and not clip:
        raise ValueError(f"prompt={_first_prompt(prompts)!r} was given but ckpt_path={cfg.ckpt_path!r} does not read text "
                         "(it is class-conditional or unconditional); steer it with CLIP guidance (guidance=clip "
                         "clip_ckpt_path=<a mini_clip checkpoint>), use label= on a class-conditional model, or train a "
                         "text model (experiment=digits_t2i|fashion_t2i)")
    if prompts is not None:
        prompt_list(prompts, len(prompts), is_text=is_text or clip, has_labels=labels is not None and is_text)


def _first_prompt(prompts: list[str]) -> str:
    return prompts[0] if prompts else ""


def prompt_tag(cfg: DictConfig, prompts: list[str]) -> str:
    """A file-name part naming the prompt (its words, at most 40 characters) or the prompts file (name + hash)."""
    if cfg.get("prompt") is not None:
        words = re.sub(r"[^a-z0-9]+", "-", str(cfg.prompt).lower()).strip("-")[:40] or "prompt"
        return f"_p-{words}"
    digest = hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:8]
    return f"_prompts-{Path(str(cfg.prompts_file)).stem}-{digest}"


def guidance_kwargs(cfg: DictConfig, module: DiffusionModule, device: torch.device) -> dict[str, Any]:
    """guidance_scale and (with classifier_ckpt) the noise-aware classifier for module.sample (checked by Guidance)."""
    guidance = Guidance(scale=float(cfg.get("guidance_scale", 1.0)), classifier_scale=float(cfg.get("classifier_scale", 0.0)))
    out: dict[str, Any] = {"guidance_scale": guidance.scale}
    if cfg.get("classifier_ckpt"):
        if cfg.get("label") is None:
            raise ValueError("classifier_ckpt is set but label is null; classifier guidance steers towards label=<class>")
        out["classifier"] = load_classifier(cfg.classifier_ckpt, kind="noisy_classifier", T=module.schedule.T).to(device)
        out["classifier_scale"] = guidance.classifier_scale
    if cfg.get("guidance") == "clip":  # the CLIP read, and checked against the model, before any sampling
        scale = Guidance(clip_scale=float(cfg.get("clip_guidance_scale", 0.0))).clip_scale
        clip = load_clip(cfg.clip_ckpt_path, device=device)
        check_clip_fits(clip, module.net, latent=getattr(module, "first_stage", None) is not None)
        check_clip_schedule(clip, (module.run_config or {}).get("schedule"))
        out |= {"clip": clip, "clip_scale": scale}
    return out


def sample_stem(cfg: DictConfig, name: str, kwargs: dict[str, Any]) -> str:
    """File stem naming the sampler, count, seed, any label / guidance settings and a reduced precision."""
    stem = f"{name}_n{cfg.num_samples}_seed{cfg.seed}"
    label = cfg.get("label")
    if kwargs.get("labels") is not None:
        stem += f"_label{label if isinstance(label, int) else 'list'}_w{kwargs['guidance_scale']:g}"
    if kwargs.get("prompts") is not None:
        stem += f"{prompt_tag(cfg, kwargs['prompts'])}_w{kwargs['guidance_scale']:g}"
        if cfg.get("negative_prompt"):
            stem += "_neg"
    if kwargs.get("classifier") is not None:
        stem += f"_s{kwargs['classifier_scale']:g}"
    if kwargs.get("clip") is not None:
        stem += f"_clip{kwargs['clip_scale']:g}"
    if autocast_dtype(cfg.precision) is not None:  # reduced-precision samples never overwrite float32 ones
        stem += f"_{cfg.precision}"
    return stem


def sampler_line(sampler: Sampler, T: int, *, guided: bool = False) -> str:
    """'sampler: ddim-4 (DDIM, 4 steps, spacing=trailing), NFE 4 per image': what every sampling command prints first."""
    steps = getattr(sampler, "steps", None)
    extra = ", ".join(f"{k}={getattr(sampler, k)}" for k in ("spacing", "eta") if getattr(sampler, k, None) not in (None, 0.0))
    what = ", ".join(p for p in (type(sampler).__name__, None if steps is None else f"{steps} steps", extra) if p)
    nfe = sampler.nfe(T) * (2 if guided else 1)
    return f"sampler: {sampler.name} ({what}), NFE {nfe} per image{' (guided: 2 calls a step)' if guided else ''}"


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def choose_sampler(cfg: DictConfig, run: LoadedRun) -> Sampler:
    """The sampler named on the command line (sampler=...); else the one the run was configured with
    (its config's `sampler`); else its family's default (conf/sampler/<default>.yaml). sampler.<option>=
    overrides apply to whichever is chosen."""
    task = _task_overrides()
    if any(o.split("=")[0].lstrip("+~") == "sampler" for o in task):
        return hydra.utils.instantiate(cfg.sampler)
    tweaks = [o.lstrip("+") for o in task if o.lstrip("+~").startswith("sampler.")]
    stored, source = run.config.get("sampler"), "the run's configured sampler"
    if stored is None:
        name = default_sampler_name(run.family)
        stored, source = OmegaConf.to_container(hydra.compose("sample", [f"sampler={name}"]).sampler), \
            f"sampler={name}, the default for a {run.family} model"
    node = OmegaConf.create(stored)
    for tweak in tweaks:
        key = tweak.split("=")[0].removeprefix("sampler.")
        if key.split(".")[0] not in node:
            raise ValueError(f"{tweak!r}: {key!r} is not an option of {source} ({node._target_}); "
                             f"its options: {sorted(k for k in node if k != '_target_')}")
    node = OmegaConf.merge(node, OmegaConf.from_dotlist([t.removeprefix("sampler.") for t in tweaks]))
    log.info("no sampler named: using %s%s", source, f" with {tweaks}" if tweaks else "")
    return sampler_from_config(OmegaConf.to_container(node), source=f"ckpt_path={cfg.ckpt_path!r}")


def sample(cfg: DictConfig) -> dict[str, Path]:
    """Validate everything, then stream batches of samples into one uint8 array; return written paths."""
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size} must be >= 1")
    autocast_dtype(cfg.precision)  # a bad name fails before the checkpoint loads
    labels = sample_labels(cfg.get("label"), cfg.num_samples)
    prompts = sample_prompts(cfg, cfg.num_samples)
    num_samples = cfg.num_samples if prompts is None else len(prompts)
    device = resolve_device(cfg.device)
    run = load_run(cfg.ckpt_path, device)
    module = run.module
    check_text_request(cfg, module, prompts, labels)
    sampler = choose_sampler(cfg, run)
    module.check_sampler(sampler)  # a distilled student accepts only its native sampler and steps
    kwargs = guidance_kwargs(cfg, module, device)
    print(sampler_line(sampler, module.schedule.T, guided=labels is not None and kwargs["guidance_scale"] not in (0, 1)))
    # every label checked now, not when its batch comes
    labels_tensor(labels, cfg.num_samples, module.num_classes, device, for_classifier="classifier" in kwargs)
    out_dir = Path(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = {} if prompts is None else {"negative_prompt": cfg.get("negative_prompt")}
    batches = []
    for start in range(0, num_samples, cfg.batch_size):
        seeds = range(cfg.seed + start, cfg.seed + min(start + cfg.batch_size, num_samples))
        batch_labels = None if labels is None else labels[start : start + len(seeds)]
        if prompts is not None:
            text["prompts"] = prompts[start : start + len(seeds)]
        x = module.sample(sampler, seeds, use_ema=cfg.use_ema, labels=batch_labels, precision=cfg.precision,
                          **text, **kwargs)
        batches.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, C)
        log.info("sampled %d / %d with %s", start + len(seeds), num_samples, sampler.name)
    images = np.concatenate(batches)
    stem = sample_stem(cfg, sampler.name, {"labels": labels, "prompts": prompts, **kwargs})
    paths = {"npz": out_dir / f"{stem}.npz", "png": out_dir / f"{stem}.png"}
    extra = {} if labels is None else {"labels": np.asarray(labels)}
    if prompts is not None:  # the prompt of every image (and the negative prompt, if any)
        extra["prompts"] = np.asarray(prompts, dtype=str)
        if cfg.get("negative_prompt"):
            extra["negative_prompt"] = np.asarray(str(cfg.negative_prompt))
    np.savez(paths["npz"], images=images, seeds=np.arange(cfg.seed, cfg.seed + num_samples), **extra)
    grid = grid_image(torch.from_numpy(images[: cfg.grid_max]).permute(0, 3, 1, 2), cfg.nrow)
    Image.fromarray(grid).save(paths["png"])
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


main = hydra_entry_point("sample", sample)


if __name__ == "__main__":
    main()
