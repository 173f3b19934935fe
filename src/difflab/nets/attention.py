"""Cross-attention to text tokens: LDM's SpatialTransformer (Rombach et al. 2022, Sec. 3.3 and Fig. 3).

A block at a U-Net resolution: GroupNorm, a 1x1 projection to tokens (one per pixel), one pre-norm
transformer layer (self-attention over pixels, cross-attention from pixels to the text tokens with
the padding mask respected, a GEGLU feed-forward), a zero-initialised 1x1 projection back, and a
residual: the block is the identity at initialisation, so adding it to a net changes nothing until it
learns. Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V (Vaswani et al. 2017, Eq. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.nets.blocks import conv2d, group_norm


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, N, C) to context (B, L, D) (to x itself when context is None)."""

    def __init__(self, *, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int | None = None) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads={heads} must be a positive int")
        dim_head = query_dim // heads if dim_head is None else dim_head
        if dim_head < 1:
            raise ValueError(f"query_dim={query_dim} gives no channel per head for heads={heads}")
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, N, C); mask (B, L) bool, True = a real token (False keys get no weight)."""
        B, N, _ = x.shape
        context = x if context is None else context.to(x.dtype)
        q = self.to_q(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(B, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(B, -1, self.heads, self.dim_head).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        return self.to_out(h.transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """The gated feed-forward of LDM's transformer: (x W + b) split in halves a, g -> a * GELU(g) (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each with a residual (LDM's BasicTransformerBlock)."""

    def __init__(self, *, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = CrossAttention(query_dim=dim, heads=heads)
        self.cross_attn = CrossAttention(query_dim=dim, context_dim=context_dim, heads=heads)
        self.ff = GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """x + proj_out(transformer(proj_in(norm(x)), context)) over the H*W pixels of x (LDM Sec. 3.3); zero-initialised output."""

    def __init__(self, *, channels: int, context_dim: int, heads: int = 4) -> None:
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"cross_attention_heads={heads} must be a positive divisor of the block's channels={channels}")
        self.norm = group_norm(channels)
        self.proj_in = conv2d(channels, channels, kernel_size=1)
        self.block = TransformerBlock(dim=channels, context_dim=context_dim, heads=heads)
        self.proj_out = conv2d(channels, channels, kernel_size=1, scale=0.0)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), context (B, L, D), mask (B, L) bool -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C) tokens
        h = self.block(h, context, mask)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), stored NHWC
        return x + self.proj_out(h)
