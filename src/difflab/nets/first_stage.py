"""The first stage of latent diffusion (Rombach et al. 2022): a frozen autoencoder between pixels and the
latents the diffusion model is trained on, with the latent scale of LDM's `scale_by_std`.

z = s * E(x) (a posterior sample, or its mode) and x = D(z / s); s is fixed by config, or computed once as
1 / std of the first training batch's latents (Rombach et al. 2022, Sec. 4.3.2 / App. G) and then
stored with the checkpoint (a persistent buffer). Any autoencoder whose `encode(x)` returns a diagonal
Gaussian posterior (or an object holding one as `latent_dist`, as diffusers' AutoencoderKL) and whose
`decode(z)` returns images (or an object holding them as `sample`) fits: difflab's AutoencoderKL and
diffusers' AutoencoderKL (Stable Diffusion's VAE) both do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.nets.autoencoder import reparameterise

UNSET = float("nan")  # scale_factor before scale_by_std has seen a batch


def check_scale_factor(value: float | None) -> None:
    """A latent scale must be a finite positive number (or None: computed from the data)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"first_stage.scale_factor={value!r} is not allowed; give a finite number > 0, or null "
                         "to compute it from the first training batch (LDM's scale_by_std)")


class FirstStage(nn.Module):
    """A frozen autoencoder with its latent scale: encode(x) -> z, decode(z) -> x, images in [-1, 1]."""

    def __init__(self, autoencoder: nn.Module, *, latent_shape: tuple[int, int, int], scale_factor: float | None = None,
                 sample_posterior: bool = True) -> None:
        super().__init__()
        check_scale_factor(scale_factor)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.latent_shape = tuple(int(s) for s in latent_shape)  # (C, h, w) of the latents of one image
        self.sample_posterior = sample_posterior
        self.register_buffer("scale_factor", torch.tensor(UNSET if scale_factor is None else float(scale_factor)))

    def train(self, mode: bool = True) -> "FirstStage":
        """Always in eval mode: the first stage is frozen (no dropout, no norm statistics updates)."""
        return super().train(False)

    @property
    def scale_known(self) -> bool:
        """Whether the latent scale is set (by config, scale_by_std or a checkpoint)."""
        return bool(torch.isfinite(self.scale_factor))

    def _posterior(self, x: Tensor):
        out = self.autoencoder.encode(x)
        return getattr(out, "latent_dist", out)

    @torch.no_grad()
    def encode_unscaled(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """E(x): a sample of the posterior q(z | x) (or its mode), before scaling."""
        posterior = self._posterior(x)
        return posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()

    @torch.no_grad()
    def moments(self, x: Tensor) -> Tensor:
        """(mean, std) of q(z | x) before scaling, concatenated on channels: (B, 2C, h, w) (what a latent cache stores)."""
        posterior = self._posterior(x)
        return torch.cat([posterior.mean, posterior.std], dim=1)

    @torch.no_grad()
    def encode_moments(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = s * (mean + std * eps) (or s * mean without posterior sampling) from cached moments."""
        if not self.scale_known:
            raise RuntimeError("the latent scale is not set yet: call set_scale_from(latents) first (scale_by_std)")
        return self.unscaled_from_moments(moments, generator) * self.scale_factor.to(moments.dtype)

    def unscaled_from_moments(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """E(x) from cached (mean, std): a posterior sample (reparameterised, Kingma & Welling 2014 Eq. 10) or its mean."""
        mean, std = moments.chunk(2, dim=1)
        if not self.sample_posterior:
            return mean
        return reparameterise(mean, std, generator)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = s * E(x) for images x in [-1, 1]."""
        if not self.scale_known:
            raise RuntimeError("the latent scale is not set yet: call set_scale_from(latents) first (scale_by_std)")
        return self.encode_unscaled(x, generator) * self.scale_factor.to(x.dtype)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """x = D(z / s), images in [-1, 1] (not clamped)."""
        out = self.autoencoder.decode(z / self.scale_factor.to(z.dtype))
        return getattr(out, "sample", out)

    def set_scale_from(self, count: Tensor, total: Tensor, total_sq: Tensor) -> float:
        """s = 1 / std of the latents summarised by (count, sum, sum of squares) (summed over ranks by the
        caller); refuses a zero or non-finite result."""
        mean = total / count
        var = (total_sq / count - mean**2).clamp_min(0.0)
        scale = float(1.0 / var.sqrt())
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale_by_std gave scale_factor={scale!r} (latent variance {float(var)!r}); the first "
                             "stage encodes this data to constant or non-finite latents: check first_stage.ckpt_path")
        self.scale_factor.fill_(scale)
        return scale


def latent_moments(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum, sum of squares) of all entries of z in float64: summable over ranks for scale_by_std."""
    z = z.detach().double()
    return torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device), z.sum(), z.square().sum()
