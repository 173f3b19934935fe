"""The LightningModule of score-based models: NCSN and continuous-time VP / sub-VP / VE SDEs."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.process import randn_like
from difflab.diffusion.score_objectives import DenoisingScoreMatching, Weighting, sample_times
from difflab.diffusion.sde import NoiseFamily
from difflab.lit.power_ema import EMAKind
from difflab.lit.base import OptimizerFactory, TrainingModule
from difflab.nets.first_stage import FirstStage


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
        first_stage: FirstStage | None = None,
        ema: EMAKind = "constant",
        ema_sigma_rels: Sequence[float] = (0.05, 0.10),
    ) -> None:
        super().__init__(net=net, optimizer=optimizer, lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay,
                         ema_warmup=ema_warmup, compile=compile, first_stage=first_stage, ema=ema,
                         ema_sigma_rels=ema_sigma_rels)
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
        loss = self.loss(self.to_latent(batch[0])).mean()
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(self.to_latent_fixed(batch[0], generator), generator=generator).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def checkpoint_state(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, "family": self.family}
