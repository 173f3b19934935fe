"""The DDPM U-Net (Ho et al. 2020, App. B): the TF `diffusion_tf/models/unet.py` topology.

Same layout as diffusers' UNet2DModel with the google/ddpm-cifar10-32 config: per resolution
`num_res_blocks` ResBlocks (each followed by attention at `attn_resolutions`) on the way down,
`num_res_blocks + 1` ResBlocks fed by skip concatenations on the way up, and a
ResBlock-Attn-ResBlock middle at the lowest resolution. The net knows nothing of schedules:
net(x_t, t, cond) -> (B, out_channels, H, W).

Text conditioning (Rombach et al. 2022, Sec. 3.3): with a `text_encoder` the net owns it (trained
jointly, or frozen), encodes cond.tokens into token embeddings, adds the pooled embedding to the time
embedding, and cross-attends to the tokens in a SpatialTransformer after every block at
`cross_attention_resolutions` and in the middle. A text net called without a prompt sees the empty
prompt, its null condition for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataclasses import replace

from difflab.nets.attention import SpatialTransformer
from difflab.nets.conditioning import Conditioning
from difflab.nets.blocks import AttnBlock, Downsample, ResBlock, Upsample, conv2d, group_norm, linear
from difflab.nets.embeddings import SinusoidalEmbedding


class ResAttn(nn.Module):
    """A ResBlock optionally followed by an AttnBlock (one `block_i` / `attn_i` pair of the DDPM code)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float,
        attn: bool,
        num_heads: int,
        scale_shift_norm: bool = False,
        context_dim: int | None = None,
        cross_attention_heads: int = 4,
    ) -> None:
        super().__init__()
        self.res = ResBlock(
            in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, dropout=dropout,
            scale_shift_norm=scale_shift_norm,
        )
        self.attn = AttnBlock(channels=out_channels, num_heads=num_heads) if attn else nn.Identity()
        self.xattn = None if context_dim is None else SpatialTransformer(
            channels=out_channels, context_dim=context_dim, heads=cross_attention_heads)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.attn(self.res(x, temb))
        return h if self.xattn is None else self.xattn(h, context, mask)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


def _positive_ints(name: str, values: Sequence[int], *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}={values!r} must be a sequence of positive ints")
    out = tuple(values)
    if not out and not allow_empty:
        raise ValueError(f"{name}={out} must not be empty")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={out} contains {v!r}; entries must be positive ints")
    return out


def _check_resolutions(image_size: int, ch_mult: tuple[int, ...], attn_resolutions: tuple[int, ...],
                       name: str = "attn_resolutions") -> None:
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor != 0:
        raise ValueError(
            f"image_size={image_size} is not divisible by {factor}, the total downsampling of "
            f"ch_mult={ch_mult}; use a multiple of {factor}"
        )
    visited = tuple(image_size // 2**i for i in range(len(ch_mult)))
    for r in attn_resolutions:
        if r not in visited:
            raise ValueError(
                f"{name}={attn_resolutions} contains {r}, a resolution this net never visits; "
                f"allowed for image_size={image_size} and ch_mult={ch_mult}: {visited}"
            )


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020, App. B); `ddpm_cifar10` settings give 35.7M parameters.

    text_encoder (nets/text.py: forward(tokens, mask) -> (token embeddings, pooled), `width`, `tokenizer`)
    makes it a text-to-image net with cross-attention at cross_attention_resolutions (LDM Sec. 3.3).
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_classes: int | None = None,
        channels_last: bool = False,
        scale_shift_norm: bool = False,
        text_encoder: nn.Module | None = None,
        cross_attention_resolutions: Sequence[int] = (),
        cross_attention_heads: int = 4,
        pooled_text: bool = True,
    ) -> None:
        super().__init__()
        self.scale_shift_norm = bool(scale_shift_norm)  # iDDPM's FiLM time conditioning in every ResBlock
        self.image_size = _positive_int("image_size", image_size)
        self.in_channels = _positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = _positive_int("out_channels", out_channels)
        self.ch = _positive_int("ch", ch)
        self.ch_mult = _positive_ints("ch_mult", ch_mult, allow_empty=False)
        self.num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _positive_ints("attn_resolutions", attn_resolutions, allow_empty=True)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_classes = None if num_classes is None else _positive_int("num_classes", num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.dropout = float(dropout)
        _check_resolutions(self.image_size, self.ch_mult, self.attn_resolutions)
        self.text_encoder = text_encoder
        self.cross_attention_resolutions = _positive_ints(
            "cross_attention_resolutions", cross_attention_resolutions, allow_empty=True)
        self.cross_attention_heads = _positive_int("cross_attention_heads", cross_attention_heads)
        self.context_dim = None if text_encoder is None else _positive_int("text_encoder.width", text_encoder.width)
        if text_encoder is not None and num_classes is not None:
            raise ValueError(f"a net conditions on class labels (num_classes={num_classes}) or on text "
                             "(text_encoder), not both; set model.num_classes=null for a text model")
        if text_encoder is None and self.cross_attention_resolutions:
            raise ValueError(f"cross_attention_resolutions={self.cross_attention_resolutions} needs a text encoder "
                             "(text_encoder=scratch|clip); use () for a net without text")
        _check_resolutions(self.image_size, self.ch_mult, self.cross_attention_resolutions, "cross_attention_resolutions")

        temb_ch = 4 * ch
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(dim=ch), linear(ch, temb_ch), nn.SiLU(), linear(temb_ch, temb_ch)
        )
        # index num_classes is the null label (cond=None, classifier-free guidance dropout)
        self.class_embed = None if num_classes is None else nn.Embedding(num_classes + 1, temb_ch)
        # the pooled prompt embedding joins the time embedding (as class embeddings do)
        self.pooled_embed = linear(self.context_dim, temb_ch) if text_encoder is not None and pooled_text else None
        self.conv_in = conv2d(in_channels, ch, kernel_size=3)
        skip_channels = self._build_down(temb_ch)
        self._build_mid(temb_ch)
        self._build_up(temb_ch, skip_channels)
        self.norm_out = group_norm(ch * self.ch_mult[0], act="silu")
        self.conv_out = conv2d(ch * self.ch_mult[0], self.out_channels, kernel_size=3, scale=0.0)
        # NHWC activations and weights: oneDNN's convolutions skip their NCHW reorders (faster on CPU,
        # tensor cores on GPU); the math is unchanged (tests/test_nets.py)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _stage(self, in_ch: int, out_ch: int, temb_ch: int, resolution: int) -> ResAttn:
        return ResAttn(
            in_channels=in_ch,
            out_channels=out_ch,
            temb_channels=temb_ch,
            dropout=self.dropout,
            attn=resolution in self.attn_resolutions,
            num_heads=self.num_heads,
            scale_shift_norm=self.scale_shift_norm,
            context_dim=self.context_dim if resolution in self.cross_attention_resolutions else None,
            cross_attention_heads=self.cross_attention_heads,
        )

    def _build_down(self, temb_ch: int) -> list[int]:
        """Create the encoder; return the channel count of every skip activation, in push order."""
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = [self.ch]
        in_ch = self.ch
        for level, mult in enumerate(self.ch_mult):
            resolution = self.image_size // 2**level
            blocks = nn.ModuleList()
            for _ in range(self.num_res_blocks):
                blocks.append(self._stage(in_ch, self.ch * mult, temb_ch, resolution))
                in_ch = self.ch * mult
                skip_channels.append(in_ch)
            self.down_blocks.append(blocks)
            if level != len(self.ch_mult) - 1:
                self.downsamples.append(Downsample(channels=in_ch))
                skip_channels.append(in_ch)
        return skip_channels

    def _build_mid(self, temb_ch: int) -> None:
        """Create the ResBlock-Attn-ResBlock middle at the lowest resolution (always attends)."""
        mid_ch = self.ch * self.ch_mult[-1]
        self.mid_block1 = ResBlock(
            in_channels=mid_ch, out_channels=mid_ch, temb_channels=temb_ch, dropout=self.dropout,
            scale_shift_norm=self.scale_shift_norm,
        )
        self.mid_attn = AttnBlock(channels=mid_ch, num_heads=self.num_heads)
        self.mid_xattn = None if self.text_encoder is None else SpatialTransformer(
            channels=mid_ch, context_dim=self.context_dim, heads=self.cross_attention_heads)
        self.mid_block2 = ResBlock(
            in_channels=mid_ch, out_channels=mid_ch, temb_channels=temb_ch, dropout=self.dropout,
            scale_shift_norm=self.scale_shift_norm,
        )

    def _build_up(self, temb_ch: int, skip_channels: list[int]) -> None:
        """Create the decoder, consuming `skip_channels` from the end (the order forward pops them)."""
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        skip_channels = list(skip_channels)
        in_ch = self.ch * self.ch_mult[-1]
        for level in reversed(range(len(self.ch_mult))):
            resolution = self.image_size // 2**level
            blocks = nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                out_ch = self.ch * self.ch_mult[level]
                blocks.append(self._stage(in_ch + skip_channels.pop(), out_ch, temb_ch, resolution))
                in_ch = out_ch
            self.up_blocks.append(blocks)
            if level != 0:
                self.upsamples.append(Upsample(channels=in_ch))
        assert not skip_channels, f"unconsumed skip channels {skip_channels}"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor, t: Tensor | float, cond: Conditioning | None = None) -> Tensor:
        # x: (B, C_in, H, W), t: (B,) or scalar, cond.labels: (B,) int labels in [0, num_classes] or None,
        # or cond.tokens/token_mask (B, L) (or their encoded cond.context/pooled) for a text net
        self._check_input(x)
        labels = self._cond_labels(cond)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C_in, H, W) stored NHWC
        temb = self.time_embed(self._broadcast_t(t, x))  # (B, 4ch)
        if self.class_embed is not None:
            temb = temb + self.class_embed(self._labels(labels, x))  # (B, 4ch)
        elif labels is not None:
            raise ValueError(
                "cond.labels was given but this UNet has num_classes=None; pass num_classes to condition"
            )
        context = mask = None
        if self.text_encoder is not None:
            text = self.encode_condition(cond if cond is not None and cond.tokens is not None
                                         else self.null_condition(x.shape[0], x.device))
            context, mask = text.context, text.token_mask  # (B, L, D), (B, L)
            if self.pooled_embed is not None:
                temb = temb + self.pooled_embed(text.pooled.to(temb.dtype))  # (B, 4ch)
        hs = self._down(self.conv_in(x), temb, context, mask)
        h = self.mid_attn(self.mid_block1(hs[-1], temb))
        if self.mid_xattn is not None:
            h = self.mid_xattn(h, context, mask)
        h = self.mid_block2(h, temb)  # (B, ch*ch_mult[-1], h, w)
        h = self._up(h, hs, temb, context, mask)  # (B, ch*ch_mult[0], H, W)
        return self.conv_out(self.norm_out(h))  # conv(silu(norm(h))): (B, C_out, H, W)

    def prompt_condition(self, prompts: Sequence[str], device: torch.device | None = None) -> Conditioning:
        """The tokens and mask of `prompts` in this net's tokenizer (a text net only)."""
        if self.text_encoder is None:
            raise ValueError("prompts were given but this net has no text encoder (train with text_encoder=scratch|clip)")
        tokens, mask = self.text_encoder.tokenizer(list(prompts))
        device = device or self.conv_in.weight.device
        return Conditioning(tokens=tokens.to(device), token_mask=mask.to(device))

    def null_condition(self, batch_size: int, device: torch.device | None = None) -> Conditioning:
        """The empty prompt for every sample: the null condition of classifier-free guidance on text."""
        return self.prompt_condition([""] * batch_size, device)

    def encode_condition(self, cond: Conditioning) -> Conditioning:
        """cond with context/pooled set from its tokens (unchanged if already encoded): generate() calls it once."""
        if self.text_encoder is None or cond.context is not None:
            return cond
        if cond.tokens is None or cond.token_mask is None:
            raise ValueError("a text net needs cond.tokens and cond.token_mask (use prompt_condition(prompts))")
        if self.text_encoder.trainable:
            context, pooled = self.text_encoder(cond.tokens, cond.token_mask)
        else:  # a frozen encoder never trains, whatever the caller's grad mode
            with torch.no_grad():
                context, pooled = self.text_encoder(cond.tokens, cond.token_mask)
        return replace(cond, context=context, pooled=pooled)

    def _down(self, h: Tensor, temb: Tensor, context: Tensor | None, mask: Tensor | None) -> list[Tensor]:
        hs = [h]  # (B, ch, H, W)
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                hs.append(block(hs[-1], temb, context, mask))  # (B, ch*ch_mult[level], H/2**level, W/2**level)
            if level < len(self.downsamples):
                hs.append(self.downsamples[level](hs[-1]))  # halves H and W
        return hs

    def _up(self, h: Tensor, hs: list[Tensor], temb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        for i, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb, context, mask)  # concat skip on channels
            if i < len(self.upsamples):
                h = self.upsamples[i](h)  # doubles H and W
        return h

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels but this UNet has in_channels={self.in_channels}")
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"x has spatial size {h}x{w} but this UNet has image_size={self.image_size} "
                f"(expects {self.image_size}x{self.image_size})"
            )

    @staticmethod
    def _broadcast_t(t: Tensor | float, x: Tensor) -> Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            return t.expand(B)  # (B,)
        if t.shape != (B,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or shape ({B},)")
        return t

    def _cond_labels(self, cond: Conditioning | None) -> Tensor | None:
        """The class labels of `cond` (checking it sets only the fields this net reads); refuses a bare tensor."""
        if cond is None:
            return None
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond must be a difflab.nets.Conditioning or None, got {type(cond).__name__}; "
                            "wrap class labels as Conditioning(labels=y)")
        reads = {"labels"} if self.text_encoder is None else {"tokens", "token_mask", "context", "pooled"}
        unread = sorted(set(cond.tensors()) - reads)
        if unread:
            what = "a prompt (tokens, token_mask, context, pooled)" if self.text_encoder is not None else "labels"
            raise ValueError(f"cond sets {unread}, which this UNet does not read (it reads {what})")
        return cond.labels

    def _labels(self, labels: Tensor | None, x: Tensor) -> Tensor:
        B = x.shape[0]
        if labels is None:
            return torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)  # null label
        if labels.shape != (B,):
            raise ValueError(f"cond.labels has shape {tuple(labels.shape)}; expected ({B},) class indices")
        return labels
