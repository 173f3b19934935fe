"""The losses the latent-diffusion first stage is trained with (Rombach et al. 2022, App. G; Esser et al. 2021,
Eq. 4-7): pixel reconstruction, hinge GAN losses and the adaptive weight of the GAN term.

Notation: x the images, x̂ the reconstructions, D the discriminator's patch logits, G the decoder;
L_rec is summed over pixels and averaged over the batch, as LDM's `nll_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ADAPTIVE_EPS = 1e-4  # LDM's denominator guard
ADAPTIVE_MAX = 1e4   # LDM's clamp of the adaptive weight


def reconstruction_loss(x: Tensor, x_hat: Tensor, *, l1_weight: float = 1.0, l2_weight: float = 0.0) -> Tensor:
    """Per-sample pixel loss (B,): sum over pixels of l1 |x - x̂| + l2 (x - x̂)^2 (LDM's rec_loss, L1 by default)."""
    diff = x_hat.float() - x.float()
    loss = l1_weight * diff.abs()
    if l2_weight:
        loss = loss + l2_weight * diff.pow(2)
    return loss.flatten(1).sum(dim=1)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x̂))]) (Lim & Ye 2017; LDM's hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """The decoder's GAN loss -E[D(x̂)] (Esser et al. 2021, Eq. 5 with the hinge discriminator)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, disc_weight: float = 1.0) -> Tensor:
    """lambda = disc_weight * ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, 1e4] and
    detached (Esser et al. 2021, Eq. 7): G_L is the decoder's last layer."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach() * disc_weight
