"""Contrastive image-text objective of CLIP (Radford et al. 2021): the symmetric InfoNCE loss (van den Oord et al. 2018).

Notation: logits (B, B) = exp(logit_scale) * f_img @ g_text^T for B matched pairs, pair i on the diagonal;
rows are images, columns prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def symmetric_info_nce(logits_per_image: Tensor) -> Tensor:
    """(CE(logits, i -> i) + CE(logits^T, i -> i)) / 2 over the batch (Radford et al. 2021, Fig. 3 pseudocode)."""
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"logits_per_image must be square (B, B), got shape {tuple(logits_per_image.shape)}")
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets))
