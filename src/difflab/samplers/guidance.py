"""Guidance as wrappers of the network call: classifier-free (Ho & Salimans 2022) and classifier gradients (Dhariwal & Nichol 2021).

Samplers stay unchanged: classifier-free guidance builds a model_fn(x_t, t) from a conditional
net_fn(x_t, t, cond) and the conditioning's null version; classifier guidance builds the cond_fn(x_t, t) = s grad log p(y | x_t) that
DDPM adds to its mean (times Sigma) and DDIM subtracts from eps (times sqrt(1 - alpha_bar)).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.nets.conditioning import Conditioning
from difflab.samplers.base import CondFn, ModelFn

NetFn = Callable[[Tensor, Tensor, Conditioning | None], Tensor]  # net(x_t, t, cond) -> output


def guided_output(cond: Tensor, uncond: Tensor, w: float, mean_channels: int) -> Tensor:
    """uncond + w (cond - uncond) on the first mean_channels (the eps/x0/v prediction); the rest (a learned variance) from cond (Ho & Salimans 2022, Eq. 6 with w = 1 + their w)."""
    mean = uncond[:, :mean_channels] + w * (cond[:, :mean_channels] - uncond[:, :mean_channels])
    return torch.cat([mean, cond[:, mean_channels:]], dim=1)


def classifier_free_guidance(
    net_fn: NetFn, cond: Conditioning, null: Conditioning, *, guidance_scale: float, mean_channels: int
) -> ModelFn:
    """model_fn with w = guidance_scale: 0 the unconditional model, 1 the conditional one, > 1 guided (Ho & Salimans 2022, Eq. 6).

    w in {0, 1} costs one network call per step; any other w one batched call on 2B inputs.
    Combining outputs is the same for eps, x0 and v targets: each is affine in the output at fixed x_t.
    """
    w = float(guidance_scale)  # checked >= 0 by generate.Guidance
    if w == 1.0:
        return lambda x_t, t: net_fn(x_t, t, cond)
    if w == 0.0:
        return lambda x_t, t: net_fn(x_t, t, null)
    both = cond.cat(null)

    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        out = net_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # (2B, C', H, W)
        cond, uncond = out.chunk(2)
        return guided_output(cond, uncond, w, mean_channels)

    return model_fn


def classifier_grad(classifier: Callable[[Tensor, Tensor], Tensor], labels: Tensor, *, scale: float) -> CondFn:
    """cond_fn(x_t, t) = s grad_x log p_phi(y | x_t, t) from a noise-aware classifier's logits (Dhariwal & Nichol 2021, Algs. 1-2)."""
    def cond_fn(x_t: Tensor, t: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t.clone()).float(), dim=-1)  # (B, num_classes)
            selected = log_p[torch.arange(x.shape[0], device=x.device), labels.clone()]
            (grad,) = torch.autograd.grad(selected.sum(), x)
        return (scale * grad).to(x_t.dtype)

    return cond_fn


ImageEncoder = Callable[[Tensor, Tensor], Tensor]  # f_img(x_t, t) -> (B, D) unit vectors


def clip_grad(encode_image: ImageEncoder, text: Tensor, *, scale: float) -> CondFn:
    """cond_fn(x_t, t) = s grad_x cos(f_img(x_t, t), g_text) for unit text embeddings text (B, D) (GLIDE, Nichol et al. 2021, Sec. 3.2).

    DDPM adds Sigma cond_fn to its mean and DDIM subtracts sqrt(1 - alpha_bar) cond_fn from eps, as for classifier
    guidance; GLIDE's noised CLIP gives the gradient of f_img(x_t, t) . g(c), here of the cosine (unit vectors).
    """
    def cond_fn(x_t: Tensor, t: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            f = F.normalize(encode_image(x, t.clone()).float(), dim=-1)  # (B, D)
            cos = (f * text.clone().to(f.device)).sum(dim=-1)  # (B,)
            (grad,) = torch.autograd.grad(cos.sum(), x)
        return (scale * grad).to(x_t.dtype)

    return cond_fn


def summed(cond_fns: list[CondFn]) -> CondFn | None:
    """One cond_fn adding the gradients of several (classifier and CLIP guidance together); None for none."""
    if not cond_fns:
        return None
    if len(cond_fns) == 1:
        return cond_fns[0]
    return lambda x_t, t: sum(fn(x_t, t) for fn in cond_fns)
