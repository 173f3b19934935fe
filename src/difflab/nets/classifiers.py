"""Image classifiers: a small CNN whose penultimate layer gives FID/IS features for small data.

The role LeNet plays in MNIST papers: Inception-v3 features mean little on 8x8 digits, so FID/IS
of such data are computed on the `features(x)` of a classifier trained on the data itself. A
noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021) will live beside it and
can reuse `ConvBlock` and the trunk/head split.
"""

from __future__ import annotations

from torch import Tensor, nn

from difflab.nets.blocks import Downsample, ResBlock, conv2d, group_norm, linear, num_groups
from difflab.nets.embeddings import SinusoidalEmbedding

CH_MULT = (1, 2, 4)  # channels per resolution level, as multiples of ch; one stride-2 step between levels
MIN_IMAGE_SIZE = 2 ** (len(CH_MULT) - 1)  # every stride-2 step must halve something
MAX_NORM_GROUPS = 8  # small maps (2x2 at 8px input): 32 groups would normalise almost single values


def _positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def _classifier_sizes(image_size: object, in_channels: object, num_classes: object, ch: object, dropout: object, *,
                      min_image_size: int) -> tuple[int, int, int, int]:
    """(image_size, in_channels, num_classes, ch) checked; dropout checked to lie in [0, 1)."""
    sizes = (_positive_int("image_size", image_size, minimum=min_image_size), _positive_int("in_channels", in_channels),
             _positive_int("num_classes", num_classes, minimum=2), _positive_int("ch", ch))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    return sizes


class ConvBlock(nn.Module):
    """3x3 conv -> GroupNorm -> SiLU; stride 2 halves H and W (rounding up)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size=3, stride=stride)
        self.norm = nn.GroupNorm(num_groups(out_channels, max_groups=MAX_NORM_GROUPS), out_channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))  # (B, C_out, H / stride, W / stride)


class ImageClassifier(nn.Module):
    """Small CNN: conv stages at 1x, 1/2x, 1/4x resolution, global average pool, feature layer, linear head.

    features(x) -> (B, feature_dim), the penultimate activations used for FID/IS;
    forward(x) -> logits (B, num_classes). x is float in [-1, 1], shape (B, in_channels, S, S).
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        ch: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.image_size, self.in_channels, self.num_classes, self.ch = _classifier_sizes(
            image_size, in_channels, num_classes, ch, dropout, min_image_size=MIN_IMAGE_SIZE)
        self.num_features = _positive_int("feature_dim", feature_dim)
        self.trunk = self._build_trunk()
        trunk_ch = ch * CH_MULT[-1]
        self.feature = nn.Sequential(linear(trunk_ch, feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(dropout)
        self.head = linear(feature_dim, num_classes)

    def _build_trunk(self) -> nn.Sequential:
        """Two ConvBlocks per level; the first block of every level after the first has stride 2."""
        layers: list[nn.Module] = []
        in_ch = self.in_channels
        for level, mult in enumerate(CH_MULT):
            out_ch = self.ch * mult
            layers.append(ConvBlock(in_channels=in_ch, out_channels=out_ch, stride=1 if level == 0 else 2))
            layers.append(ConvBlock(in_channels=out_ch, out_channels=out_ch))
            in_ch = out_ch
        return nn.Sequential(*layers)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images x in [-1, 1]."""
        self._check_input(x)
        h = self.trunk(x)  # (B, 4ch, ceil(S/4), ceil(S/4))
        return self.feature(h.mean(dim=(2, 3)))  # global average pool (B, 4ch) -> (B, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes) logits

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"ImageClassifier expects x of shape (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels but this ImageClassifier has in_channels={self.in_channels}")
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"x has spatial size {h}x{w} but this ImageClassifier has image_size={self.image_size} "
                f"(expects {self.image_size}x{self.image_size})"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor in [-1, 1], got dtype {x.dtype}")


class NoisyImageClassifier(nn.Module):
    """Noise-aware classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

    The encoder half of a U-Net: time embedding, ResBlocks (time-conditioned) with a stride-2
    Downsample between levels, then GroupNorm-SiLU, global average pool and a linear head.
    forward(x_t, t) -> logits (B, num_classes); t are the diffusion timestep indices (B,).
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        num_classes: int,
        ch: int = 32,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_size, self.in_channels, self.num_classes, self.ch = _classifier_sizes(
            image_size, in_channels, num_classes, ch, dropout, min_image_size=2 ** (len(ch_mult) - 1))
        self.time_embed, self.conv_in, self.blocks, in_ch = noisy_encoder(
            in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, dropout=dropout)
        self.norm_out = group_norm(in_ch, act="silu")
        self.head = linear(in_ch, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        # x: (B, C, H, W) noisy images x_t, t: (B,) timestep indices
        h = run_noisy_encoder(self.time_embed, self.conv_in, self.blocks, x, t)  # (B, C', H', W')
        return self.head(self.norm_out(h).mean(dim=(2, 3)))  # silu(norm(h)) pooled: (B, C') -> (B, num_classes)


def noisy_encoder(*, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                  dropout: float) -> tuple[nn.Sequential, nn.Conv2d, nn.ModuleList, int]:
    """The encoder half of a U-Net (Dhariwal & Nichol 2021, Sec. 4): time embedding (width 4ch), input conv, then per
    level num_res_blocks time-conditioned ResBlocks with a stride-2 Downsample between levels; and its output width."""
    temb = 4 * ch
    time_embed = nn.Sequential(SinusoidalEmbedding(dim=ch), linear(ch, temb), nn.SiLU(), linear(temb, temb))
    conv_in = conv2d(in_channels, ch, kernel_size=3)  # created in this order: the same initial weights for a seed
    blocks, in_ch = nn.ModuleList(), ch
    for level, mult in enumerate(ch_mult):
        for _ in range(_positive_int("num_res_blocks", num_res_blocks)):
            blocks.append(ResBlock(in_channels=in_ch, out_channels=ch * mult, temb_channels=temb, dropout=dropout))
            in_ch = ch * mult
        if level != len(ch_mult) - 1:
            blocks.append(Downsample(channels=in_ch))
    return time_embed, conv_in, blocks, in_ch


def run_noisy_encoder(time_embed: nn.Module, conv_in: nn.Module, blocks: nn.ModuleList, x: Tensor, t: Tensor) -> Tensor:
    """noisy_encoder's forward: x (B, C, H, W) at timestep indices t (B,) -> the last level's activations."""
    temb = time_embed(t)  # (B, 4ch)
    h = conv_in(x)
    for block in blocks:
        h = block(h, temb) if isinstance(block, ResBlock) else block(h)
    return h
