"""The sampling network: weights cast (autocast) and prepacked (CPU) once per call give exactly the plain results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import difflab.samplers.generate as generate_module
from difflab.diffusion import linear_betas
from difflab.diffusion.sde import VPSDE
from difflab.lit import DiffusionModule, ScoreModule
from difflab.nets import UNet
from difflab.samplers import DDIM, Heun
from difflab.nets import Conditioning
from difflab.nets.inference import PrepackedConv2d, autocast_dtype, precision_autocast, sampling_net


def _net(**kwargs) -> UNet:
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.0, **kwargs)
    for p in net.parameters():  # non-zero everywhere (the zero-initialised output conv would hide a wrong cast)
        nn.init.normal_(p, std=0.2)
    return net.eval().requires_grad_(False)  # as an EMA copy: autocast does not cache its casts


def _to_copies(fn, *args) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.mark.parametrize("channels_last", [False, True])
def test_sampling_net_equals_autocast_bit_for_bit_and_casts_no_weights(channels_last):
    net = _net(channels_last=channels_last, num_classes=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), Conditioning(labels=torch.tensor([0, 2]))
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(x, t, y)
        fast = sampling_net(net, torch.bfloat16)
        got = fast(x, t, y)
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)
        # plain autocast recasts every weight and bias at each call; the sampling net only some inputs
        assert _to_copies(net, x, t, y) >= 2 * n_layers
        assert _to_copies(fast, x, t, y) < n_layers
    # the net itself is untouched; the copy shares its norm/embedding tensors
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) > 0
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in fast.modules())
    assert fast.norm_out.weight is net.norm_out.weight


def test_sampling_net_in_float32_prepacks_cpu_convolutions_bit_for_bit():
    net = _net(channels_last=True)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 49])
    with torch.inference_mode():
        fast = sampling_net(net)
        assert fast is not net and torch.equal(fast(x, t), net(x, t))
        assert torch.equal(fast(x[:1], t[:1]), net(x[:1], t[:1]))  # a second input shape: its own packing
    convs = [m for m in fast.modules() if isinstance(m, PrepackedConv2d)]
    assert convs and all(m.prepack for m in convs)
    # the 3x3 convolutions of 3 images went through oneDNN with a packed weight (1x1 ones and single
    # small images only with more than one thread, as torch's own rule has it)
    assert all(m._packed for m in convs if m._kernel == (3, 3) and m.weight.shape[1] > 1)
    assert sum(isinstance(m, nn.Linear) for m in fast.modules()) > 0  # float32 linears stay as they are


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=1), dict(kernel_size=3, padding=2, dilation=2, groups=2)])
def test_prepacked_conv_matches_conv2d(dtype, kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw)
    x = torch.randn(2, 4, 9, 9)
    with torch.inference_mode():
        for layout in (torch.contiguous_format, torch.channels_last):  # weights and activations
            conv.to(memory_format=layout)
            xl = x.contiguous(memory_format=layout)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                fast = PrepackedConv2d(conv, dtype)
                want, got = conv(xl), fast(xl)
            assert got.dtype == want.dtype and torch.equal(got, want)
            onednn = dtype == torch.bfloat16 or fast._onednn_fp32(xl)
            assert bool(fast._packed) == (layout == torch.channels_last and fast.prepack and onednn)


def test_prepacked_conv_packs_only_what_onednn_runs_and_refuses_other_padding():
    assert PrepackedConv2d(nn.Conv2d(2, 4, 3, padding=1), torch.float32).prepack
    assert not PrepackedConv2d(nn.Conv2d(2, 4, 3, groups=2), torch.float32).prepack
    assert not PrepackedConv2d(nn.Conv2d(2, 4, 3, dilation=2), torch.float32).prepack
    assert not PrepackedConv2d(nn.Conv2d(2, 4, 3, padding="same"), torch.float32).prepack
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        PrepackedConv2d(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), torch.float32)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 1))
    net.to(memory_format=torch.channels_last)
    fast = sampling_net(net)
    assert isinstance(fast[0], nn.Conv2d) and isinstance(fast[1], PrepackedConv2d)  # reflect stays as it is
    x = torch.randn(1, 2, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(fast(x), net(x))


def test_sampling_net_is_the_net_itself_when_nothing_to_gain():
    norm = nn.GroupNorm(2, 4)
    assert sampling_net(nn.Identity()).__class__ is nn.Identity
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(sampling_net(norm, torch.bfloat16), nn.GroupNorm)  # nothing autocast casts, nothing to prepack
    compiled = _net()
    compiled.compile()
    assert sampling_net(compiled) is compiled


def test_precision_names_and_bad_values():
    assert autocast_dtype(32) is None and autocast_dtype("32-true") is None
    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype("16-mixed") is torch.float16
    with pytest.raises(ValueError, match=r"precision='bf17' is not one of 32 .*bf16-mixed.*16-mixed"):
        autocast_dtype("bf17")
    with pytest.raises(ValueError, match="precision=64"):
        autocast_dtype(64)
    with precision_autocast(None, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), precision_autocast(None, "cpu"):
        assert torch.is_autocast_enabled("cpu")  # None keeps the caller's context
    with precision_autocast(torch.bfloat16, "cpu"):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16


def _ddpm_module() -> DiffusionModule:
    return DiffusionModule(net=_net(num_classes=3), betas=linear_betas(50), optimizer=torch.optim.Adam)


def test_module_sample_in_bf16_equals_per_step_autocast(monkeypatch):
    m = _ddpm_module()
    m.ema.module.load_state_dict(m.net.state_dict())
    kw = dict(seeds=[1, 2, 3], labels=[0, 1, 2], guidance_scale=2.0)
    fast = m.sample(DDIM(steps=5), precision="bf16-mixed", **kw)
    full = m.sample(DDIM(steps=5), **kw)
    monkeypatch.setattr(generate_module, "sampling_net", lambda net, dtype: net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = m.sample(DDIM(steps=5), **kw)  # autocast casting every weight at every step
    assert fast.dtype == torch.float32 and torch.equal(fast, slow)
    assert torch.equal(full, m.sample(DDIM(steps=5), **kw))  # float32: prepacked convolutions, same images
    assert 0 < (fast - full).abs().mean() < 0.05  # bf16 ran, and stayed close to float32
    with pytest.raises(ValueError, match="precision='64-true'"):
        m.sample(DDIM(steps=5), seeds=[0], precision="64-true")


def test_score_module_sample_in_bf16_equals_per_step_autocast(monkeypatch):
    m = ScoreModule(net=_net(), sde=VPSDE(), optimizer=torch.optim.Adam)
    fast = m.sample(Heun(steps=3), seeds=[4, 5], precision="bf16-mixed")
    monkeypatch.setattr(generate_module, "sampling_net", lambda net, dtype: net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = m.sample(Heun(steps=3), seeds=[4, 5])
    assert torch.equal(fast, slow)
    assert 0 < (fast - m.sample(Heun(steps=3), seeds=[4, 5])).abs().mean() < 0.05
