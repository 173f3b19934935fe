"""The LightningModule of score-based models: NCSN and continuous-time VP / sub-VP / VE SDEs."""

from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.diffusion.process import randn_like
from difflab.diffusion.score_objectives import DenoisingScoreMatching, Weighting, sample_times
from difflab.diffusion.sde import NoiseFamily
from difflab.lit.diffusion_module import EMADecay, OptimizerFactory
from difflab.samplers.base import Callback, Sampler
from difflab.samplers.families import check_sampler_fits


class ScoreModule(pl.LightningModule):
    """Orchestrates net + noise family (SDE or NCSN levels) + DSM objective + EMA + optimizer; no formulas here."""

    def __init__(
        self,
        *,
        net: nn.Module,
        sde: NoiseFamily,
        optimizer: OptimizerFactory,
        weighting: Weighting = "sigma2",
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0")
        self.net, self.sde = net, sde
        self.ema = AveragedModel(net, multi_avg_fn=EMADecay(ema_decay, warmup=ema_warmup), use_buffers=True)
        self.ema.requires_grad_(False)
        self.objective = DenoisingScoreMatching(weighting=weighting)
        self._net_fn = torch.compile(net) if compile else net
        self.optimizer_factory, self.lr_warmup_steps, self.ema_decay = optimizer, lr_warmup_steps, ema_decay
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI

    @property
    def parameterization(self) -> str:
        return self.objective.parameterization

    @property
    def family(self) -> str:
        """'ncsn', 'vp', 'subvp' or 've': stored in checkpoints so difflab-sample picks a valid sampler."""
        return self.sde.name

    @property
    def schedule(self) -> NoiseFamily:
        """The noise family; `.T` is its level count (NCSN) or 1000 (continuous), for step-count checks."""
        return self.sde

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample DSM loss (B,) for a clean batch x0 in [-1, 1]."""
        t = sample_times(self.sde, x0.shape[0], device=x0.device, generator=generator)
        return self.objective(self._net_fn, x0, t, randn_like(x0, generator), self.sde)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at global step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(batch[0], generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.net)

    def setup(self, stage: str) -> None:
        """Refuse samplers of callbacks that cannot run on this family, before training starts."""
        trainer = self._trainer
        for cb in trainer.callbacks if trainer is not None else []:
            for sampler in getattr(cb, "samplers", {}).values():
                check_sampler_fits(sampler, self.sde)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        warmup = self.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["difflab"] = {"config": self.run_config, "parameterization": self.parameterization,
                                 "family": self.family}

    @torch.inference_mode()
    def sample(self, sampler: Sampler, seeds: Sequence[int], *, use_ema: bool = True,
               callback: Callback = None) -> Tensor:
        """Images in [-1, 1], (len(seeds), C, H, W); sample i draws all its noise from seed seeds[i]."""
        check_sampler_fits(sampler, self.sde)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        shape = (net.in_channels, net.image_size, net.image_size)
        x_T = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])
        try:
            return sampler(net, x_T, self.sde, parameterization=self.parameterization,
                           generator=generators, callback=callback)
        finally:
            net.train(was_training)
