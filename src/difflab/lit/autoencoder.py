"""The LightningModule that trains the latent-diffusion first stage (Rombach et al. 2022, Sec. 3.1 and App. G).

Per batch, with x̂ the decoder's output for a posterior sample z ~ q(z | x):

    L_AE = E_B[L_rec(x, x̂)] + kl_weight E_B[KL(q(z | x) || N(0, I))] + lambda * L_GAN(x̂)   (step >= disc_start)
    L_D  = hinge(D(x), D(x̂))                                                              (step >= disc_start)

with L_rec summed over pixels (L1, optionally + L2), lambda LDM's adaptive weight and D the optional
PatchGAN (disc_weight > 0). The formulas live in difflab.diffusion.autoencoder_losses and
DiagonalGaussian.kl; this module orchestrates them with Lightning's manual optimisation: one
optimizer for the autoencoder and, with the discriminator, one for D. `global_step` counts autoencoder
steps (LDM's disc_start and trainer.max_steps count batches), so D's step goes through the strategy
(precision plugin included) without advancing it.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from difflab.diffusion.autoencoder_losses import adaptive_weight, generator_loss, hinge_d_loss, reconstruction_loss
from difflab.lit import resume
from difflab.lit.base import OptimizerFactory
from difflab.nets.autoencoder import AutoencoderKL, DiagonalGaussian
from difflab.nets.discriminator import NLayerDiscriminator

DATA_RANGE = (-1.0, 1.0)  # images (and clamped reconstructions) for PSNR / SSIM
LPIPS_REFUSAL = (
    "module.lpips_weight={w} asks for LPIPS (Zhang et al. 2018), which compares features of an ImageNet-trained "
    "VGG16 plus LPIPS' own linear layers: weights that must be downloaded (torchvision's vgg16 checkpoint, "
    "~528 MB, and the lpips package's v0.1 weights). difflab trains without downloads, so LPIPS is not "
    "available; set module.lpips_weight=0 (L1 + KL, as here) and, for sharper images, turn on the PatchGAN "
    "discriminator with module.disc_weight=0.5 (LDM's value) and module.disc_start=<step>"
)


class AutoencoderModule(pl.LightningModule):
    """Trains an AutoencoderKL as LDM does, minus LPIPS: L1 (+ L2) + KL, optionally + PatchGAN with adaptive weight."""

    checkpoint_kind = "autoencoder"

    def __init__(
        self,
        *,
        net: AutoencoderKL,
        optimizer: OptimizerFactory,
        kl_weight: float = 1e-6,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        disc_weight: float = 0.0,
        disc_start: int = 50001,
        disc_layers: int = 3,
        disc_channels: int = 64,
    ) -> None:
        super().__init__()
        if lpips_weight:
            raise ValueError(LPIPS_REFUSAL.format(w=lpips_weight))
        for name, value in (("kl_weight", kl_weight), ("l1_weight", l1_weight), ("l2_weight", l2_weight),
                            ("disc_weight", disc_weight)):
            if isinstance(value, bool) or not float(value) >= 0.0:
                raise ValueError(f"module.{name}={value!r} must be a number >= 0")
        if l1_weight == 0 and l2_weight == 0:
            raise ValueError("module.l1_weight=0 and module.l2_weight=0 leave no reconstruction loss; set one > 0")
        if isinstance(disc_start, bool) or not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(f"module.disc_start={disc_start!r} must be an int >= 0 (the step the GAN loss starts)")
        self.automatic_optimization = False  # two optimizers (autoencoder, discriminator), stepped in training_step
        self.net = net
        self.optimizer_factory = optimizer
        self.kl_weight, self.l1_weight, self.l2_weight = float(kl_weight), float(l1_weight), float(l2_weight)
        self.disc_weight, self.disc_start = float(disc_weight), disc_start
        self.discriminator = NLayerDiscriminator(
            in_channels=net.in_channels, image_size=net.image_size, channels=disc_channels, num_layers=disc_layers,
        ) if self.disc_weight > 0 else None
        self.val_psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE, dim=(1, 2, 3))  # mean of per-image PSNRs
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=DATA_RANGE)
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints by the CLI
        self._resumed_rng: list[dict] | None = None  # per-rank RNG states of the checkpoint being resumed

    # -- the model's public methods ---------------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[Tensor, DiagonalGaussian]:
        return self.net(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(mode of q(z | x)) in eval mode, clamped to [-1, 1] (B, C, H, W); the net's mode is restored."""
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net(x.to(self.device), sample_posterior=False)[0].clamp(*DATA_RANGE)
        finally:
            self.net.train(was_training)

    def losses(self, x: Tensor, x_hat: Tensor, posterior: DiagonalGaussian) -> tuple[Tensor, Tensor, Tensor]:
        """(L_rec + kl_weight KL, L_rec, KL): each averaged over the batch, L_rec summed over pixels."""
        rec = reconstruction_loss(x, x_hat, l1_weight=self.l1_weight, l2_weight=self.l2_weight).mean()
        kl = posterior.kl().mean()
        return rec + self.kl_weight * kl, rec, kl

    def gan_active(self) -> bool:
        """Whether this step trains with the discriminator (disc_weight > 0 and global_step >= disc_start)."""
        return self.discriminator is not None and self.global_step >= self.disc_start

    # -- training ---------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x = batch[0]  # (B, C, H, W) in [-1, 1]
        gan = self.gan_active()  # decided once: global_step advances at the autoencoder's step below
        x_hat, posterior = self.net(x)
        loss, rec, kl = self.losses(x, x_hat, posterior)
        logs = {"train/rec_loss": rec.detach() / x[0].numel(), "train/kl": kl.detach()}  # rec per pixel
        if gan:
            g_loss = generator_loss(self.discriminator(x_hat))
            weight = adaptive_weight(rec, g_loss, self.net.last_layer, disc_weight=self.disc_weight)
            loss = loss + weight * g_loss
            logs.update({"train/g_loss": g_loss.detach(), "train/d_weight": weight})
        self._check_finite(loss, batch_idx)
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        opt_ae.zero_grad()
        self.manual_backward(loss)
        opt_ae.step()
        if gan:
            logs.update(self._discriminator_step(optimizers[1], x, x_hat.detach()))
        with torch.no_grad():
            x_hat = x_hat.detach().clamp(*DATA_RANGE)
            logs["train/psnr"] = peak_signal_noise_ratio(x_hat, x, data_range=DATA_RANGE, dim=(1, 2, 3))
            logs["train/ssim"] = structural_similarity_index_measure(x_hat, x, data_range=DATA_RANGE)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss.detach()

    def _discriminator_step(self, opt_d: Any, x: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """One hinge-loss step of D on real x and detached reconstructions; not counted in global_step."""
        logits_real, logits_fake = self.discriminator(x), self.discriminator(x_hat)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
        return {"train/d_loss": d_loss.detach(), "train/logits_real": logits_real.detach().mean(),
                "train/logits_fake": logits_fake.detach().mean()}

    def _check_finite(self, loss: Tensor, batch_idx: int) -> None:
        if not resume.all_ranks_true(bool(torch.isfinite(loss))):
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step}, batch {batch_idx} (loss {loss.item()} "
                f"on rank {self.global_rank}): stopped before the optimizer step, so weights and checkpoints already "
                "written are untouched")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x = batch[0]
        x_hat, posterior = self.net(x, sample_posterior=False)  # the mode: comparable across evaluations
        loss, rec, kl = self.losses(x, x_hat, posterior)
        x_hat = x_hat.clamp(*DATA_RANGE)
        self.val_psnr.update(x_hat, x)
        self.val_ssim.update(x_hat, x)
        B = x.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=B)
        self.log("val/rec_loss", rec / x[0].numel(), sync_dist=True, batch_size=B)
        self.log("val/kl", kl, sync_dist=True, batch_size=B)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=B)
        self.log("val/ssim", self.val_ssim, batch_size=B)
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = [self.optimizer_factory(params=self.net.parameters())]
        if self.discriminator is not None:  # LDM: the same optimizer settings for D
            optimizers.append(self.optimizer_factory(params=self.discriminator.parameters()))
        return optimizers

    # -- exact resume and checkpoints (as TrainingModule) ----------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1 and self.discriminator:
            raise ValueError(
                f"module.disc_weight={self.disc_weight} trains a PatchGAN, which is not supported on "
                f"{self.trainer.world_size} processes yet: its parameters sit unused until disc_start, and its own "
                "backward pass follows the autoencoder's in one DDP forward, whose gradient synchronisation difflab "
                "has not verified; train on one device (trainer=cpu or trainer=gpu) or without the discriminator "
                "(module.disc_weight=0)")
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            resume.seed_rank(seed, self.global_rank, self.trainer.world_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # logged steps follow global_step after a resume, as TrainingModule.on_train_batch_start explains
        loop = self.trainer.fit_loop.epoch_loop
        if getattr(loop, "_batches_that_stepped", None) is not None:
            loop._batches_that_stepped = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["difflab"] = {
            "config": self.run_config,
            "kind": self.checkpoint_kind,  # lit/checkpoint_io.py: load_first_stage reads it back
            "rng": resume.gather_rng_states(),  # one entry per rank (a collective: every rank saves)
            "latent_shape": list(self.net.latent_shape),
            "factor": self.net.factor,
        }
        if self._trainer is not None:
            for logger in self.trainer.loggers:
                logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("difflab") or {}
        resume.check_state_dict_fits(
            self.state_dict(), checkpoint["state_dict"],
            source=f"checkpoint {getattr(self._trainer, 'ckpt_path', None)}",
            produced_by=(stored.get("config") or {}).get("first_stage_model"),
            expected_config=(self.run_config or {}).get("first_stage_model"),
        )
        self._resumed_rng = stored.get("rng")

    def on_train_start(self) -> None:
        states, self._resumed_rng = self._resumed_rng, None
        resume.restore_rng_streams(states, rank=self.global_rank, world_size=self.trainer.world_size,
                                   step=self.global_step)
