"""difflab-eval: FID/IS/KID/PR per sampler and bits/dim of a checkpoint, sharded over torchrun ranks.

`samplers=[...]` speaks the `sampler=` config group's language (difflab.cli.sampler_specs): a
conf/sampler name, a compact spec such as ddim-50, or a mapping {name: ddim, steps: 20, spacing: trailing}.
The scoring itself is the metrics room's evaluation engine, the one the training callback uses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from difflab.cli.config import config_path, to_container
from difflab.cli.export import posthoc_reconstructions, posthoc_rows
from difflab.cli.feature_classifier import ensure_feature_classifier
from difflab.cli.process_setup import setup_process
from difflab.cli.sample import resolve_device
from difflab.cli.sampler_specs import build_samplers
from difflab.data.transforms import to_model_range
from difflab.diffusion.likelihood import bits_per_dim
from difflab.diffusion.ode_likelihood import ode_bits_per_dim
from difflab.diffusion.schedules import NoiseSchedule
from difflab.lit.base import check_clip_schedule
from difflab.lit.checkpoint_io import LoadedRun, load_classifier, load_clip, load_run
from difflab.lit.from_config import sampler_from_config
from difflab.lit.posthoc_ema import apply_to
from difflab.metrics.build import build_metrics
from difflab.metrics.clip_score import HFCLIPScorer, MiniCLIPScorer
from difflab.metrics.distillation_report import joint_table, plot_models_vs_nfe
from difflab.metrics.evaluation import check_guidance_scales, evaluate_samplers
from difflab.metrics.reference import shared_class_references, shared_reference
from difflab.metrics.reports import METRIC_KEYS, format_table, write_results
from difflab.nets.inference import autocast_dtype
from difflab.samplers.generate import Guidance, check_clip_fits

log = logging.getLogger("difflab")


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


BPD_METHODS = ("auto", "vlb", "ode")


def bpd_method(method: str, module) -> str:
    """'auto' -> the DDPM bound ('vlb') for discrete DDPM models, the PF-ODE ('ode') for score models."""
    if method not in BPD_METHODS:
        raise ValueError(f"bpd.method={method!r} is not supported; choose one of {BPD_METHODS}")
    discrete = isinstance(module.schedule, NoiseSchedule)
    if method == "vlb" and not discrete:
        raise ValueError("bpd.method=vlb needs a discrete-time DDPM model; use bpd.method=ode for score models")
    return method if method != "auto" else ("vlb" if discrete else "ode")


def heldout_bpd(cfg: DictConfig, module, datamodule, device: torch.device) -> dict[str, float] | None:
    """Mean bits/dim over bpd.num_images val images (rank zero only), by bpd.method: the DDPM bound
    (L_T + sum L_{t-1} + L_0, 'vlb') or the PF-ODE (Hutchinson trace, uniform dequantisation, 'ode')."""
    if cfg.bpd.num_images <= 0:
        return None
    if getattr(module, "first_stage", None) is not None:  # a bound on latents says nothing of pixel likelihood
        log.warning("bits/dim skipped: this is a latent diffusion model, whose likelihood bound is over the first "
                    "stage's latents, not pixels (not comparable with pixel-space bits/dim); set bpd.num_images=0")
        return None
    method = bpd_method(cfg.bpd.get("method", "auto"), module)
    net = module.ema.module if cfg.use_ema else module.net
    if method == "vlb":
        log_var = module.log_variance()  # the learned Sigma head, or the fixed beta_tilde table

        def batch_bpd(images: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, int | None]:
            out = bits_per_dim(net, to_model_range(images), module.schedule, parameterization=module.parameterization,
                               log_variance=log_var, generator=gens)
            return out["total_bpd"], None
    else:
        def batch_bpd(images: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, int | None]:
            return ode_bits_per_dim(net, module.schedule, images, prediction=module.parameterization,
                                    rtol=cfg.bpd.get("rtol", 1e-5), atol=cfg.bpd.get("atol", 1e-5), generator=gens)
    totals, nfes, n = [], [], 0
    for images in datamodule.uint8_batches("val", batch_size=cfg.bpd.batch_size, limit=cfg.bpd.num_images):
        images = images.to(device)
        gens = [torch.Generator(device=device).manual_seed(cfg.seed + n + i) for i in range(images.shape[0])]
        bpd, nfe = batch_bpd(images, gens)
        totals.append(bpd.cpu())
        nfes.append(nfe)
        n += images.shape[0]
    total = torch.cat(totals)
    out = {"bpd": float(total.mean()), "bpd_stderr": float(total.std() / max(1, len(total)) ** 0.5), "bpd_images": n}
    if method == "ode":
        out |= {"bpd_method": "pf-ode", "bpd_nfe": float(sum(nfes) / len(nfes))}
    return out


PROMPT_SETS = ("train", "heldout")


def check_prompt_sets(names: Any) -> list[str]:
    """prompts=[train, heldout]: the phrasing sets that score a text model (training and held-out templates)."""
    names = list(names) if names is not None else list(PROMPT_SETS)
    bad = [n for n in names if n not in PROMPT_SETS]
    if bad or not names:
        raise ValueError(f"prompts={names} is not allowed: choose one or both of {list(PROMPT_SETS)}")
    return names


def clip_settings(cfg: DictConfig, module: Any, run_cfg: DictConfig) -> tuple[Any, list[float] | None]:
    """(the mini_clip of clip_ckpt_path or None, the CLIP guidance scales or None), checked against the model before
    any sampling: guidance needs a pixel-space DDPM model of the CLIP's image size, channels and schedule."""
    scales = cfg.get("clip_guidance_scales")
    scales = None if scales is None else [Guidance(clip_scale=float(s)).clip_scale for s in scales]
    if scales is not None and not scales:
        raise ValueError("clip_guidance_scales=[] is empty; give scales such as [0,50,100], or null")
    if cfg.get("clip_ckpt_path") and cfg.get("clip_path"):
        raise ValueError(f"give clip_ckpt_path (a mini_clip) or clip_path (a local CLIP folder) for the CLIP score, not "
                         f"both (clip_ckpt_path={cfg.clip_ckpt_path!r}, clip_path={cfg.clip_path!r})")
    if not cfg.get("clip_ckpt_path"):
        if scales is not None:
            raise ValueError(f"clip_guidance_scales={scales} needs clip_ckpt_path=<a mini_clip checkpoint> (CLIP guidance "
                             "uses its noise-aware image tower)")
        return None, None
    clip = load_clip(cfg.clip_ckpt_path)
    check_clip_fits(clip, module.net, latent=getattr(module, "first_stage", None) is not None)
    if scales is not None:
        if not isinstance(module.schedule, NoiseSchedule):
            raise ValueError("clip_guidance_scales needs a DDPM model (mini_clip reads timestep indices); this is a score model")
        check_clip_schedule(clip, OmegaConf.to_container(run_cfg.schedule) if run_cfg.get("schedule") else None)
    return clip, scales


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate everything, then score every sampler; rank zero writes metrics.json and the NFE table."""
    samplers = build_samplers(cfg.samplers)
    autocast_dtype(cfg.precision)  # a bad name fails before anything loads
    if cfg.num_samples < 2 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size}: need num_samples >= 2, batch_size >= 1")
    guidance_scales = [Guidance(scale=float(w)).scale for w in cfg.get("guidance_scales") or []] or None
    if (cfg.get("ema") or {}).get("sigma_rel") is not None and not cfg.use_ema:
        raise ValueError("ema.sigma_rel reconstructs EMA weights, but use_ema=false evaluates the raw weights; "
                         "set use_ema=true or ema.sigma_rel=null")
    # post-hoc EMA: ema.sigma_rel=[...] reconstructs each from the run's snapshots (else [None]: the stored EMA)
    ckpt_path, reconstructions = posthoc_reconstructions(cfg.ckpt_path, cfg.get("ema"))
    # on the CPU first: a missing feature classifier is trained before any process group exists
    run = load_run(ckpt_path)
    module, run_cfg = run.module, OmegaConf.create(run.config)
    if not _samplers_named():
        samplers = default_samplers(run, samplers, source=f"ckpt_path={str(ckpt_path)!r}")
    for s in samplers.values():
        module.check_sampler(s)
    students = load_students(cfg.get("students") or [], run_cfg)  # checked before any sampling
    text_model = bool(getattr(module, "is_text_model", False))
    if not text_model:
        check_guidance_scales(guidance_scales, module.num_classes)
    phrasings = check_prompt_sets(cfg.get("prompts"))
    clip, clip_scales = clip_settings(cfg, module, run_cfg)  # CLIP score and CLIP guidance
    if cfg.bpd.num_images > 0:
        bpd_method(cfg.bpd.get("method", "auto"), module)
    dataset, image_size = run_cfg.data_name, run_cfg.data.image_size
    ensure_feature_classifier(extractor=cfg.metrics.extractor, dataset=dataset, image_size=image_size,
                              cache_dir=cfg.paths.cache_dir, classifier_ckpt=cfg.metrics.classifier_ckpt,
                              data_dir=cfg.paths.get("data_dir"))
    rank, world, device = init_distributed(cfg.device)
    module.to(device)
    metrics = build_metrics(extractor=cfg.metrics.extractor, dataset=dataset, image_size=image_size,
                            cache_dir=cfg.paths.cache_dir, metrics=list(cfg.metrics.names),
                            weights_path=cfg.metrics.weights_path, classifier_ckpt=cfg.metrics.classifier_ckpt,
                            classifier_loader=load_classifier).to(device)
    datamodule = hydra.utils.instantiate(run_cfg.data)
    metrics.set_reference(shared_reference(
        datamodule, metrics.extractor, dataset=dataset, split=cfg.reference.split,
        cache_dir=Path(cfg.paths.cache_dir) / "reference", num_images=cfg.reference.num_images,
        is_rank_zero=rank == 0, barrier=dist.barrier if world > 1 else None,
    ))
    prompt_sets = None
    if text_model or clip_scales is not None:  # scored by class prompts: accuracy and FID per class, training vs held-out phrasings
        all_sets = datamodule.class_prompt_sets()
        if all_sets is None:
            raise ValueError(f"this model's data ({dataset}) has no class captions to score prompts by; difflab-eval "
                             "scores text models and CLIP guidance on digits, mnist and fashion_mnist")
        prompt_sets = {name: all_sets[name] for name in phrasings}
        if "fid" in cfg.metrics.names and cfg.get("class_fid", True):
            metrics.set_class_references(shared_class_references(
                datamodule, metrics.extractor, dataset=dataset, split=cfg.reference.split,
                cache_dir=Path(cfg.paths.cache_dir) / "reference", is_rank_zero=rank == 0,
                barrier=dist.barrier if world > 1 else None))
    if prompt_sets is not None and (clip is not None or cfg.get("clip_path")):  # CLIP score of every prompted image
        metrics.set_clip_scorer((MiniCLIPScorer(clip) if clip is not None else HFCLIPScorer(cfg.clip_path)).to(device))
    rows, likelihoods = [], []
    for rec in reconstructions:  # the same seeds, reference statistics and held-out data for every sigma_rel
        if rec is not None:
            apply_to(module, rec, source=f"the EMA snapshots of {ckpt_path!r}")
        rows += posthoc_rows(evaluate_samplers(
            module, samplers, metrics, T=module.schedule.T, num_samples=cfg.num_samples, batch_size=cfg.batch_size,
            seed=cfg.seed, rank=rank, world_size=world, use_ema=cfg.use_ema, guidance_scales=guidance_scales,
            num_classes=module.num_classes, precision=cfg.precision, prompt_sets=prompt_sets,
            clip=None if clip is None else clip.to(device), clip_scales=clip_scales), rec)
        bpd_here = rank == 0 and (rec is None or bool(cfg.ema.get("bpd", False)))  # per sigma_rel: opt-in (T calls each)
        likelihoods.append(heldout_bpd(cfg, module, datamodule, device) if bpd_here else None)
    if students:  # the same seeds, reference statistics and metrics for every student, at its native steps
        rows = [{"model": "teacher", **r} for r in rows]
        for student in students:
            rows += student_rows(student, metrics, cfg, rank=rank, world=world, device=device,
                                 guidance_scales=guidance_scales)
    out_dir = broadcast(str(cfg.out_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir), world)
    result = {"results": rows, "world_size": world}
    if rank == 0:
        posthoc = reconstructions[0] is not None
        result["likelihood"] = {f"{r.sigma_rel:g}": lk for r, lk in zip(reconstructions, likelihoods)} \
            if posthoc and likelihoods[0] else likelihoods[0]
        extra = {"checkpoint": str(Path(ckpt_path).resolve()), "dataset": dataset,
                 "likelihood": result["likelihood"], "eval_config": to_container(cfg), "world_size": world}
        if posthoc:
            extra["posthoc_ema"] = [r.info() for r in reconstructions]
        paths = write_results(rows, Path(out_dir), "metrics", extra)
        print(format_table(rows))
        if students:  # the teacher-vs-students table and plot (FID / IS / P / R vs NFE, distillation cost)
            paths["students"] = Path(out_dir) / "teacher_vs_students_vs_nfe.png"
            plot_models_vs_nfe(rows, paths["students"])
            print(joint_table(rows))
        for tag, lk in ((result["likelihood"] or {}).items() if posthoc else [("", result["likelihood"])]):
            if lk:
                print(f"{'sigma_rel=' + tag + ': ' if tag else ''}bits/dim: {lk['bpd']:.4f} ± {lk['bpd_stderr']:.4f} "
                      f"({lk['bpd_images']} held-out images)")
        for kind, p in paths.items():
            print(f"{kind}: {p}")
    if world > 1:
        dist.barrier()
    return result


def default_samplers(run: LoadedRun, listed: dict[str, Any], *, source: str) -> dict[str, Any]:
    """The samplers scored when samplers= is not on the command line: a distilled student's native ones, else the
    sampler its run was configured with (the run config's `sampler`, as difflab-sample picks it), else `listed`
    (conf/eval.yaml's samplers)."""
    if hasattr(run.module, "native_samplers"):  # a student: its own samplers and steps
        return {s.name: s for s in run.module.native_samplers()}
    configured = run.config.get("sampler")
    if configured:
        sampler = sampler_from_config(configured, source=source)
        log.info("no samplers named: scoring the run's configured sampler %s", sampler.name)
        return {sampler.name: sampler}
    return listed


def _samplers_named() -> bool:
    """Whether this command named samplers= (else default_samplers chooses them)."""
    from hydra.core.hydra_config import HydraConfig

    task = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return any(o.split("=")[0].lstrip("+~") == "samplers" for o in task)


def load_students(paths: list[str], teacher_cfg: DictConfig) -> list[LoadedRun]:
    """students=[...]: distilled students' checkpoints (experiment=digits_distill | digits_consistency) on the
    teacher's data, each refused by name otherwise, before any sampling."""
    out = []
    for i, path in enumerate(paths):
        student = load_run(path, name=f"students[{i}]")
        if not hasattr(student.module, "native_samplers"):
            raise ValueError(f"students[{i}]={str(path)!r} is not a distilled student (module="
                             f"{student.config.get('module', {}).get('_target_')}); list checkpoints of "
                             "experiment=digits_distill or digits_consistency runs")
        data = student.config.get("data") or {}
        if (student.config.get("data_name"), data.get("image_size")) != (teacher_cfg.data_name, teacher_cfg.data.image_size):
            raise ValueError(f"students[{i}]={str(path)!r} was distilled on data={student.config.get('data_name')} "
                             f"({data.get('image_size')} px), the checkpoint is a {teacher_cfg.data_name} model "
                             f"({teacher_cfg.data.image_size} px); compare students of this teacher")
        out.append(student)
    return out


def student_rows(student: LoadedRun, metrics, cfg: DictConfig, *, rank: int, world: int, device: torch.device,
                 guidance_scales: list[float] | None) -> list[dict[str, Any]]:
    """A student's rows at its native samplers, labelled with its method, checkpoint and distillation seconds."""
    module = student.module.to(device)
    info = (student.checkpoint.contents.get("difflab") or {}).get("distillation") or {}
    rows = evaluate_samplers(
        module, {s.name: s for s in module.native_samplers()}, metrics, T=module.schedule.T,
        num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
        use_ema=cfg.use_ema, guidance_scales=guidance_scales if module.num_classes else None,
        num_classes=module.num_classes, precision=cfg.precision)
    return [{"model": module.method, **r, "distill_seconds": info.get("seconds"),
             "student_checkpoint": str(student.checkpoint.path)} for r in rows]


def optimized_value(rows: list[dict[str, Any]], name: str | None) -> float | None:
    """rows[0][name] for a sweeper (hparams_search=posthoc_ema minimises fid over ema.sigma_rel); None when name is None."""
    if name is None:
        return None
    if name not in rows[0]:
        raise ValueError(f"optimized_metric={name!r} is not a column of the results; available: "
                         f"{sorted(k for k, v in rows[0].items() if isinstance(v, (int, float)))}")
    return float(rows[0][name])


@hydra.main(config_path=config_path(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Evaluate; returns optimized_metric of the first result row to a Hydra sweeper."""
    setup_process()
    name = cfg.get("optimized_metric")
    if name is not None and name not in METRIC_KEYS:  # before any work
        raise ValueError(f"optimized_metric={name!r} is not a metric difflab-eval reports; choose one of {METRIC_KEYS}")
    return optimized_value(evaluate(cfg)["results"], name)


if __name__ == "__main__":
    main()
