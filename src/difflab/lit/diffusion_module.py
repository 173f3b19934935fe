"""The LightningModule that trains an eps/x0/v-predicting network under a discrete noise schedule."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.vlb_objectives import HybridLoss, VLBLoss
from difflab.diffusion.likelihood import LogVariance
from difflab.diffusion.objectives import SimpleLoss, offset_noise
from difflab.diffusion.process import fixed_log_variance, randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import ImportanceTimesteps, UniformTimesteps
from difflab.diffusion.variance import LearnedVariance
from difflab.lit.power_ema import EMAKind
from difflab.lit.base import EMADecay, OptimizerFactory, TrainingModule
from difflab.nets.first_stage import FirstStage
from difflab.nets.conditioning import Conditioning

Objective = SimpleLoss | HybridLoss | VLBLoss
__all__ = ["DiffusionModule", "EMADecay", "OptimizerFactory"]


class DiffusionModule(TrainingModule):
    """Orchestrates net + schedule + objective + EMA + optimizer; holds no formulas itself."""

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: Tensor,
        optimizer: OptimizerFactory,
        objective: Objective | None = None,
        timestep_sampler: UniformTimesteps | ImportanceTimesteps | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        compile: bool = False,
        label_dropout: float = 0.1,
        prompt_dropout: float = 0.1,
        offset_noise: float = 0.0,
        first_stage: FirstStage | None = None,
        ema: EMAKind = "constant",
        ema_sigma_rels: Sequence[float] = (0.05, 0.10),
    ) -> None:
        super().__init__(net=net, optimizer=optimizer, lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay,
                         ema_warmup=ema_warmup, compile=compile, first_stage=first_stage, ema=ema,
                         ema_sigma_rels=ema_sigma_rels)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout!r} must be in [0, 1) (0.1 in Ho & Salimans 2022)")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={prompt_dropout!r} must be in [0, 1) (0.1: the empty prompt 10% of the time)")
        if not offset_noise >= 0.0:
            raise ValueError(f"offset_noise={offset_noise!r} must be >= 0 (0 = off, ~0.1 typical)")
        objective = objective or SimpleLoss()
        _check_output_channels(net, objective.variance)
        self._schedule = NoiseSchedule.from_betas(betas)
        self.objective = objective
        self.label_dropout, self.offset_noise = float(label_dropout), float(offset_noise)
        self.prompt_dropout = float(prompt_dropout)
        self.timestep_sampler = timestep_sampler or UniformTimesteps()

    @property
    def parameterization(self) -> str:
        return self.objective.parameterization

    @property
    def model_variance(self) -> str:
        """'fixed', 'learned' or 'learned_range': what the network's extra output channels mean."""
        return self.objective.variance

    def log_variance(self) -> LogVariance:
        """log Sigma of p(x_{t-1} | x_t) for likelihoods: the learned head, or the fixed_small table."""
        if self.model_variance == "fixed":
            return fixed_log_variance(self.schedule, "fixed_small")
        return LearnedVariance(self.schedule, self.model_variance)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise-schedule table on this module's device (moved once, then cached)."""
        if self._schedule.device != self.device:
            self._schedule = self._schedule.to(self.device)
        return self._schedule

    def _train_labels(self, labels: Tensor | None, batch_size: int, generator: torch.Generator | None) -> Tensor | None:
        """Class labels with the null label put in at rate label_dropout (Ho & Salimans 2022, Alg. 1); None if unconditional."""
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError("this net is class-conditional (num_classes set) but the batch carries no labels")
        drop = torch.rand(batch_size, device=labels.device, generator=generator) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    @property
    def is_text_model(self) -> bool:
        """True when the net conditions on prompts (it owns a text encoder)."""
        return getattr(self.net, "text_encoder", None) is not None

    def _train_prompts(self, captions: Sequence[str] | None, batch_size: int,
                       generator: torch.Generator | None) -> Conditioning:
        """Prompt tokens with the empty prompt put in at rate prompt_dropout (classifier-free guidance on text)."""
        if captions is None:
            raise ValueError("this net is a text-to-image model but the batch carries no captions; "
                             "train it with data.captions=true (experiment=digits_t2i|fashion_t2i)")
        if len(captions) != batch_size:
            raise ValueError(f"got {len(captions)} captions for a batch of {batch_size} images")
        drop = (torch.rand(batch_size, device=self.device, generator=generator) < self.prompt_dropout).tolist()
        return self.net.prompt_condition(["" if d else c for c, d in zip(captions, drop)], self.device)

    def _train_cond(self, batch: Sequence[Any], batch_size: int, generator: torch.Generator | None) -> Conditioning | None:
        """The conditioning of a training batch (images, labels[, captions]) with its null-condition dropout."""
        if self.is_text_model:
            return self._train_prompts(batch[2] if len(batch) > 2 else None, batch_size, generator)
        labels = self._train_labels(batch[1] if len(batch) > 1 else None, batch_size, generator)
        return None if labels is None else Conditioning(labels=labels)

    def _train_model_fn(self, cond: Conditioning | None) -> Callable[[Tensor, Tensor], Tensor]:
        """model_fn(x_t, t) of the training net under `cond` (unconditional if None)."""
        if cond is None:
            return self.net
        return lambda x_t, t: self.net(x_t, t, cond)

    def _losses(
        self, x0: Tensor, batch: Sequence[Any], generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t, unweighted per-sample loss, importance weights), each (B,)."""
        t, weights = self.timestep_sampler.sample(
            x0.shape[0], T=self.schedule.T, device=x0.device, generator=generator
        )
        eps = offset_noise(randn_like(x0, generator), self.offset_noise, generator)
        model_fn = self._train_model_fn(self._train_cond(batch, x0.shape[0], generator))
        return t, self.objective(model_fn, x0, t, eps, self.schedule), weights

    def loss(self, x0: Tensor, generator: torch.Generator | None = None, labels: Tensor | None = None,
             prompts: Sequence[str] | None = None) -> Tensor:
        """Per-sample weighted objective (B,) for a clean batch x0 in [-1, 1] (labels or prompts for conditional nets)."""
        _, raw, weights = self._losses(x0, (x0, labels, prompts), generator)
        return raw * weights

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        t, raw, weights = self._losses(self.to_latent(batch[0]), batch, None)
        loss = (raw * weights).mean()
        self.check_finite(loss, batch_idx)
        if hasattr(self.timestep_sampler, "update"):  # importance sampling learns from every rank's losses
            gathered = (t, raw.detach()) if self.trainer.world_size == 1 else (
                self.all_gather(t).flatten(), self.all_gather(raw.detach()).flatten())
            self.timestep_sampler.update(*gathered)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        # fixed noise and timesteps per batch so val/loss is comparable across evaluations
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        x0 = self.to_latent_fixed(batch[0], generator)
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), device=self.device, generator=generator)
        eps = randn_like(x0, generator)
        model_fn = self._train_model_fn(self._train_cond(batch, x0.shape[0], generator))
        loss = self.objective(model_fn, x0, t, eps, self.schedule).mean()  # uniform t, unweighted
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def checkpoint_state(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, "family": "ddpm",
                "timestep_sampler": self.timestep_sampler.state_dict()}

    def load_checkpoint_state(self, stored: dict[str, Any]) -> None:
        self.timestep_sampler.load_state_dict(stored.get("timestep_sampler", {}))


def _check_output_channels(net: nn.Module, variance: str) -> None:
    """A learned variance needs 2C output channels, a fixed one C; name the mismatch and the fix."""
    c_in, c_out = getattr(net, "in_channels", None), getattr(net, "out_channels", None)
    if c_in is None or c_out is None:
        return
    want = 2 * c_in if variance != "fixed" else c_in
    if c_out != want:
        raise ValueError(
            f"the objective's variance={variance!r} needs a net with out_channels={want} (in_channels={c_in}), "
            f"got out_channels={c_out}; set model.out_channels={want} or null"
        )
