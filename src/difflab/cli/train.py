"""difflab-train: train a diffusion model from the Hydra config tree (conf/train.yaml)."""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from typing import Mapping

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities import rank_zero_only

from difflab.cli.trainer_setup import build_trainer

from difflab.lit.from_config import build_module, first_stage_from_config, with_latent_model
from difflab.cli.cluster import slurm_job_id
from difflab.lit.checkpoint_io import (check_resume_fits, checkpoint_step, load_clip_text_encoder, load_first_stage,
                                      newest_checkpoint, remove_stale_temporaries)
from difflab.lit.distillation import attach_teacher
from difflab.lit.first_stage import describe_first_stage
from difflab.lit.loggers import continue_loggers
from difflab.cli.config import config_path, to_container
from difflab.cli.feature_classifier import callback_metrics_configs, ensure_callback_classifiers
from difflab.cli.latent_cache import load_or_build_cache
from difflab.cli.process_setup import setup_process
from difflab.cli.runs import run_status

log = logging.getLogger("difflab")


def train(cfg: DictConfig, status: dict | None = None) -> dict[str, float]:
    """Build everything (failing fast on bad input), fit, and return the final callback metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    first_stage = first_stage_from_config(cfg, load_first_stage)  # latent diffusion: the frozen autoencoder
    cfg = with_latent_model(cfg, first_stage)  # model.in_channels / image_size from its latent shape
    module = build_module(cfg, first_stage=first_stage, load_clip_text=load_clip_text_encoder)
    module.run_config = to_container(cfg)
    text_encoder = getattr(getattr(module, "net", None), "text_encoder", None)
    if getattr(text_encoder, "stored_config", None):  # text_encoder=mini_clip: its tower's structure travels along
        module.run_config["text_encoder"] = text_encoder.stored_config
    if first_stage is not None:  # its structure travels in the checkpoint (weights and scale: the state_dict)
        module.run_config["first_stage"] = describe_first_stage(first_stage, module.run_config["first_stage"])
        if cfg.first_stage.get("cache_latents"):  # encode the training split once; train on its moments
            device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") \
                else "cpu"
            datamodule.use_train_latents(load_or_build_cache(
                first_stage, datamodule, data_name=str(cfg.data_name), cache_dir=cfg.paths.cache_dir,
                cache_path=cfg.first_stage.get("cache_path"), device=device))
            module.cached_latents = True
    # distillation: the teacher's weights into the student (refused by name unless both fit)
    attach_teacher(module, (cfg.get("teacher") or {}).get("ckpt_path"), module.run_config)
    prepare_feature_classifier(cfg)  # trained on first use, before the evaluation callback is built
    ckpt_path, resume_step = resume_point(cfg.ckpt_path, Path(cfg.paths.output_dir))
    if ckpt_path is not None and Path(ckpt_path).is_file():
        check_resume_fits(ckpt_path, kind=getattr(module, "checkpoint_kind", "diffusion"),
                          latent=getattr(module, "first_stage", None) is not None)
    trainer = build_trainer(cfg)
    refuse_relaunch_in_multirun(trainer)
    try:
        continue_loggers(trainer.loggers, resume_step)  # a resumed run appends to its logs
        for logger in trainer.loggers:
            logger.log_hyperparams(module.run_config)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:  # also when a job of a sweep fails: the next job must start its own W&B run
        _finish_wandb(trainer)
        if status is not None:
            status["global_step"] = final_step(trainer, Path(cfg.paths.output_dir))
    if trainer.is_global_zero:
        _report(Path(cfg.paths.output_dir))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def resume_point(ckpt_path: str | None, run_dir: Path) -> tuple[str | None, int | None]:
    """(checkpoint to resume from, its global step). "last": the run directory's newest checkpoint
    (checkpoints/last.ckpt, periodic step-*.ckpt, best-*.ckpt or a preemption's hpc_ckpt_*.ckpt, by
    global step); null: none, except inside a SLURM batch job (a requeued job), where it is "last"."""
    for directory in (run_dir, run_dir / "checkpoints"):  # what saves killed mid-write left behind
        if directory.is_dir():
            remove_stale_temporaries(directory)
    if ckpt_path is None and slurm_job_id() is None:
        return None, None
    if ckpt_path in (None, "last"):
        found = newest_checkpoint(run_dir)
        if found is None:
            if ckpt_path == "last":
                log.warning("ckpt_path=last: %s holds no checkpoint yet; training starts from step 0", run_dir)
            return None, None
        log.info("resuming from %s (global step %d)", found[0], found[1])
        return str(found[0]), found[1]
    if ckpt_path in ("hpc", "registry") or "://" in str(ckpt_path) or not Path(ckpt_path).is_file():
        return str(ckpt_path), None  # Lightning's own names, remote files; a missing file: Lightning's error
    try:
        return str(ckpt_path), checkpoint_step(ckpt_path)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        return str(ckpt_path), None  # the resume itself refuses it by name (lit.checkpoint_io.safe_load)


def prepare_feature_classifier(cfg: DictConfig) -> None:
    """Train the default feature classifier of every callback whose metrics need it (evaluation, rFID) when it is
    missing (difflab.cli.feature_classifier); a bad trainer or callback setting still reports itself first."""
    ensure_callback_classifiers(cfg, before_training=lambda: check_trainer_builds(cfg))


def check_trainer_builds(cfg: DictConfig) -> None:
    """Build the run's Trainer once without the evaluation callback and loggers (nothing is written), so a bad
    trainer.* or callbacks.* setting fails before the one-time classifier training rather than after it."""
    dry = copy.deepcopy(cfg)
    with open_dict(dry):
        dry.logger = None
        if dry.get("callbacks"):
            for name in callback_metrics_configs(dry):  # evaluation, reconstruction_fid: need the classifier
                dry.callbacks[name] = None
    lightning_info = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = lightning_info.level
    lightning_info.setLevel(logging.WARNING)  # the real Trainer says which devices it uses
    try:
        build_trainer(dry)
    finally:
        lightning_info.setLevel(level)


def final_step(trainer: pl.Trainer, run_dir: Path) -> int:
    """The global step training ended at. Under ddp_spawn (start_method=spawn) the parent process gets
    back only weights and callback_metrics, so the step is read from the run's last checkpoint."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    last = run_dir / "checkpoints" / "last.ckpt"
    if trainer.global_step or not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher) \
            or not last.is_file():
        return trainer.global_step
    from difflab.lit.checkpoint_io import safe_load

    return int(safe_load(last).get("global_step", 0))


def refuse_relaunch_in_multirun(trainer: pl.Trainer) -> None:
    """Hydra multirun + a strategy that re-executes sys.argv for ranks >= 1 (trainer=ddp on one node
    without a cluster launcher) would make every child re-run the whole sweep (Lightning #11300,
    hydra #2070): refuse before any work, naming what works instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
        raise ValueError(
            f"Hydra multirun (-m) with trainer.strategy={type(trainer.strategy).__name__} on "
            f"{trainer.num_devices} devices is not supported: Lightning starts ranks >= 1 by re-running the "
            "command line, which re-runs the whole sweep in every rank. Use a launcher that starts one "
            "process per device itself: trainer.strategy.start_method=spawn (ddp_spawn, on one machine), "
            "hydra/launcher=submitit_slurm (tasks_per_node = trainer.devices), or run each configuration as "
            "its own single run (torchrun / difflab-train trainer=ddp ...)"
        )


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run: in a Hydra multirun, runs of later jobs would otherwise merge into the first."""
    from pytorch_lightning.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def _report(run_dir: Path) -> None:
    log.info("run directory: %s", run_dir)
    for sub in ("checkpoints", "samples"):
        for f in sorted((run_dir / sub).glob("*")):
            log.info("  %s", f)


def check_optimized_metric(cfg: DictConfig) -> None:
    """Before training: an eval/* metric needs the evaluation callback."""
    name = cfg.get("optimized_metric")
    if name is not None and str(name).startswith("eval/") and not (cfg.get("callbacks") or {}).get("evaluation"):
        raise ValueError(f"optimized_metric={name!r} needs the evaluation callback, but callbacks.evaluation is null")


def optimized_value(metrics: Mapping[str, float], name: str | None) -> float | None:
    """metrics[name] for a sweeper (None when name is None); a missing name lists what exists."""
    if name is None:
        return None
    if name not in metrics:
        raise ValueError(
            f"optimized_metric={name!r} was not logged by this run; available: {sorted(metrics) or 'none'} "
            "(eval/* come from the evaluation callback, val/* from a validation epoch)"
        )
    return float(metrics[name])


@hydra.main(config_path=config_path(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; <run dir>/status.json records the outcome (read by difflab-report); returns optimized_metric."""
    setup_process()
    with run_status(Path(cfg.paths.output_dir), enabled=rank_zero_only.rank == 0) as status:
        check_optimized_metric(cfg)
        status["metrics"] = metrics = train(cfg, status)
        value = status["optimized_value"] = optimized_value(metrics, cfg.get("optimized_metric"))
        status["optimized_metric"] = cfg.get("optimized_metric")
    return value


if __name__ == "__main__":
    main()
