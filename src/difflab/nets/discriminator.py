"""The PatchGAN discriminator of pix2pix (Isola et al. 2017, Sec. 3.2.2) as the latent-diffusion first stage
trains with it (LDM's NLayerDiscriminator, from taming-transformers): stride-2 4x4 convs, BatchNorm, LeakyReLU
0.2, one logit per overlapping patch."""

from __future__ import annotations

from torch import Tensor, nn

KERNEL, PAD = 4, 1


def output_size(image_size: int, num_layers: int) -> int:
    """Side of the logit map for an image_size input: num_layers stride-2 convs, then two stride-1 4x4 convs."""
    size = image_size
    for _ in range(num_layers):
        size = (size + 2 * PAD - KERNEL) // 2 + 1
    return size - 2  # two stride-1 convs, kernel 4, padding 1: each loses one pixel


def _init(module: nn.Module) -> None:
    """pix2pix's weights_init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02), zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """x (B, C, H, W) -> patch logits (B, 1, h, w) (Isola et al. 2017, App. 6.1.2: 70x70 PatchGAN at num_layers=3)."""

    def __init__(self, *, in_channels: int, image_size: int, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1 or channels < 1:
            raise ValueError(f"num_layers={num_layers} and channels={channels} must be positive ints")
        if output_size(image_size, num_layers) < 1:
            fits = max((n for n in range(1, num_layers) if output_size(image_size, n) >= 1), default=None)
            raise ValueError(
                f"a PatchGAN discriminator with num_layers={num_layers} leaves no logits for image_size={image_size} "
                f"(it needs image_size >= 3 * 2^num_layers); use num_layers={fits}" if fits else
                f"image_size={image_size} is too small for a PatchGAN discriminator (it needs at least 6)")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, KERNEL, stride=2, padding=PAD), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last of these keeps the size (pix2pix's n_layers + 1-th conv)
            layers += [nn.Conv2d(channels * prev, channels * mult, KERNEL, stride=stride, padding=PAD, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, KERNEL, stride=1, padding=PAD))
        self.main = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, h, w) one logit per patch
