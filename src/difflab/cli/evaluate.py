"""difflab-eval: FID/IS/KID/PR per sampler and bits/dim of a checkpoint, sharded over torchrun ranks."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from difflab.callbacks.evaluation import check_guidance_scales, evaluate_samplers, format_table, write_results
from difflab.cli.config import config_dir, to_container
from difflab.cli.process_setup import setup_process
from difflab.cli.metrics import build_metrics
from difflab.cli.sample import resolve_device
from difflab.lit.checkpoint_io import load_run
from difflab.data.transforms import to_model_range
from difflab.diffusion.likelihood import bits_per_dim
from difflab.diffusion.ode_likelihood import ode_bits_per_dim
from difflab.diffusion.schedules import NoiseSchedule
from difflab.metrics.reference import ReferenceKey, load_or_compute
from difflab.samplers import DDIM, DDPM
from difflab.samplers.base import Sampler
from difflab.nets.inference import autocast_dtype
from difflab.samplers.specs import FAST_SPEC, FAST_SPECS_HELP, parse_fast_sampler

log = logging.getLogger("difflab")
SAMPLER_SPEC = re.compile(r"^(ddpm(-(\d+))?(-large)?|ddim-(\d+)(-eta([0-9.]+))?)$")


def parse_sampler(spec: str) -> Sampler:
    """'ddpm[-<S>][-large]' | 'ddim-<S>' | 'ddim-<S>-eta<e>' | a fast-solver spec (heun-<N>, dpmpp-<N>, ...) -> a sampler
    (ddpm: the model's learned variance if any, else beta_tilde)."""
    m = SAMPLER_SPEC.match(spec)
    if not m and FAST_SPEC.match(spec):
        return parse_fast_sampler(spec)
    if not m:
        raise ValueError(f"sampler {spec!r} is not understood; use ddpm, ddpm-large, ddpm-<steps> (respaced), "
                         f"ddim-<steps>, ddim-<steps>-eta<eta> or {FAST_SPECS_HELP}")
    if spec.startswith("ddpm"):
        return DDPM(variance="fixed_large" if m.group(4) else "auto", steps=int(m.group(3)) if m.group(3) else None)
    return DDIM(steps=int(m.group(5)), eta=float(m.group(7) or 0.0))


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    return dist.get_rank(), world, device


def broadcast(value: Any, world: int) -> Any:
    """Rank zero's value on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reference_stats(cfg: DictConfig, datamodule, extractor, dataset: str, rank: int, world: int):
    """Cached reference statistics of un-augmented real images; rank zero computes, the others read."""
    n = datamodule.num_images(cfg.reference.split)
    n = n if cfg.reference.num_images is None else min(n, cfg.reference.num_images)
    key = ReferenceKey(dataset=dataset, split=cfg.reference.split, resolution=datamodule.image_size,
                       num_images=n, extractor=extractor.name)
    batches = lambda: datamodule.uint8_batches(cfg.reference.split, limit=n)  # noqa: E731
    cache = Path(cfg.paths.cache_dir) / "reference"
    stats = load_or_compute(key, batches, extractor, cache) if rank == 0 else None
    if world > 1:
        dist.barrier()
    return stats if rank == 0 else load_or_compute(key, batches, extractor, cache)


def heldout_bpd(cfg: DictConfig, module, datamodule, device: torch.device) -> dict[str, float] | None:
    """Mean bits/dim (L_T + sum L_{t-1} + L_0) over bpd.num_images val images (rank zero only)."""
    if cfg.bpd.num_images <= 0:
        return None
    method = bpd_method(cfg.bpd.get("method", "auto"), module)
    if method == "ode":
        return heldout_ode_bpd(cfg, module, datamodule, device)
    log_var = module.log_variance()  # the learned Sigma head, or the fixed beta_tilde table
    totals, n = [], 0
    for images in datamodule.uint8_batches("val", batch_size=cfg.bpd.batch_size, limit=cfg.bpd.num_images):
        x0 = to_model_range(images).to(device)
        gens = [torch.Generator(device=device).manual_seed(cfg.seed + n + i) for i in range(x0.shape[0])]
        out = bits_per_dim(module.ema.module if cfg.use_ema else module.net, x0, module.schedule,
                           parameterization=module.parameterization, log_variance=log_var, generator=gens)
        totals.append(out["total_bpd"].cpu())
        n += x0.shape[0]
    total = torch.cat(totals)
    return {"bpd": float(total.mean()), "bpd_stderr": float(total.std() / max(1, len(total)) ** 0.5), "bpd_images": n}


BPD_METHODS = ("auto", "vlb", "ode")


def bpd_method(method: str, module) -> str:
    """'auto' -> the DDPM bound ('vlb') for discrete DDPM models, the PF-ODE ('ode') for score models."""
    if method not in BPD_METHODS:
        raise ValueError(f"bpd.method={method!r} is not supported; choose one of {BPD_METHODS}")
    discrete = isinstance(module.schedule, NoiseSchedule)
    if method == "vlb" and not discrete:
        raise ValueError("bpd.method=vlb needs a discrete-time DDPM model; use bpd.method=ode for score models")
    return method if method != "auto" else ("vlb" if discrete else "ode")


def heldout_ode_bpd(cfg: DictConfig, module, datamodule, device: torch.device) -> dict[str, float]:
    """Mean bits/dim through the PF-ODE (Hutchinson trace, uniform dequantisation) over bpd.num_images val images."""
    totals, nfes, n = [], [], 0
    net = module.ema.module if cfg.use_ema else module.net
    for images in datamodule.uint8_batches("val", batch_size=cfg.bpd.batch_size, limit=cfg.bpd.num_images):
        images = images.to(device)
        gens = [torch.Generator(device=device).manual_seed(cfg.seed + n + i) for i in range(images.shape[0])]
        bpd, nfe = ode_bits_per_dim(net, module.schedule, images, prediction=module.parameterization,
                                    rtol=cfg.bpd.get("rtol", 1e-5), atol=cfg.bpd.get("atol", 1e-5), generator=gens)
        totals.append(bpd.cpu())
        nfes.append(nfe)
        n += images.shape[0]
    total = torch.cat(totals)
    return {"bpd": float(total.mean()), "bpd_stderr": float(total.std() / max(1, len(total)) ** 0.5),
            "bpd_images": n, "bpd_method": "pf-ode", "bpd_nfe": float(sum(nfes) / len(nfes))}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate everything, then score every sampler; rank zero writes metrics.json and the NFE table."""
    samplers = {spec: parse_sampler(spec) for spec in cfg.samplers}
    autocast_dtype(cfg.precision)  # a bad name fails before anything loads
    if cfg.num_samples < 2 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size}: need num_samples >= 2, batch_size >= 1")
    rank, world, device = init_distributed(cfg.device)
    run = load_run(cfg.ckpt_path, device)
    run_cfg, module = OmegaConf.create(run.config), run.module
    for s in samplers.values():
        module.check_sampler(s)
    guidance_scales = list(cfg.get("guidance_scales") or []) or None
    check_guidance_scales(guidance_scales, module.num_classes)
    dataset = run_cfg.data_name
    metrics = build_metrics(extractor=cfg.metrics.extractor, dataset=dataset, image_size=run_cfg.data.image_size,
                            cache_dir=cfg.paths.cache_dir, metrics=list(cfg.metrics.names),
                            weights_path=cfg.metrics.weights_path, classifier_ckpt=cfg.metrics.classifier_ckpt).to(device)
    datamodule = hydra.utils.instantiate(run_cfg.data)
    metrics.set_reference(reference_stats(cfg, datamodule, metrics.extractor, dataset, rank, world))
    rows = evaluate_samplers(module, samplers, metrics, T=module.schedule.T, num_samples=cfg.num_samples,
                             batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, use_ema=cfg.use_ema,
                             guidance_scales=guidance_scales, num_classes=module.num_classes, precision=cfg.precision)
    out_dir = broadcast(str(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir), world)
    result = {"results": rows, "world_size": world}
    if rank == 0:
        result["likelihood"] = heldout_bpd(cfg, module, datamodule, device)
        extra = {"checkpoint": str(Path(cfg.ckpt_path).resolve()), "dataset": dataset,
                 "likelihood": result["likelihood"], "eval_config": to_container(cfg), "world_size": world}
        paths = write_results(rows, Path(out_dir), "metrics", extra)
        print(format_table(rows))
        if result["likelihood"]:
            print(f"bits/dim: {result['likelihood']['bpd']:.4f} ± {result['likelihood']['bpd_stderr']:.4f} "
                  f"({result['likelihood']['bpd_images']} held-out images)")
        for kind, p in paths.items():
            print(f"{kind}: {p}")
    if world > 1:
        dist.barrier()
    return result


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_process()
    evaluate(cfg)


if __name__ == "__main__":
    main()
