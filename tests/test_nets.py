"""Tests of difflab.nets: the DDPM U-Net, its blocks and the timestep embedding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from difflab.nets import AttnBlock, Conditioning, UNet, timestep_embedding
from difflab.nets.blocks import num_groups

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.1)


def tiny_unet(**overrides) -> UNet:
    kwargs = dict(image_size=8, in_channels=1, attn_resolutions=(4,), **TINY)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomize_zero_init(UNet(**kwargs))


def randomize_zero_init(net: nn.Module) -> nn.Module:
    """Give the DDPM zero-initialised layers random weights, so outputs depend on every input."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.05)
    return net


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "out_channels"),
    [
        (dict(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,)), (2, 1, 16, 16), 1),
        (dict(image_size=32, in_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(16,)), (2, 3, 32, 32), 3),
        (dict(image_size=16, in_channels=3, out_channels=6, ch=32, ch_mult=(1, 2)), (2, 3, 16, 16), 6),
        (
            dict(image_size=8, in_channels=1, ch=16, ch_mult=(1, 3), attn_resolutions=(8, 4), num_heads=4),
            (3, 1, 8, 8),
            1,
        ),
        (dict(image_size=8, in_channels=2, ch=32, ch_mult=(2,), attn_resolutions=()), (1, 2, 8, 8), 2),
    ],
)
def test_output_shape(kwargs, x_shape, out_channels):
    net = UNet(num_res_blocks=1, **kwargs)
    out = net(torch.randn(x_shape), torch.randint(0, 1000, (x_shape[0],)))
    assert out.shape == (x_shape[0], out_channels, *x_shape[2:])


def test_ddpm_cifar10_parameter_count():
    net = UNet(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,), dropout=0.1)
    assert abs(net.num_parameters - 35.7e6) < 0.1e6
    assert net.num_parameters == 35_746_307  # diffusers' google/ddpm-cifar10-32 UNet2DModel


@pytest.mark.parametrize("name", ["default", "ddpm_cifar10"])
def test_model_configs_instantiate(name):
    data = {"image_size": 16, "channels": 1} if name == "default" else {"image_size": 32, "channels": 3}
    cfg = OmegaConf.create({"data": data, "model": OmegaConf.load(CONF_MODEL / f"{name}.yaml")})
    net = instantiate(cfg.model)
    assert isinstance(net, UNet) and isinstance(net.ch_mult, tuple)
    sizes = (net.image_size, net.in_channels, net.out_channels)
    assert sizes == (data["image_size"], data["channels"], data["channels"])
    if name == "ddpm_cifar10":
        assert net.num_parameters == 35_746_307


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(image_size=30), "image_size=30 is not divisible by 8"),
        (dict(image_size=32, attn_resolutions=(12,)), "contains 12"),
        (dict(image_size=32, attn_resolutions=(64,)), "(32, 16, 8, 4)"),
        (dict(image_size=32, attn_resolutions=(0,)), "contains 0"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(ch_mult=()), "ch_mult=()"),
        (dict(ch_mult=(1, 0)), "contains 0"),
        (dict(ch=0), "ch=0"),
        (dict(num_res_blocks=0), "num_res_blocks=0"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(num_classes=0), "num_classes=0"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=".*" + fragment.replace("(", r"\(").replace(")", r"\)")):
        UNet(**kwargs)


def test_bad_input_raises():
    net = tiny_unet()
    with pytest.raises(ValueError, match=r"7x7.*image_size=8"):
        net(torch.randn(2, 1, 7, 7), torch.zeros(2))
    with pytest.raises(ValueError, match=r"3 channels.*in_channels=1"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="num_classes=None"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), cond=Conditioning(labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(TypeError, match="Conditioning\\(labels=y\\)"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), cond=torch.zeros(2, dtype=torch.long))


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 250.5]), 8)  # half = 4, w_i = 10000 ** (-i / 3)
    freqs = [10000 ** (-i / 3) for i in range(4)]
    for row, t in zip(emb, [0.0, 1.0, 250.5]):
        expected = [math.sin(t * w) for w in freqs] + [math.cos(t * w) for w in freqs]
        torch.testing.assert_close(row, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    odd = timestep_embedding(torch.tensor([3]), 9)
    assert odd.shape == (1, 9) and odd.dtype == torch.float32 and odd[0, -1] == 0
    with pytest.raises(ValueError, match="dim=2"):
        timestep_embedding(torch.tensor([1.0]), 2)


def test_num_groups_is_largest_divisor_up_to_32():
    assert [num_groups(c) for c in (1, 3, 16, 48, 64, 96, 192)] == [1, 3, 16, 24, 32, 32, 32]


def test_attention_matches_reference():
    torch.manual_seed(0)
    block = randomize_zero_init(AttnBlock(channels=8, num_heads=2))
    x = torch.randn(2, 8, 3, 5)
    q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # each (B, C, L)
    heads = [slice(0, 4), slice(4, 8)]
    out = []
    for s in heads:
        w = torch.softmax(torch.einsum("bcl,bcm->blm", q[:, s], k[:, s]) / 2.0, dim=-1)  # d = 4
        out.append(torch.einsum("blm,bcm->bcl", w, v[:, s]))
    h = torch.cat(out, dim=1).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(h), rtol=1e-5, atol=1e-5)


def test_zero_init_output_and_time_dependence():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    fresh = UNet(image_size=8, in_channels=1, attn_resolutions=(4,), **TINY).eval()
    assert not fresh(x, torch.tensor([1, 2])).any()  # DDPM zero-initialises conv_out
    net = tiny_unet().eval()
    out = net(x, torch.tensor([10.0, 10.0]))
    assert not torch.allclose(out, net(x, torch.tensor([500.0, 500.0])))
    torch.testing.assert_close(out, net(x, torch.tensor(10.0)))  # scalar t broadcasts
    torch.testing.assert_close(out, net(x, 10.0))
    torch.testing.assert_close(out, net(x, torch.tensor([10, 10])))  # int t equals float t


def test_class_conditioning():
    net = tiny_unet(num_classes=10).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    out_a = net(x, t, cond=Conditioning(labels=torch.tensor([1, 1])))
    assert not torch.allclose(out_a, net(x, t, cond=Conditioning(labels=torch.tensor([7, 7]))))
    torch.testing.assert_close(net(x, t), net(x, t, cond=Conditioning(labels=torch.tensor([10, 10]))))  # None = null label
    assert net.class_embed.num_embeddings == 11


def test_gradients_reach_every_parameter():
    net = tiny_unet(num_classes=4, num_heads=2).train()
    out = net(torch.randn(3, 1, 8, 8), torch.rand(3) * 1000, cond=Conditioning(labels=torch.tensor([0, 1, 4])))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_autocast_bfloat16_and_channels_last():
    net = tiny_unet().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    ref = net(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    net = net.to(memory_format=torch.channels_last)
    out_cl = net(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)


def test_eval_is_deterministic_and_train_uses_dropout():
    net = tiny_unet(dropout=0.5)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    assert not torch.equal(net(x, t), net(x, t))


def test_scale_shift_norm_block_matches_its_formula():
    """norm(h) * (1 + scale) + shift with (scale, shift) = chunk(Linear(SiLU(temb))) (improved-diffusion's ResBlock)."""
    from difflab.nets.blocks import ResBlock

    torch.manual_seed(0)
    block = ResBlock(in_channels=8, out_channels=16, temb_channels=12, scale_shift_norm=True).eval()
    nn.init.normal_(block.conv2.weight)  # zero-initialised: give the output path a non-trivial map
    assert block.temb_proj.out_features == 32
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    def gn(norm, v):  # the plain GroupNorm of a norm layer (norm1 applies SiLU itself)
        return nn.functional.group_norm(v, norm.num_groups, norm.weight, norm.bias, norm.eps)

    assert block.norm1.act == "silu" and block.norm2.act == "none"  # FiLM sits between norm2 and its SiLU
    h = block.conv1(nn.functional.silu(gn(block.norm1, x)))
    scale, shift = block.temb_proj(nn.functional.silu(temb))[:, :, None, None].chunk(2, dim=1)
    ref = block.skip(x) + block.conv2(nn.functional.silu(gn(block.norm2, h) * (1 + scale) + shift))
    torch.testing.assert_close(block(x, temb), ref)
    net = tiny_unet(scale_shift_norm=True).train()  # every parameter, the FiLM projections included, learns
    net(torch.randn(3, 1, 8, 8), torch.rand(3) * 1000).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
