"""Networks: nn.Modules only, called as net(x_t, t_or_sigma, cond=None)."""

from difflab.nets.blocks import AttnBlock, Downsample, ResBlock, Upsample
from difflab.nets.conditioning import Conditioning
from difflab.nets.embeddings import SinusoidalEmbedding, timestep_embedding
from difflab.nets.unet import UNet

__all__ = [
    "AttnBlock",
    "Conditioning",
    "Downsample",
    "ResBlock",
    "SinusoidalEmbedding",
    "UNet",
    "Upsample",
    "timestep_embedding",
]
