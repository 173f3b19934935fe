"""Sampling under autocast: weights cast once per sampling call give exactly what per-step autocast gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import difflab.lit.diffusion_module as diffusion_module
import difflab.lit.score_module as score_module
from difflab.diffusion import linear_betas
from difflab.diffusion.sde import VPSDE
from difflab.lit import DiffusionModule, ScoreModule
from difflab.nets import UNet
from difflab.samplers import DDIM, Heun
from difflab.samplers.precision import autocast_dtype, precast_for_autocast, sampling_autocast


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
def test_precast_net_equals_autocast_bit_for_bit_and_casts_no_weights(channels_last):
    net = _net(channels_last=channels_last, num_classes=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([0, 2])
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = net(x, t, y)
        fn = precast_for_autocast(net)
        got = fn(x, t, y)
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)
        # plain autocast recasts every weight and bias at each call; the pre-cast net only its inputs
        assert _to_copies(net, x, t, y) >= 2 * n_layers
        assert _to_copies(fn, x, t, y) < n_layers
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the net itself is untouched


def test_precast_is_the_net_itself_without_autocast_or_weights():
    net = _net()
    assert precast_for_autocast(net) is net
    norm = nn.GroupNorm(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precast_for_autocast(norm) is norm  # nothing autocast would cast
        assert precast_for_autocast(nn.Identity()) is not None


def test_precision_names_and_bad_values():
    assert autocast_dtype(32) is None and autocast_dtype("32-true") is None
    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype("16-mixed") is torch.float16
    with pytest.raises(ValueError, match=r"precision='bf17' is not one of 32 .*bf16-mixed.*16-mixed"):
        autocast_dtype("bf17")
    with pytest.raises(ValueError, match="precision=64"):
        sampling_autocast(64, "cpu")
    with sampling_autocast(None, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), sampling_autocast(32, "cpu"):
        assert torch.is_autocast_enabled("cpu")  # 32 keeps the caller's context


def _ddpm_module() -> DiffusionModule:
    return DiffusionModule(net=_net(num_classes=3), betas=linear_betas(50), optimizer=torch.optim.Adam)


def test_module_sample_in_bf16_equals_per_step_autocast(monkeypatch):
    m = _ddpm_module()
    m.ema.module.load_state_dict(m.net.state_dict())
    kw = dict(seeds=[1, 2, 3], labels=[0, 1, 2], guidance_scale=2.0)
    fast = m.sample(DDIM(steps=5), precision="bf16-mixed", **kw)
    full = m.sample(DDIM(steps=5), **kw)
    monkeypatch.setattr(diffusion_module, "precast_for_autocast", lambda net: net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = m.sample(DDIM(steps=5), **kw)  # autocast casting every weight at every step
    assert fast.dtype == torch.float32 and torch.equal(fast, slow)
    assert 0 < (fast - full).abs().mean() < 0.05  # bf16 ran, and stayed close to float32
    with pytest.raises(ValueError, match="precision='64-true'"):
        m.sample(DDIM(steps=5), seeds=[0], precision="64-true")


def test_score_module_sample_in_bf16_equals_per_step_autocast(monkeypatch):
    m = ScoreModule(net=_net(), sde=VPSDE(), optimizer=torch.optim.Adam)
    fast = m.sample(Heun(steps=3), seeds=[4, 5], precision="bf16-mixed")
    monkeypatch.setattr(score_module, "precast_for_autocast", lambda net: net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = m.sample(Heun(steps=3), seeds=[4, 5])
    assert torch.equal(fast, slow)
    assert 0 < (fast - m.sample(Heun(steps=3), seeds=[4, 5])).abs().mean() < 0.05
