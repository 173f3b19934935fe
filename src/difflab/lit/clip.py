"""The LightningModule that trains mini_clip (nets/clip.py): CLIP's contrastive objective (Radford et al. 2021) on
noised images x_t = q_sample(x0, t, eps), t uniform over the diffusion schedule's 0..T-1 (t = 0 included), as a
noise-aware CLIP for guidance (GLIDE, Nichol et al. 2021, Sec. 3.2).

Validation logs val/loss (fixed noise and t per batch) and zero-shot accuracy on the val images: each image is
assigned the class whose held-out phrasings (data/captions.py, never seen in training) have the nearest mean
text embedding (CLIP's prompt ensembling, Radford et al. 2021, Sec. 3.1.4), clean (t = 0) and at each of
`zero_shot_timesteps`: zero_shot/acc (clean) and zero_shot/acc_t<t>.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.diffusion.contrastive import symmetric_info_nce
from difflab.diffusion.process import q_sample
from difflab.diffusion.schedules import NoiseSchedule
from difflab.lit.base import OptimizerFactory
from difflab.nets.clip import MiniCLIP

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = ("constant", "cosine")


def class_text_embeddings(net: MiniCLIP, class_prompts: Sequence[Sequence[str]]) -> Tensor:
    """Per class, the renormalised mean of its phrasings' unit text embeddings (Radford et al. 2021, Sec. 3.1.4): (K, D)."""
    means = [net.encode_prompts(list(prompts)).mean(dim=0) for prompts in class_prompts]
    return F.normalize(torch.stack(means), dim=-1)


class MiniCLIPModule(pl.LightningModule):
    """Symmetric InfoNCE of MiniCLIP on (x_t, t, caption) batches; the logit scale is clamped after every step."""

    checkpoint_kind = "clip"

    def __init__(self, *, net: MiniCLIP, betas: Tensor, optimizer: OptimizerFactory, lr_warmup_steps: int = 0,
                 lr_schedule: LRSchedule = "cosine", zero_shot_timesteps: Sequence[int] = (0, 100, 250, 500, 750),
                 zero_shot_prompts: Literal["train", "heldout"] = "heldout") -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not supported; allowed: {LR_SCHEDULES}")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, int) or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps!r} must be an int >= 0")
        if zero_shot_prompts not in ("train", "heldout"):
            raise ValueError(f"zero_shot_prompts={zero_shot_prompts!r} is not allowed; choose 'train' or 'heldout'")
        self.net = net
        self._schedule = NoiseSchedule.from_betas(betas)
        steps = [int(t) for t in zero_shot_timesteps]
        bad = [t for t in steps if not 0 <= t < self._schedule.T]
        if bad or not steps:
            raise ValueError(f"zero_shot_timesteps={list(zero_shot_timesteps)}: each must lie in 0..{self._schedule.T - 1} "
                             "(the schedule's T - 1), and at least one is needed")
        self.zero_shot_timesteps = sorted(set(steps) | {0})
        self.zero_shot_prompts = zero_shot_prompts
        self.optimizer_factory, self.lr_warmup_steps, self.lr_schedule = optimizer, lr_warmup_steps, lr_schedule
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI
        self._class_text: Tensor | None = None
        self._hits: dict[int, list[Tensor]] = {}

    @property
    def schedule(self) -> NoiseSchedule:
        if self._schedule.device != self.device:
            self._schedule = self._schedule.to(self.device)
        return self._schedule

    def _loss(self, x0: Tensor, captions: Sequence[str], t: Tensor, eps: Tensor) -> Tensor:
        unique = list(dict.fromkeys(captions))  # a caption set repeats phrasings: encode each distinct one once
        ids, mask = self.net.tokenizer(unique)
        text = self.net.encode_text(ids.to(self.device), mask.to(self.device))  # (U, D)
        text = text[torch.tensor([unique.index(c) for c in captions], device=self.device)]  # (B, D)
        image = self.net.encode_image(q_sample(x0, t, eps, self.schedule), t)  # (B, D)
        return symmetric_info_nce(self.net.logit_scale.exp() * image @ text.T)

    @staticmethod
    def _captions(batch: Sequence[Any]) -> Sequence[str]:
        if len(batch) < 3:
            raise ValueError("mini_clip trains on image-caption pairs but the batch carries no captions; "
                             "set data.captions=true (experiment=digits_clip and fashion_clip do)")
        return batch[2]

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        x0 = batch[0]
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), device=self.device)
        loss = self._loss(x0, self._captions(batch), t, torch.randn_like(x0))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at global step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/logit_scale", self.net.logit_scale.detach(), on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.net.clamp_logit_scale_()  # after the optimizer step: the temperature never leaves [1/100, 1]

    def on_validation_epoch_start(self) -> None:
        sets = self.trainer.datamodule.class_prompt_sets() if self._trainer is not None and self.trainer.datamodule else None
        self._class_text = None if sets is None else class_text_embeddings(self.net, sets[self.zero_shot_prompts])
        self._hits = {t: [] for t in self.zero_shot_timesteps}

    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        x0, labels = batch[0], batch[1]
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), device=self.device, generator=generator)
        eps = torch.randn(x0.shape, device=self.device, generator=generator)
        loss = self._loss(x0, self._captions(batch), t, eps)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
        if self._class_text is not None:
            for step in self.zero_shot_timesteps:
                t_fixed = torch.full_like(t, step)
                x_t = q_sample(x0, t_fixed, eps, self.schedule)
                predicted = (self.net.encode_image(x_t, t_fixed) @ self._class_text.T).argmax(dim=1)
                self._hits[step].append((predicted == labels).float())
        return loss

    def on_validation_epoch_end(self) -> None:
        for step, hits in self._hits.items():
            if hits:
                acc = torch.cat(hits).mean()
                self.log(f"zero_shot/acc_t{step}", acc, sync_dist=True)
                if step == 0:
                    self.log("zero_shot/acc", acc, prog_bar=True, sync_dist=True)
        self._hits = {}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        total, warmup = self.trainer.estimated_stepping_batches, self.lr_warmup_steps
        if self.lr_schedule == "cosine" and (not math.isfinite(total) or total < 1):
            raise ValueError(f"lr_schedule='cosine' decays over the run's length, but the Trainer's is {total}; "
                             "set trainer.max_steps, or module.lr_schedule=constant")

        def factor(step: int) -> float:  # linear warm-up, then constant or half a cosine to 0 (Loshchilov & Hutter 2017)
            if step < warmup:
                return (step + 1) / warmup
            if self.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {"config": self.run_config, "kind": self.checkpoint_kind}
