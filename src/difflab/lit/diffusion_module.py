"""The LightningModule that trains an eps/x0/v-predicting network under a discrete noise schedule."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.diffusion.vlb_objectives import HybridLoss, VLBLoss
from difflab.diffusion.likelihood import LogVariance
from difflab.diffusion.objectives import SimpleLoss, offset_noise
from difflab.diffusion.process import fixed_log_variance, randn_like
from difflab.diffusion.schedules import NoiseSchedule
from difflab.diffusion.timesteps import ImportanceTimesteps, UniformTimesteps
from difflab.diffusion.variance import LearnedVariance
from difflab.lit.base import EMADecay, OptimizerFactory, TrainingModule
from difflab.samplers.base import Callback, ModelFn, Sampler
from difflab.samplers.ddim import DDIM
from difflab.samplers.ddpm import DDPM
from difflab.samplers.guidance import classifier_free_guidance, classifier_grad
from difflab.nets.inference import sampling_autocast, sampling_net

Objective = SimpleLoss | HybridLoss | VLBLoss
Labels = Sequence[int] | Tensor | None
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
        offset_noise: float = 0.0,
    ) -> None:
        super().__init__(net=net, optimizer=optimizer, lr_warmup_steps=lr_warmup_steps, ema_decay=ema_decay,
                         ema_warmup=ema_warmup, compile=compile)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout!r} must be in [0, 1) (0.1 in Ho & Salimans 2022)")
        if not offset_noise >= 0.0:
            raise ValueError(f"offset_noise={offset_noise!r} must be >= 0 (0 = off, ~0.1 typical)")
        objective = objective or SimpleLoss()
        _check_output_channels(net, objective.variance)
        self._schedule = NoiseSchedule.from_betas(betas)
        self.objective = objective
        self.label_dropout, self.offset_noise = float(label_dropout), float(offset_noise)
        self.timestep_sampler = timestep_sampler or UniformTimesteps()

    @property
    def parameterization(self) -> str:
        return self.objective.parameterization

    @property
    def model_variance(self) -> str:
        """'fixed', 'learned' or 'learned_range': what the network's extra output channels mean."""
        return self.objective.variance

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional net (its null label is num_classes), else None."""
        return getattr(self.net, "num_classes", None)

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

    def _losses(
        self, x0: Tensor, labels: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t, unweighted per-sample loss, importance weights), each (B,)."""
        t, weights = self.timestep_sampler.sample(
            x0.shape[0], T=self.schedule.T, device=x0.device, generator=generator
        )
        eps = offset_noise(randn_like(x0, generator), self.offset_noise, generator)
        cond = self._train_labels(labels, x0.shape[0], generator)
        model_fn = self.net if cond is None else (lambda x_t, t_: self.net(x_t, t_, cond))
        return t, self.objective(model_fn, x0, t, eps, self.schedule), weights

    def loss(self, x0: Tensor, generator: torch.Generator | None = None, labels: Tensor | None = None) -> Tensor:
        """Per-sample weighted objective (B,) for a clean batch x0 in [-1, 1] (labels for conditional nets)."""
        _, raw, weights = self._losses(x0, labels, generator)
        return raw * weights

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        t, raw, weights = self._losses(batch[0], batch[1] if len(batch) > 1 else None, None)
        loss = (raw * weights).mean()
        self.check_finite(loss, batch_idx)
        if hasattr(self.timestep_sampler, "update"):  # importance sampling learns from every rank's losses
            gathered = (t, raw.detach()) if self.trainer.world_size == 1 else (
                self.all_gather(t).flatten(), self.all_gather(raw.detach()).flatten())
            self.timestep_sampler.update(*gathered)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # fixed noise and timesteps per batch so val/loss is comparable across evaluations
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.schedule.T, (batch[0].shape[0],), device=self.device, generator=generator)
        eps = randn_like(batch[0], generator)
        cond = self._train_labels(batch[1] if len(batch) > 1 else None, batch[0].shape[0], generator)
        model_fn = self.net if cond is None else (lambda x_t, t_: self.net(x_t, t_, cond))
        loss = self.objective(model_fn, batch[0], t, eps, self.schedule).mean()  # uniform t, unweighted
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        return loss

    def checkpoint_state(self) -> dict[str, Any]:
        return {"parameterization": self.parameterization, "timestep_sampler": self.timestep_sampler.state_dict()}

    def load_checkpoint_state(self, stored: dict[str, Any]) -> None:
        self.timestep_sampler.load_state_dict(stored.get("timestep_sampler", {}))

    @torch.inference_mode()
    def sample(
        self,
        sampler: Sampler,
        seeds: Sequence[int],
        *,
        use_ema: bool = True,
        callback: Callback = None,
        labels: Labels = None,
        guidance_scale: float = 1.0,
        classifier: nn.Module | None = None,
        classifier_scale: float = 0.0,
        precision: str | int | None = None,
    ) -> Tensor:
        """Images in [-1, 1], (len(seeds), C, H, W); sample i draws all its noise from seed seeds[i].

        labels (one per seed) condition a class-conditional net, with classifier-free guidance
        scale w = guidance_scale (0 unconditional, 1 conditional, > 1 guided); without labels a
        conditional net samples unconditionally (null label). A noise-aware `classifier(x_t, t)`
        with classifier_scale s > 0 adds classifier guidance towards `labels`. precision bf16-mixed or
        16-mixed runs the network under autocast (weights cast once per call, not per step); None or
        32 keeps the caller's context.
        """
        ancestral = isinstance(sampler, (DDPM, DDIM))  # the samplers that take Sigma_theta and cond_fn
        if classifier is not None and classifier_scale > 0 and not ancestral:
            raise ValueError(f"classifier guidance (classifier_scale={classifier_scale}) is implemented for the "
                             f"ddpm and ddim samplers, not {sampler.name!r}; use classifier-free guidance "
                             "(guidance_scale) with this sampler, or sampler=ddpm|ddim")
        with sampling_autocast(precision, self.device.type):  # a bad precision fails here, first
            net = self.ema.module if use_ema else self.net
            was_training = net.training
            net.eval()
            try:  # the net's mode is restored whatever happens below, a refused call included
                return self._sample_eval(net, sampler, seeds, ancestral, callback, labels, guidance_scale,
                                         classifier, classifier_scale)
            finally:
                net.train(was_training)

    def _sample_eval(
        self, net: nn.Module, sampler: Sampler, seeds: Sequence[int], ancestral: bool, callback: Callback,
        labels: Labels, guidance_scale: float, classifier: nn.Module | None, classifier_scale: float,
    ) -> Tensor:
        """`sample`'s body, run with `net` in eval mode."""
        x_T, generators = self.initial_noise(net, seeds)
        y = self._sample_labels(labels, len(seeds), need=classifier is not None and classifier_scale > 0)
        model_fn = sampling_net(net)  # weights cast (autocast) and prepacked (CPU) once, not per step
        if self.num_classes is not None and y is not None:
            model_fn = classifier_free_guidance(model_fn, y, null_label=self.num_classes,
                                                guidance_scale=guidance_scale, mean_channels=net.in_channels)
        extra: dict = {}
        if self.model_variance != "fixed" and ancestral:
            extra["model_variance"] = self.model_variance
        elif self.model_variance != "fixed":  # ODE/SDE solvers need only the mean (eps) channels
            model_fn = _mean_channels(model_fn, net.in_channels)
        if classifier is not None and classifier_scale > 0:
            extra["cond_fn"] = classifier_grad(classifier, y, scale=classifier_scale)
        return sampler(model_fn, x_T, self.schedule, parameterization=self.parameterization,
                       generator=generators, callback=callback, **extra)

    def _sample_labels(self, labels: Labels, n: int, *, need: bool) -> Tensor | None:
        """Labels as a (n,) long tensor on this device, checked against num_classes; None if not given."""
        if labels is None:
            if need:
                raise ValueError("classifier guidance needs labels (one class per sample), e.g. label=7")
            return None
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device).flatten()
        if y.numel() == 1 and n > 1:
            y = y.expand(n).clone()
        if y.shape != (n,):
            raise ValueError(f"got {y.numel()} labels for {n} samples; give one label, or one per sample")
        if self.num_classes is None and not need:
            raise ValueError("labels were given but this model is unconditional (model.num_classes=null); "
                             "train with model.num_classes=auto, or use a noise-aware classifier for guidance")
        k = self.num_classes if self.num_classes is not None else None
        bad = y[(y < 0) | (y >= k)] if k is not None else y[y < 0]
        if bad.numel():
            raise ValueError(f"label {bad[0].item()} is outside 0..{(k or 1) - 1} (num_classes={k})")
        return y


def _mean_channels(model_fn: ModelFn, channels: int) -> ModelFn:
    """The eps/x0/v half of a learned-variance net's (B, 2C, H, W) output, for samplers without Sigma_theta."""
    return lambda x_t, t, *args: model_fn(x_t, t, *args)[:, :channels]


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
