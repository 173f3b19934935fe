"""mini_clip: a small CLIP (Radford et al. 2021) whose image tower reads noised images, for CLIP guidance (GLIDE, Nichol et al. 2021, Sec. 3.2).

Notation: x_t (B, C, H, W) a noised image at timestep index t (B,) (t = 0: a clean image), ids / mask (B, L) a
tokenized prompt, D = embed_dim. f_img(x_t, t) and g_text(ids, mask) are unit vectors in R^D; the logits of a
batch are exp(logit_scale) * f_img @ g_text^T. The image tower is the encoder half of a U-Net with a time
embedding (as the noise-aware classifier of classifier guidance); the text tower is a ScratchTextEncoder whose
pooled (end-of-text) output a Linear projects to D, so the same tower serves as a frozen text encoder of
text-to-image models (nets/text.py FrozenTextEncoder).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.blocks import group_norm
from difflab.nets.classifiers import noisy_encoder, run_noisy_encoder
from difflab.nets.text import ScratchTextEncoder

INIT_TEMPERATURE = 0.07  # CLIP's initial temperature tau: logit_scale = log(1 / tau)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the logit scale at 100 (Radford et al. 2021, Sec. 2.5)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


class NoisyImageEncoder(nn.Module):
    """f_img(x_t, t): time embedding, time-conditioned ResBlocks with stride-2 Downsamples, GroupNorm-SiLU,
    global average pool, Linear to embed_dim (unnormalised); the trunk of the noise-aware classifier
    (Dhariwal & Nichol 2021, Sec. 4) with an embedding instead of class logits."""

    def __init__(self, *, image_size: int, in_channels: int, embed_dim: int = 64, ch: int = 32,
                 ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        ch_mult = tuple(ch_mult)
        if not ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult={list(ch_mult)} must be a non-empty list of positive ints")
        self.image_size = _positive_int("image_size", image_size)
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size={image_size} is not divisible by {2 ** (len(ch_mult) - 1)}, the downsampling "
                             f"of ch_mult={list(ch_mult)}; use fewer levels")
        self.in_channels = _positive_int("in_channels", in_channels)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.time_embed, self.conv_in, self.blocks, in_ch = noisy_encoder(
            in_channels=in_channels, ch=_positive_int("ch", ch), ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            dropout=dropout)
        self.norm_out = group_norm(in_ch, act="silu")
        self.proj = nn.Linear(in_ch, embed_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"x has shape {tuple(x.shape)}; this image tower takes (B, {self.in_channels}, "
                             f"{self.image_size}, {self.image_size})")
        h = run_noisy_encoder(self.time_embed, self.conv_in, self.blocks, x, t)  # (B, C', H', W')
        return self.proj(self.norm_out(h).mean(dim=(2, 3)))  # (B, embed_dim)


class MiniCLIP(nn.Module):
    """Image tower f_img(x_t, t), text tower g_text(prompt) and a learned logit scale (CLIP, Radford et al. 2021).

    encode_image / encode_text return unit vectors (B, D); forward gives the (B, B) image-to-text logits
    exp(logit_scale) f_img(x_t, t) @ g_text^T. The logit scale starts at log(1 / 0.07) and is clamped to
    [0, log 100] (clamp_logit_scale_, called after every optimizer step).
    """

    def __init__(self, *, image_encoder: NoisyImageEncoder, text_encoder: ScratchTextEncoder,
                 init_temperature: float = INIT_TEMPERATURE) -> None:
        super().__init__()
        if not 0.0 < init_temperature <= 1.0:
            raise ValueError(f"init_temperature={init_temperature!r} must lie in (0, 1] (CLIP: 0.07)")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.width, image_encoder.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def image_size(self) -> int:
        return self.image_encoder.image_size

    @property
    def in_channels(self) -> int:
        return self.image_encoder.in_channels

    @property
    def tokenizer(self):  # noqa: ANN201 - the text tower's CLIPBPETokenizer
        return self.text_encoder.tokenizer

    def encode_image(self, x_t: Tensor, t: Tensor) -> Tensor:
        """f_img(x_t, t) / |f_img(x_t, t)|: (B, D)."""
        return F.normalize(self.image_encoder(x_t, t).float(), dim=-1)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """g_text / |g_text| of tokenized prompts: the projected end-of-text output, (B, D)."""
        _, pooled = self.text_encoder(ids, mask)  # (B, width)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """encode_text of prompts tokenized by the text tower, on this module's device: (B, D)."""
        ids, mask = self.tokenizer(list(prompts))
        device = self.logit_scale.device
        return self.encode_text(ids.to(device), mask.to(device))

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """logit_scale clamped in place to [0, log 100] (open_clip's clamp after each step; Radford et al. 2021, Sec. 2.5)."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def forward(self, x_t: Tensor, t: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """logits_per_image (B, B) = exp(logit_scale) f_img(x_t, t) @ g_text(ids, mask)^T (Radford et al. 2021, Fig. 3)."""
        return self.logit_scale.exp() * self.encode_image(x_t, t) @ self.encode_text(ids, mask).T
