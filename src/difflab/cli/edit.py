"""difflab-edit: controllable generation without retraining, from any difflab-train checkpoint.

    difflab-edit ckpt_path=... task=inpaint method=repaint source=digits:0-199 mask=right_half seed=0 out_dir=D

task=inpaint (method=repaint: RePaint's resampling on the model's sampler; method=pc: the score-SDE inpainter),
task=sdedit strength=s, task=colorize (RGB models), task=superres factor=2|4 (method=repaint|pc: a lattice of
known pixels; method=ilvr: low-pass consistent). Writes <stem>.npz (images, sources, masks as NHWC, labels when
known, seeds) and <stem>.png (rows of source | given | result); nothing already written is overwritten.
docs/editing.md has the methods, their options, and measured results.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from difflab.callbacks.sample_grid import grid_image
from difflab.cli.edit_inputs import Plan, build_plan, check_task, load_sources
from difflab.cli.process_setup import hydra_entry_point
from difflab.cli.sample import _task_overrides, choose_sampler, resolve_device, sample_labels, sampler_line
from difflab.cli.sampler_specs import build_sampler
from difflab.data.transforms import to_model_range, to_uint8
from difflab.lit.checkpoint_io import LoadedRun, load_run
from difflab.nets.inference import autocast_dtype
from difflab.samplers.base import Sampler
from difflab.samplers.generate import labels_tensor
from difflab.samplers.inpaint import Inpaint, check_repaint, clamp_to_known

log = logging.getLogger("difflab")
DEFAULT_JR = {"repaint": (5, 5), "pc": (1, 1), "ilvr": (1, 1)}  # (jump_length, resamplings) when not given


def edit_sampler(cfg: DictConfig, run: LoadedRun, method: str) -> Sampler:
    """sampler= when named; for sdedit the run's own sampler (as difflab-sample); else ddpm-<steps> on DDPM models
    and pc-<steps> on score models, with any sampler.<option>= overrides."""
    task = _task_overrides()
    if method == "sdedit" or any(o.split("=")[0].lstrip("+~") == "sampler" for o in task):
        return choose_sampler(cfg, run)
    tweaks = OmegaConf.to_container(OmegaConf.from_dotlist(
        [o.lstrip("+").removeprefix("sampler.") for o in task if o.lstrip("+~").startswith("sampler.")]))
    steps = cfg.steps if cfg.steps is not None else (50 if run.family == "ddpm" else 200)
    name = "ddpm" if run.family == "ddpm" else "pc"
    return build_sampler({"name": name, "steps": int(steps), **tweaks})


def sampler_levels(sampler: Sampler, T: int) -> int:
    """The step count RePaint's schedule runs over (DDPM with steps=null: all T)."""
    steps = getattr(sampler, "steps", None)
    return int(steps) if isinstance(steps, int) else T


def edit_labels(cfg: DictConfig, sources_labels: torch.Tensor | None, n: int) -> list[int] | None:
    """label=source -> the sources' labels; an int or a list -> as difflab-sample; null -> unconditional."""
    if cfg.get("label") == "source":
        if sources_labels is None:
            raise ValueError("label=source but the sources have no labels; give label=<class> or use a labelled source")
        return [int(v) for v in sources_labels]
    return sample_labels(cfg.get("label"), n)


def output_stem(cfg: DictConfig, method: str, sampler: Sampler, n: int, jr: tuple[int, int]) -> str:
    """<task>[-<method>[-j<j>r<r>]]_<mask | s<strength> | grey | x<factor>>_<sampler>_n<N>_seed<seed>[_<precision>]."""
    what = {"sdedit": f"s{cfg.strength:g}", "colorize": "grey", "superres": f"x{cfg.factor}"}.get(cfg.task)
    what = what or Path(str(cfg.mask)).stem
    resampling = f"-j{jr[0]}r{jr[1]}" if jr[1] > 1 else ""
    task = cfg.task if method == "sdedit" else f"{cfg.task}-{method}{resampling}"
    stem = f"{task}_{what}_{sampler.name}_n{n}_seed{cfg.seed}"
    return stem + (f"_{cfg.precision}" if autocast_dtype(cfg.precision) is not None else "")


def known_error(plan: Plan, images: torch.Tensor) -> float:
    """max |P(result - y)| in uint8 levels: how far the written results are from what was known (0 = exact)."""
    known = plan.edit.known
    residual = known.project(to_model_range(images).double() - known.values.double())
    return float(residual.abs().max()) * 127.5 if residual.numel() else 0.0


def comparison_grid(plan: Plan, images: torch.Tensor, nrow: int | None, grid_max: int) -> np.ndarray:
    """Rows of (source | given | result) triples for the first grid_max images."""
    k = min(grid_max, images.shape[0])
    triples = torch.stack([plan.sources[:k], plan.given[:k], images[:k]], dim=1).flatten(0, 1)  # (3k, C, H, W)
    per_row = nrow or max(1, math.ceil(math.sqrt(k)))
    return grid_image(triples, 3 * per_row)


def run_batches(cfg: DictConfig, run: LoadedRun, sampler: Sampler, plan: Plan,
                labels: list[int] | None) -> torch.Tensor:
    """Edited images uint8 (N, C, H, W), batch by batch; image i uses seed + i for all of its noise."""
    n, out = plan.sources.shape[0], []
    for start in range(0, n, cfg.batch_size):
        stop = min(start + cfg.batch_size, n)
        edit = plan.edit.map(lambda v: v[start:stop])
        x = run.module.sample(sampler, range(cfg.seed + start, cfg.seed + stop), use_ema=cfg.use_ema,
                              labels=None if labels is None else labels[start:stop], precision=cfg.precision,
                              guidance_scale=float(cfg.guidance_scale), edit=edit)
        if isinstance(edit, Inpaint) and run.module.first_stage is None:  # the known part survives the clamp
            x = clamp_to_known(edit.known.map(lambda v: v.to(x.device)), x.double()).float()
        out.append(to_uint8(x).cpu())
        log.info("edited %d / %d with %s", stop, n, sampler.name)
    return torch.cat(out)


def edit(cfg: DictConfig) -> dict[str, Path]:
    """Check everything, then edit every source in batches; write the .npz and the comparison grid."""
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size} must be >= 1")
    autocast_dtype(cfg.precision)
    run = load_run(cfg.ckpt_path, resolve_device(cfg.device))
    data = run.config["data"]
    channels, size = int(data["channels"]), int(data["image_size"])
    method = check_task(cfg.task, cfg.get("method"), family=run.family, channels=channels,
                        latent=run.module.first_stage is not None, factor=cfg.factor)
    sampler = edit_sampler(cfg, run, method)
    run.module.check_sampler(sampler)  # a distilled student: its native sampler only
    jr = (cfg.jump_length or DEFAULT_JR.get(method, (1, 1))[0], cfg.resamplings or DEFAULT_JR.get(method, (1, 1))[1])
    if method != "sdedit":
        check_repaint(sampler_levels(sampler, run.module.schedule.T), *jr)
    sources = load_sources(cfg.source, channels=channels, size=size)
    plan = build_plan(cfg.task, method, sources.images, channels=channels, size=size, mask=str(cfg.mask),
                      mask_seed=cfg.seed if cfg.mask_seed is None else cfg.mask_seed, strength=cfg.strength,
                      factor=cfg.factor, jr=jr)
    n = plan.sources.shape[0]
    labels = edit_labels(cfg, sources.labels, n)
    labels_tensor(labels, n, run.module.num_classes, torch.device("cpu"), for_classifier=False)  # all, now
    out_dir = Path(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    stem = output_stem(cfg, method, sampler, n, jr)
    paths = {"npz": out_dir / f"{stem}.npz", "png": out_dir / f"{stem}.png"}
    for p in paths.values():
        if p.exists():
            raise FileExistsError(f"{p} exists; difflab-edit overwrites nothing: choose another out_dir or seed")
    print(sampler_line(sampler, run.module.schedule.T,
                       guided=labels is not None and float(cfg.guidance_scale) not in (0.0, 1.0)))
    images = run_batches(cfg, run, sampler, plan, labels)
    write_outputs(paths, cfg, images, plan, labels if labels is not None else sources.labels)
    return paths


def write_outputs(paths: dict[str, Path], cfg: DictConfig, images: torch.Tensor, plan: Plan,
                  labels: Sequence[int] | torch.Tensor | None) -> None:
    """<stem>.npz (images first, then sources, masks, labels when known, seeds; NHWC) and the comparison grid."""
    paths["npz"].parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {} if labels is None else {"labels": np.asarray(labels)}
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez(paths["npz"], images=nhwc(images), sources=nhwc(plan.sources), masks=nhwc(plan.masks),
             **extra, seeds=np.arange(cfg.seed, cfg.seed + images.shape[0]))
    Image.fromarray(comparison_grid(plan, images, cfg.nrow, cfg.grid_max)).save(paths["png"])
    if isinstance(plan.edit, Inpaint):
        print(f"known-region max error: {known_error(plan, images):.3g} uint8 levels")
    for kind, p in paths.items():
        print(f"{kind}: {p}")


main = hydra_entry_point("edit", edit)


if __name__ == "__main__":
    main()
