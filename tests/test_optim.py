"""difflab's Adam/AdamW: torch's update bit for bit, without the fused kernel's channels_last copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from difflab.lit.optim import Adam, AdamW, dense_views


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4))
    return net.to(memory_format=torch.channels_last)  # 3x3 weights strictly NHWC; 1x1 and linear contiguous


def _steps(net: nn.Module, opt: torch.optim.Optimizer, n: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(2, 3, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("ours, theirs, kw", [
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
    (Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
])
def test_fused_update_equals_torch_bit_for_bit(ours, theirs, kw):
    a, b = _net(), _net()
    _steps(a, theirs(a.parameters(), fused=True, **kw))
    opt = ours(b.parameters(), fused=True, **kw)
    _steps(b, opt)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and pa.stride() == pb.stride()  # same values, layout kept
    first = next(b.parameters())
    assert opt.state[first]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def _copies(opt_cls) -> int:
    net = _net()
    opt = opt_cls(net.parameters(), lr=1e-3, fused=True)
    _steps(net, opt, 1)
    net(torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)).sum().backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)  # tensor copies, not step scalars
               if e.key in ("aten::clone", "aten::copy_") and e.input_shapes and e.input_shapes[0])


def test_fused_step_makes_no_layout_copies():
    assert _copies(torch.optim.AdamW) >= 1  # torch's kernel copies the channels_last 3x3 weight
    assert _copies(AdamW) == 0


def test_dense_views_only_where_every_tensor_is_channels_last():
    cl = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    plain = torch.randn(4, 3, 3, 3)
    lists = [[cl, cl.clone()], [cl.clone(), plain.clone()]]
    assert dense_views(lists) == 1
    assert lists[0][0].is_contiguous() and lists[0][0].shape == (4, 3, 3, 3)[:1] + (3, 3, 3)
    assert lists[0][0].data_ptr() == cl.data_ptr()  # a view: the update lands in the parameter
    assert lists[1][1] is not None and lists[0][1].shape == (4, 3, 3, 3)  # mixed layouts left alone
    one_by_one = torch.randn(4, 3, 1, 1).contiguous(memory_format=torch.channels_last)  # also contiguous
    assert dense_views([[one_by_one]]) == 0


def test_unfused_optimizer_is_torch_unchanged():
    a, b = _net(), _net()
    _steps(a, torch.optim.AdamW(a.parameters(), lr=1e-2))
    _steps(b, AdamW(b.parameters(), lr=1e-2))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    c = copy.deepcopy(b)
    assert isinstance(AdamW(c.parameters()), torch.optim.AdamW)
