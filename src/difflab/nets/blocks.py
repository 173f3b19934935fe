"""Building blocks of the DDPM U-Net (Ho et al. 2020, App. B; PixelCNN++ / Wide ResNet backbone).

Initialisation follows the DDPM TF code (`nn.default_init`): Xavier-uniform weights (variance
scaling, fan_avg) and zero biases; the layers the paper's code marks `init_scale=0.` (the last
conv of a ResBlock, the attention output projection, the U-Net's output conv) start at exactly
zero, so every residual branch is the identity at initialisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.dropout import Dropout
from difflab.nets.group_norm import GroupNorm

GROUP_NORM_EPS = 1e-6  # as the DDPM TF code and diffusers' google/ddpm-cifar10-32 config


def num_groups(channels: int, *, max_groups: int = 32) -> int:
    """Largest divisor of `channels` not above `max_groups` (32 whenever 32 divides channels, as in DDPM)."""
    if channels < 1:
        raise ValueError(f"channels={channels} must be a positive int")
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def group_norm(channels: int, *, act: Literal["none", "silu"] = "none") -> GroupNorm:
    """GroupNorm (Wu & He 2018) with `num_groups(channels)` groups, eps 1e-6, then `act` (fused on CPU NHWC)."""
    return GroupNorm(num_groups(channels), channels, eps=GROUP_NORM_EPS, act=act)


def ddpm_init_(layer: nn.Conv2d | nn.Linear, *, scale: float = 1.0) -> None:
    """DDPM `default_init(scale)`: variance scaling (fan_avg, uniform), zero bias; 0 gives zeros."""
    if scale == 0.0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def conv2d(
    in_ch: int, out_ch: int, *, kernel_size: int, stride: int = 1, scale: float = 1.0
) -> nn.Conv2d:
    """Same-padded conv with DDPM init; padding is symmetric (diffusers, improved-diffusion)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)
    ddpm_init_(conv, scale=scale)
    return conv


def linear(in_features: int, out_features: int, *, scale: float = 1.0) -> nn.Linear:
    """Linear layer with DDPM initialisation."""
    layer = nn.Linear(in_features, out_features)
    ddpm_init_(layer, scale=scale)
    return layer


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (Ho et al. 2020, App. B; `resnet_block` of the TF code).

    scale_shift_norm=False adds a projected embedding as a bias (DDPM); True modulates the second
    GroupNorm as norm(h) * (1 + scale) + shift (Nichol & Dhariwal 2021, improved-diffusion's
    use_scale_shift_norm; FiLM-style, as in BigGAN).
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
        scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        self.scale_shift_norm = bool(scale_shift_norm)
        self.norm1 = group_norm(in_channels, act="silu")
        self.conv1 = conv2d(in_channels, out_channels, kernel_size=3)
        self.temb_proj = linear(temb_channels, 2 * out_channels if self.scale_shift_norm else out_channels)
        # SiLU follows the norm directly unless the FiLM scale/shift comes between them
        self.norm2 = group_norm(out_channels, act="none" if self.scale_shift_norm else "silu")
        self.dropout = Dropout(dropout)
        self.conv2 = conv2d(out_channels, out_channels, kernel_size=3, scale=0.0)
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        # x: (B, C_in, H, W), temb: (B, T)
        h = self.conv1(self.norm1(x))  # silu(norm1(x)): (B, C_out, H, W)
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)  # each (B, C_out, 1, 1)
            h = self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift))
        else:
            h = self.norm2(h + emb, self.dropout)  # dropout(silu(norm2(h + emb))), one kernel on CPU NHWC
        h = self.conv2(h)  # (B, C_out, H, W)
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over pixels with a residual (Ho et al. 2020, App. B; Wang et al. 2018)."""

    def __init__(self, *, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must be a positive divisor of channels={channels}"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = conv2d(channels, channels, kernel_size=1, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        nh, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # a view when qkv is channels_last, one copy otherwise
        qkv = qkv.permute(0, 2, 3, 1).reshape(B, H * W, 3, nh, d)  # (B, L, 3, nh, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, L, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, d), scale d**-0.5
        h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W) channels_last
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv halving H and W (Ho et al. 2020, `downsample` with_conv=True)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 conv (Ho et al. 2020, `upsample` with_conv=True)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, kernel_size=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
