"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G): the first stage.

An encoder maps x (B, C, H, W) in [-1, 1] to the moments of a diagonal Gaussian posterior
q(z | x) = N(mu, diag sigma^2) over z (B, z_channels, H / f, W / f), f = 2^(len(ch_mult) - 1); a decoder
maps z back to pixels. The layout is CompVis/latent-diffusion's Encoder / Decoder: per level
`num_res_blocks` ResBlocks (with self-attention at `attn_resolutions`) and a stride-2 conv between
levels, a ResBlock-Attn-ResBlock middle at the lowest resolution, GroupNorm-SiLU-conv out; the
decoder mirrors it with `num_res_blocks + 1` blocks per level and nearest upsampling. Between them
sit LDM's 1x1 `quant_conv` (moments) and `post_quant_conv` (z). No time input and no skip connections
between encoder and decoder: everything the decoder sees passes through z.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from difflab.nets.blocks import AttnBlock, Downsample, Upsample, conv2d, group_norm
from difflab.nets.dropout import Dropout
from difflab.nets.unet import _check_resolutions, _positive_int, _positive_ints

FACTORS = (1, 2, 4, 8)  # downsampling factors f = 2^(len(ch_mult) - 1) the LDM first stages use
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior's log-variance


def reparameterise(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mean + std * eps, eps ~ N(0, I) (Kingma & Welling 2014, Eq. 10)."""
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag var) from moments (B, 2 z_channels, h, w) (Kingma & Welling 2014; LDM's
    DiagonalGaussianDistribution): the first z_channels are the mean, the rest the log-variance."""

    def __init__(self, moments: Tensor) -> None:
        if moments.ndim != 4 or moments.shape[1] % 2 != 0:
            raise ValueError(f"moments must be (B, 2 z_channels, h, w), got shape {tuple(moments.shape)}")
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, z_channels, h, w)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A draw of q(z | x) (reparameterise)."""
        return reparameterise(self.mean, self.std, generator)

    def mode(self) -> Tensor:
        """The posterior's mode, its mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q(z | x) || N(0, I)) per sample (B,): 0.5 sum(mu^2 + var - 1 - log var) (Kingma & Welling 2014,
        App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """ResBlock without a time input (LDM's ResnetBlock, temb_channels=0): x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, act="silu")
        self.conv1 = conv2d(in_channels, out_channels, kernel_size=3)
        self.norm2 = group_norm(out_channels, act="silu")
        self.dropout = Dropout(dropout)
        self.conv2 = conv2d(out_channels, out_channels, kernel_size=3, scale=0.0)
        self.skip = nn.Identity() if in_channels == out_channels else conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))  # (B, C_out, H, W)
        h = self.conv2(self.norm2(h, self.dropout))  # dropout(silu(norm2(h))), then conv
        return self.skip(x) + h


def _level(in_ch: int, out_ch: int, n: int, attn: bool, dropout: float) -> nn.Sequential:
    """n ResnetBlocks (in_ch -> out_ch, then out_ch -> out_ch), each followed by self-attention if attn."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(ResnetBlock(in_channels=in_ch if i == 0 else out_ch, out_channels=out_ch, dropout=dropout))
        if attn:
            layers.append(AttnBlock(channels=out_ch))
    return nn.Sequential(*layers)


def _middle(channels: int, dropout: float) -> nn.Sequential:
    """ResnetBlock - self-attention - ResnetBlock at the lowest resolution (LDM's `mid`)."""
    return nn.Sequential(ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout),
                         AttnBlock(channels=channels),
                         ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout))


class Encoder(nn.Module):
    """x (B, C, H, W) -> moments (B, 2 z_channels, H / f, W / f) (LDM's Encoder with double_z=True)."""

    def __init__(self, *, image_size: int, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], z_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = conv2d(in_channels, ch, kernel_size=3)
        layers: list[nn.Module] = []
        in_ch = ch
        for level, mult in enumerate(ch_mult):
            resolution = image_size // 2**level
            layers.append(_level(in_ch, ch * mult, num_res_blocks, resolution in attn_resolutions, dropout))
            in_ch = ch * mult
            if level != len(ch_mult) - 1:
                layers.append(Downsample(channels=in_ch))
        self.down = nn.Sequential(*layers)
        self.mid = _middle(in_ch, dropout)
        self.norm_out = group_norm(in_ch, act="silu")
        self.conv_out = conv2d(in_ch, 2 * z_channels, kernel_size=3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, ch * ch_mult[-1], H / f, W / f)
        return self.conv_out(self.norm_out(h))  # (B, 2 z_channels, H / f, W / f)


class Decoder(nn.Module):
    """z (B, z_channels, H / f, W / f) -> x (B, C, H, W) (LDM's Decoder)."""

    def __init__(self, *, image_size: int, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], z_channels: int, dropout: float) -> None:
        super().__init__()
        in_ch = ch * ch_mult[-1]
        self.conv_in = conv2d(z_channels, in_ch, kernel_size=3)
        self.mid = _middle(in_ch, dropout)
        layers: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            resolution = image_size // 2**level
            layers.append(_level(in_ch, ch * ch_mult[level], num_res_blocks + 1, resolution in attn_resolutions,
                                 dropout))
            in_ch = ch * ch_mult[level]
            if level != 0:
                layers.append(Upsample(channels=in_ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(in_ch, act="silu")
        self.conv_out = conv2d(in_ch, out_channels, kernel_size=3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (B, ch * ch_mult[0], H, W)
        return self.conv_out(self.norm_out(h))  # (B, C, H, W)


class AutoencoderKL(nn.Module):
    """The KL-regularised first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1): encode, sample, decode."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        z_channels: int,
        dropout: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = _positive_int("image_size", image_size)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.ch = _positive_int("ch", ch)
        self.ch_mult = _positive_ints("ch_mult", ch_mult, allow_empty=False)
        self.num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _positive_ints("attn_resolutions", attn_resolutions, allow_empty=True)
        self._z_channels = _positive_int("z_channels", z_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        if 2 ** (len(self.ch_mult) - 1) not in FACTORS:
            raise ValueError(f"ch_mult={self.ch_mult} gives the downsampling factor f = 2^{len(self.ch_mult) - 1} = "
                             f"{2 ** (len(self.ch_mult) - 1)}; allowed: f in {FACTORS} (1 to 4 entries in ch_mult)")
        _check_resolutions(self.image_size, self.ch_mult, self.attn_resolutions)
        shape = dict(image_size=self.image_size, ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                     attn_resolutions=self.attn_resolutions, z_channels=self._z_channels, dropout=float(dropout))
        self.encoder = Encoder(in_channels=self.in_channels, **shape)
        self.quant_conv = conv2d(2 * self._z_channels, 2 * self._z_channels, kernel_size=1)
        self.post_quant_conv = conv2d(self._z_channels, self._z_channels, kernel_size=1)
        self.decoder = Decoder(out_channels=self.in_channels, **shape)
        self.channels_last = bool(channels_last)  # NHWC + the NHWC GroupNorm kernel on CPU (as UNet)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def factor(self) -> int:
        """The downsampling factor f = 2^(len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def z_channels(self) -> int:
        return self._z_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, image_size / f, image_size / f): the shape of one image's latent."""
        return (self._z_channels, self.image_size // self.factor, self.image_size // self.factor)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output conv weight: where LDM's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) for x (B, C, H, W) in [-1, 1]."""
        self._check_shape("x", x, (self.in_channels, self.image_size, self.image_size))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2 z_channels, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """x (B, C, H, W) from z (B, z_channels, H / f, W / f)."""
        self._check_shape("z", z, self.latent_shape)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction (B, C, H, W), posterior): decode a posterior sample, or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check_shape(self, name: str, t: Tensor, expected: tuple[int, int, int]) -> None:
        if t.ndim != 4 or tuple(t.shape[1:]) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; this AutoencoderKL expects "
                             f"(B, {', '.join(map(str, expected))})")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
