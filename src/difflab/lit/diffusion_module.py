"""The LightningModule that trains an eps/x0/v-predicting network under a discrete noise schedule."""

from __future__ import annotations

from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.diffusion.objectives import SimpleLoss, UniformTimesteps
from difflab.diffusion.process import randn_like
from difflab.diffusion.schedules import NoiseSchedule
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
        if compile:  # in place: state_dict keys stay net.*; the EMA copy (made above) samples eagerly
            net.compile()
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI

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
        return self.objective(self.net, x0, t, eps, self.schedule) * weights

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0]).mean()
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _check_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Raise on a non-finite loss. Reading it is a host sync, free on CPU; on accelerators it is
        done every log_every_n_steps steps only (a diverged run stays non-finite, so it is still caught)."""
        every = 1 if loss.device.type == "cpu" or self._trainer is None else self.trainer.log_every_n_steps
        if self.global_step % max(1, every) == 0 and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step}, batch {batch_idx}"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # fixed noise and timesteps per batch so val/loss is comparable across evaluations
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(batch[0], generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        warmup = self.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {"config": self.run_config, "parameterization": self.parameterization}

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
