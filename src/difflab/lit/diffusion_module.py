"""The LightningModule that trains an eps/x0/v-predicting network under a discrete noise schedule."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.diffusion.objectives import SimpleLoss, UniformTimesteps
from difflab.diffusion.process import randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.lit import resume
from difflab.samplers.base import Callback, Sampler

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


class DiffusionModule(pl.LightningModule):
    """Orchestrates net + schedule + objective + EMA + optimizer; holds no formulas itself."""

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: Tensor,
        optimizer: OptimizerFactory,
        objective: SimpleLoss | None = None,
        timestep_sampler: UniformTimesteps | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0")
        self.net = net
        self.ema = AveragedModel(net, multi_avg_fn=EMADecay(ema_decay, warmup=ema_warmup), use_buffers=True)
        self.ema.requires_grad_(False)
        self._schedule = NoiseSchedule.from_betas(betas)
        self.objective = objective or SimpleLoss()
        self.timestep_sampler = timestep_sampler or UniformTimesteps()
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        self.ema_decay = ema_decay
        self._net_fn = torch.compile(net) if compile else net
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI
        self._resumed_rng: list[dict] | None = None  # per-rank RNG states of the checkpoint being resumed

    @property
    def parameterization(self) -> str:
        return self.objective.parameterization

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise-schedule table on this module's device (moved once, then cached)."""
        if self._schedule.device != self.device:
            self._schedule = self._schedule.to(self.device)
        return self._schedule

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample weighted objective (B,) for a clean batch x0 in [-1, 1]."""
        t, weights = self.timestep_sampler.sample(
            x0.shape[0], T=self.schedule.T, device=x0.device, generator=generator
        )
        eps = randn_like(x0, generator)
        return self.objective(self._net_fn, x0, t, eps, self.schedule) * weights

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0]).mean()
        if not resume.all_ranks_true(bool(torch.isfinite(loss))):  # every rank stops at the same step
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step}, batch {batch_idx} "
                f"(epoch {self.current_epoch}; loss {loss.item()} on rank {self.global_rank}): stopped "
                "before the optimizer step, so weights, EMA and checkpoints already written are untouched"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # fixed noise and timesteps per batch so val/loss is comparable across evaluations
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(batch[0], generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # once per optimizer step (not per accumulated batch), and before callbacks' on_train_batch_end,
        # so a grid or evaluation labelled step N uses the EMA that checkpoint step N holds
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        warmup = self.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            resume.seed_rank(seed, self.global_rank, self.trainer.world_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {
            "config": self.run_config, "parameterization": self.parameterization,
            "rng": resume.gather_rng_states(),  # one entry per rank (a collective: every rank saves)
            "timestep_sampler": self.timestep_sampler.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("difflab") or {}
        resume.check_state_dict_fits(
            self.state_dict(), checkpoint["state_dict"], source=f"checkpoint {getattr(self._trainer, 'ckpt_path', None)}",
            produced_by=(stored.get("config") or {}).get("model"),
            expected_config=(self.run_config or {}).get("model"),
        )
        self.timestep_sampler.load_state_dict(stored.get("timestep_sampler", {}))
        self._resumed_rng = stored.get("rng")

    def on_train_start(self) -> None:
        # restored last, so nothing between loading and the first batch consumes the streams
        states, self._resumed_rng = self._resumed_rng, None
        if states and len(states) == self.trainer.world_size:
            resume.set_rng_state(states[self.global_rank])
        elif states:
            rank_zero_warn(f"resuming on {self.trainer.world_size} processes a checkpoint written by "
                           f"{len(states)}: RNG streams are re-seeded, so the resume is not bitwise exact")
            resume.seed_rank(int(os.environ.get("PL_GLOBAL_SEED", 0)) + self.global_step,
                             self.global_rank, self.trainer.world_size)

    @torch.inference_mode()
    def sample(
        self,
        sampler: Sampler,
        seeds: Sequence[int],
        *,
        use_ema: bool = True,
        callback: Callback = None,
    ) -> Tensor:
        """Images in [-1, 1], (len(seeds), C, H, W); sample i draws all its noise from seed seeds[i]."""
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        shape = (net.in_channels, net.image_size, net.image_size)
        x_T = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        try:
            return sampler(
                net, x_T, self.schedule, parameterization=self.parameterization,
                generator=generators, callback=callback,
            )
        finally:
            net.train(was_training)
