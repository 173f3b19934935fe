"""The LightningModule that trains an image classifier (features for FID/IS on small data)."""

from __future__ import annotations

import math
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.lit.base import OptimizerFactory

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = ("constant", "cosine")


def random_translate(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image of (B, C, H, W) by its own integer (dy, dx) in [-max_shift, max_shift].

    Pad (replicate: the border colour, -1 background for digits) then crop back to H x W. No
    flips: a mirrored digit is not the same digit.
    """
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, B, 1), generator=generator, device=x.device)
    rows = offsets[0] + torch.arange(H, device=x.device)  # (B, H)
    cols = offsets[1] + torch.arange(W, device=x.device)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of `net` (x in [-1, 1] -> logits) with random small translations."""

    checkpoint_kind = "classifier"

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: OptimizerFactory,
        label_smoothing: float = 0.0,
        max_shift: int = 1,
        lr_schedule: LRSchedule = "cosine",
    ) -> None:
        super().__init__()
        if isinstance(label_smoothing, bool) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift={max_shift!r} must be an int >= 0 (0 turns translation off)")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not supported; allowed: {LR_SCHEDULES}")
        self.net = net
        self.optimizer_factory = optimizer
        self.label_smoothing = float(label_smoothing)
        self.max_shift = max_shift
        self.lr_schedule = lr_schedule
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, num_classes) logits

    def _loss_acc(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(x)  # (B, num_classes)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, acc

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, acc = self._loss_acc(random_translate(x, self.max_shift), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step}, batch {batch_idx}"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", acc, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, acc = self._loss_acc(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log("val/acc", acc, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"lr_schedule='cosine' decays over the run's length, but the Trainer's is {total}; "
                "set trainer.max_steps (or max_epochs), or use lr_schedule='constant'"
            )
        # half a cosine from the optimizer's lr down to 0 at the last step (Loshchilov & Hutter 2017)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {"config": self.run_config, "kind": self.checkpoint_kind}
