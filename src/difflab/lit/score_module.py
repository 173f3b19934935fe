"""The LightningModule of score-based models: NCSN and continuous-time VP / sub-VP / VE SDEs."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.process import randn_like
from difflab.diffusion.score_objectives import DenoisingScoreMatching, Weighting, sample_times
from difflab.diffusion.sde import NoiseFamily
from difflab.lit.base import OptimizerFactory, TrainingModule
from difflab.samplers.base import Callback, Sampler
from difflab.samplers.families import check_sampler_fits
from difflab.nets.inference import sampling_autocast, sampling_net


class ScoreModule(TrainingModule):
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
        super().__init__(net=net, optimizer=optimizer, lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay,
                         ema_warmup=ema_warmup, compile=compile)
        self.sde = sde
        self.objective = DenoisingScoreMatching(weighting=weighting)

    @property
    def parameterization(self) -> str:
        return self.objective.parameterization

    @property
    def num_classes(self) -> None:
        """Score models here are unconditional."""
        return None

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
        return self.objective(self.net, x0, t, randn_like(x0, generator), self.sde)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0]).mean()
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(batch[0], generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def setup(self, stage: str) -> None:
        """Refuse samplers of callbacks that cannot run on this family, before training starts."""
        super().setup(stage)
        trainer = self._trainer
        for cb in trainer.callbacks if trainer is not None else []:
            for sampler in getattr(cb, "samplers", {}).values():
                check_sampler_fits(sampler, self.sde)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, "family": self.family}

    @torch.inference_mode()
    def sample(self, sampler: Sampler, seeds: Sequence[int], *, use_ema: bool = True, callback: Callback = None,
               labels: Sequence[int] | Tensor | None = None, precision: str | int | None = None,
               **guidance: Any) -> Tensor:
        """Images in [-1, 1], (len(seeds), C, H, W); sample i draws all its noise from seed seeds[i].

        precision bf16-mixed / 16-mixed: autocast, as DiffusionModule.sample; None or 32: the caller's context.
        """
        if labels is not None or guidance.get("classifier") is not None:
            raise ValueError(f"labels / guidance were given but this {self.family!r} score model is unconditional; "
                             "class conditioning and guidance exist for DDPM models (experiment=digits_cfg)")
        check_sampler_fits(sampler, self.sde)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        x_T, generators = self.initial_noise(net, seeds)
        try:
            with sampling_autocast(precision, self.device.type):
                return sampler(sampling_net(net), x_T, self.sde, parameterization=self.parameterization,
                               generator=generators, callback=callback)
        finally:
            net.train(was_training)
