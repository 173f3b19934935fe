"""The LightningModule that trains a noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.diffusion.process import q_sample
from difflab.diffusion.schedules import NoiseSchedule
from difflab.lit.classifier import ClassifierModule, LRSchedule, OptimizerFactory


class NoisyClassifierModule(ClassifierModule):
    """Cross-entropy of `net(x_t, t)` on x_t = q_sample(x0, t, eps), t uniform over the diffusion model's T steps.

    The schedule (betas) must be the one of the diffusion model it will guide; checkpoints store
    it (as config) so `load_noisy_classifier` can refuse a mismatched T.
    """

    checkpoint_kind = "noisy_classifier"

    def __init__(
        self,
        *,
        net: nn.Module,
        betas: Tensor,
        optimizer: OptimizerFactory,
        label_smoothing: float = 0.0,
        max_shift: int = 1,
        lr_schedule: LRSchedule = "cosine",
    ) -> None:
        super().__init__(net=net, optimizer=optimizer, label_smoothing=label_smoothing, max_shift=max_shift,
                         lr_schedule=lr_schedule)
        self._schedule = NoiseSchedule.from_betas(betas)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)  # (B, num_classes) logits

    def _loss_acc(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        schedule = self._schedule.to(x.device)
        t = torch.randint(0, schedule.T, (x.shape[0],), device=x.device)
        x_t = q_sample(x, t, torch.randn_like(x), schedule)
        logits = self.net(x_t, t)  # (B, num_classes)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(dim=1) == y).float().mean()
