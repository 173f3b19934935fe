"""What every difflab LightningModule shares: net + EMA + optimizer, exact resume, fail-fast checks.

DiffusionModule (discrete DDPM) and ScoreModule (NCSN, score SDEs) differ only in their objective,
their noise family and how they sample; EMA, the optimizer and LR warm-up, per-rank RNG streams,
the non-finite-loss stop and the checkpoint's `difflab` section live here once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.sde import NoiseFamily
from difflab.lit import resume
from difflab.lit.power_ema import EMAKind, PowerEMA, check_ema_kind, check_resume_kind, check_sigma_rels
from difflab.nets.first_stage import FirstStage, latent_moments
from difflab.samplers.base import Callback, Sampler
from difflab.samplers.edit import Edit
from difflab.samplers.families import check_sampler_fits
from difflab.samplers.generate import Guidance, generate

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class EMADecay:
    """Multi-tensor EMA update for AveragedModel with decay min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up is that of TensorFlow's ExponentialMovingAverage(num_updates); without it a short
    run's EMA stays close to the random initialisation. A class (not a closure) so modules pickle
    for ddp_spawn.
    """

    def __init__(self, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        decay = torch.as_tensor(self.decay, device=num_averaged.device)
        if self.warmup:
            n = num_averaged.to(torch.float64)
            decay = torch.minimum(decay.to(torch.float64), (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, (1 - decay).to(ema[0].dtype))
        else:  # integer buffers (e.g. counters) are copied, not averaged
            torch._foreach_copy_(ema, current)


def check_latent_shape(net: nn.Module, latent_shape: tuple[int, int, int]) -> None:
    """The network must take the first stage's latents: in_channels = C and image_size = h = w."""
    c, h, w = latent_shape
    got = (getattr(net, "in_channels", c), getattr(net, "image_size", h))
    if got != (c, h) or h != w:
        raise ValueError(f"the first stage encodes images to latents of shape {latent_shape} (C, h, w), but the "
                         f"network takes in_channels={got[0]}, image_size={got[1]}; leave model.in_channels and "
                         "model.image_size to the first stage (difflab-train derives them)")


def latent_sampler(sampler: Sampler) -> Sampler:
    """The sampler as a latent model runs it: x0 is not clipped to [-1, 1] (latents are unbounded, unit
    variance under scale_by_std; the decoded pixels are clipped on output); dynamic thresholding, a pixel-space
    rule (Saharia et al. 2022), is refused by name."""
    if getattr(sampler, "dynamic_percentile", None) is not None:
        raise ValueError(f"sampler.dynamic_percentile={sampler.dynamic_percentile} thresholds pixel values; this is a "
                         "latent diffusion model, whose x0 is a latent: set sampler.dynamic_percentile=null")
    if getattr(sampler, "clip_x0", False):
        return dataclasses.replace(sampler, clip_x0=False)
    return sampler


def check_clip_schedule(clip: nn.Module, schedule: dict[str, Any] | None) -> None:
    """A noise-aware CLIP reads x_t at its training schedule's noise levels: refuse a model trained on another one."""
    stored = getattr(clip, "stored_config", None) or {}
    theirs = stored.get("schedule")
    if schedule is None or theirs is None:
        return
    if dict(theirs) != dict(schedule):
        raise ValueError(f"clip_ckpt_path={stored.get('path')!r} was trained on the schedule {dict(theirs)}, the model on "
                         f"{dict(schedule)}; train the mini_clip with the model's schedule (schedule=... schedule.T=...)")


class TrainingModule(pl.LightningModule):
    """Net, its EMA copy, optimizer + linear LR warm-up, exact resume; subclasses add objective and sampling."""

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: OptimizerFactory,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        compile: bool = False,
        first_stage: FirstStage | None = None,
        ema: EMAKind = "constant",
        ema_sigma_rels: Sequence[float] = (0.05, 0.10),
    ) -> None:
        super().__init__()
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0")
        self.net = net
        self.ema = AveragedModel(net, multi_avg_fn=EMADecay(ema_decay, warmup=ema_warmup), use_buffers=True)
        self.ema.requires_grad_(False)
        # module.ema=power: EDM2's power-function profiles as well (lit/power_ema.py), for post-hoc EMA
        self.ema_kind, sigma_rels = check_ema_kind(ema), check_sigma_rels(ema_sigma_rels)
        self.power_ema = PowerEMA(net, sigma_rels) if ema == "power" else None
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        self.ema_decay = ema_decay
        if compile:  # in place: state_dict keys stay net.*; the EMA copy (made above) samples eagerly
            net.compile()
        # latent diffusion: the frozen autoencoder (its weights and latent scale travel in the checkpoint)
        self.first_stage = first_stage
        self.cached_latents = False  # training batches are cached posterior moments (first_stage.cache_latents)
        if first_stage is not None:
            check_latent_shape(net, first_stage.latent_shape)
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI
        self._resumed_rng: list[dict] | None = None  # per-rank RNG states of the checkpoint being resumed

    # -- training ---------------------------------------------------------------------------------

    def check_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Raise on a non-finite loss, on every rank at the same step. Reading it is a host sync, free on
        CPU; on accelerators it is done every log_every_n_steps steps only (a diverged run stays
        non-finite, so it is still caught, at most that many steps late)."""
        every = 1 if loss.device.type == "cpu" or self._trainer is None else max(1, self.trainer.log_every_n_steps)
        if self.global_step % every == 0 and not resume.all_ranks_true(bool(torch.isfinite(loss))):
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step}, batch {batch_idx} "
                f"(epoch {self.current_epoch}; loss {loss.item()} on rank {self.global_rank}): stopped "
                "before the optimizer step, so weights, EMA and checkpoints already written are untouched"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # once per optimizer step (not per accumulated batch), and before callbacks' on_train_batch_end,
        # so a grid or evaluation labelled step N uses the EMA that checkpoint step N holds
        self.ema.update_parameters(self.net)
        if self.power_ema is not None:
            self.power_ema.update(self.net)

    def ema_snapshot(self) -> dict[str, Any] | None:
        """The power-function EMA profiles now, as a weights_only-loadable dict (callbacks.EMASnapshots writes it);
        None with module.ema=constant."""
        if self.power_ema is None:
            return None
        return self.power_ema.snapshot(step=self.global_step, model_config=(self.run_config or {}).get("model"))

    def to_latent(self, x: Tensor) -> Tensor:
        """What the diffusion model is trained on: x itself, or z = s * E(x) for a latent diffusion model
        (from cached posterior moments when training batches hold them)."""
        if self.first_stage is None:
            return x
        return self.first_stage.encode_moments(x) if self.cached_latents else self.first_stage.encode(x)

    def to_latent_fixed(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """to_latent with the posterior sample drawn from `generator` (validation: comparable across evaluations)."""
        return x if self.first_stage is None else self.first_stage.encode(x, generator)

    def _scale_by_std(self, x: Tensor) -> None:
        """Set the first stage's latent scale to 1 / std of the latents of this batch, over all ranks (LDM's
        scale_by_std, once, at the first training batch of a run whose scale is not fixed)."""
        unscaled = self.first_stage.unscaled_from_moments(x) if self.cached_latents else self.first_stage.encode_unscaled(x)
        count, total, total_sq = latent_moments(unscaled)
        stats = torch.stack([count, total, total_sq])
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        scale = self.first_stage.set_scale_from(*stats)
        self.print(f"scale_by_std: first_stage.scale_factor = {scale:.6g}")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.first_stage is not None and not self.first_stage.scale_known:
            self._scale_by_std(batch[0])
        # the step loggers write is Lightning's _batches_that_stepped, which after a resume Lightning 2.6
        # restores one off or not depending on where the checkpoint was taken; it counts optimizer
        # steps, as global_step does (one optimizer), so it is set from global_step before each batch
        loop = self.trainer.fit_loop.epoch_loop
        if getattr(loop, "_batches_that_stepped", None) is not None:
            loop._batches_that_stepped = self.trainer.global_step

    def configure_optimizers(self):
        # a frozen text encoder inside the net (text_encoder=clip) is not optimised
        optimizer = self.optimizer_factory(params=[p for p in self.net.parameters() if p.requires_grad])
        warmup = self.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            resume.seed_rank(seed, self.global_rank, self.trainer.world_size)

    # -- checkpoints --------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """What a subclass stores in checkpoint["difflab"] besides config and RNG states."""
        return {"parameterization": self.parameterization}

    def load_checkpoint_state(self, stored: dict[str, Any]) -> None:
        """Restore what checkpoint_state() stored (called after the architecture check)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {
            "config": self.run_config,
            "kind": "diffusion",  # what difflab-train wrote (lit/checkpoint_io.py reads it back)
            "rng": resume.gather_rng_states(),  # one entry per rank (a collective: every rank saves)
            **self.checkpoint_state(),
        }
        if self._trainer is not None:  # the rows logged so far reach disk with the checkpoint (a kill loses none)
            for logger in self.trainer.loggers:
                logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("difflab") or {}
        check_resume_kind(self.ema_kind, checkpoint["state_dict"],
                          source=f"checkpoint {getattr(self._trainer, 'ckpt_path', None)}")
        resume.check_state_dict_fits(
            self.state_dict(), checkpoint["state_dict"], source=f"checkpoint {getattr(self._trainer, 'ckpt_path', None)}",
            produced_by=(stored.get("config") or {}).get("model"),
            expected_config=(self.run_config or {}).get("model"),
        )
        self.load_checkpoint_state(stored)
        self._resumed_rng = stored.get("rng")

    def on_train_start(self) -> None:
        # restored last, so nothing between loading and the first batch consumes the streams
        states, self._resumed_rng = self._resumed_rng, None
        resume.restore_rng_streams(states, rank=self.global_rank, world_size=self.trainer.world_size,
                                   step=self.global_step)

    # -- sampling -------------------------------------------------------------------------------------

    @property
    def parameterization(self) -> str:
        raise NotImplementedError

    @property
    def schedule(self) -> NoiseSchedule | NoiseFamily:
        """The noise schedule (DDPM) or family (score models) the net was trained under."""
        raise NotImplementedError

    @property
    def model_variance(self) -> str:
        """'fixed', or what a learned-variance net's extra output channels mean ('learned', 'learned_range')."""
        return "fixed"

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional net (its null label is num_classes), else None."""
        return getattr(self.net, "num_classes", None)

    def check_sampler(self, sampler: Sampler) -> None:
        """Refuse a sampler that cannot run on this model (callbacks call it before training starts)."""
        check_sampler_fits(sampler, self.schedule, self.model_variance)
        if getattr(sampler, "needs_consistency_model", False) and not hasattr(self, "sample_steps"):
            raise ValueError(f"sampler {sampler.name!r} needs a consistency model (difflab-train experiment=digits_consistency "
                             "teacher.ckpt_path=...); this checkpoint is a diffusion model: use ddim, heun, dpmpp or ddpm")
        if self.first_stage is not None:
            latent_sampler(sampler)

    def sample(
        self,
        sampler: Sampler,
        seeds: Sequence[int],
        *,
        use_ema: bool = True,
        callback: Callback = None,
        labels: Sequence[int] | Tensor | None = None,
        prompts: Sequence[str] | str | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float = 1.0,
        classifier: nn.Module | None = None,
        classifier_scale: float = 0.0,
        clip: nn.Module | None = None,
        clip_scale: float = 0.0,
        precision: str | int | None = None,
        edit: Edit | None = None,
    ) -> Tensor:
        """Images in [-1, 1], (len(seeds), C, H, W), through generate() (samplers/generate.py) with the EMA or raw net.

        labels condition a class-conditional net with classifier-free scale w = guidance_scale, or steer
        the noise-aware `classifier` with scale classifier_scale; prompts (and negative_prompt) condition a
        text-to-image net the same way; `clip` (lit.checkpoint_io.load_clip) steers towards the prompts with scale
        clip_scale (CLIP guidance, GLIDE Sec. 3.2), on this model's schedule only. The net runs in eval mode and gets its
        train/eval mode back whatever happens, a refused call included. `edit` (samplers/edit.py: Inpaint,
        SDEdit) conditions on known pixels, one pixel-space image per seed (a latent model encodes them).
        """
        self.check_sampler(sampler)  # a distilled student accepts only its native samplers
        guidance = Guidance(scale=guidance_scale, classifier=classifier, classifier_scale=classifier_scale, clip=clip,
                            clip_scale=clip_scale)
        if clip is not None:
            check_clip_schedule(clip, (self.run_config or {}).get("schedule"))
        if classifier is not None and self.first_stage is not None:
            raise ValueError("classifier guidance needs a noise-aware classifier of this model's latents; difflab's "
                             "are trained on pixels: use classifier-free guidance (guidance_scale) on a latent model")
        if self.first_stage is not None:
            sampler = latent_sampler(sampler)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            return generate(net, self.schedule, sampler, seeds, parameterization=self.parameterization,
                            model_variance=self.model_variance, labels=labels, prompts=prompts,
                            negative_prompt=negative_prompt, guidance=guidance,
                            precision=precision, callback=callback,
                            decoder=None if self.first_stage is None else self.first_stage.decode,
                            edit=edit, encoder=None if self.first_stage is None else self.first_stage.encode)
        finally:
            net.train(was_training)
