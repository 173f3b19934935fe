"""Tests of difflab.nets.dropout: the CPU dropout mask keeps E[dropout(x)] = x and torch's semantics."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.nets import UNet
from difflab.nets.dropout import Dropout, keep_mask, keep_threshold


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keep_rate_and_scale_are_exact_in_expectation(p):
    k, scale = keep_threshold(p)
    q = 1.0 / scale
    assert abs(q - (1.0 - p)) <= 2.0**-16
    torch.manual_seed(0)
    x = torch.empty(1_000_001)  # odd size: the last int32 draw is used for one element only
    keep, _ = keep_mask(x, p)
    n = x.numel()
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.float().mean().item() - q) < 5 * sigma
    out = Dropout(p).train()(torch.ones(n))
    assert abs(out.mean().item() - 1.0) < 5 * sigma * scale  # unbiased: E[out] = x


def test_neighbouring_elements_are_independent():
    """Two elements share one 32-bit draw; their keep events must still be independent."""
    torch.manual_seed(1)
    p = 0.5
    keep, _ = keep_mask(torch.empty(2_000_000), p)
    a, b = keep[0::2].float(), keep[1::2].float()
    both = (a * b).mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / a.numel())
    # each half on its own is fair (the high half of a 31-bit draw lacks its top bit: masked off)
    for half in (a, b):
        assert abs(half.mean().item() - 0.5) < 5 * math.sqrt(0.25 / half.numel())


def test_values_gradient_and_layout_follow_the_mask():
    torch.manual_seed(2)
    x = (torch.rand(4, 8, 6, 6) + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    drop = Dropout(0.25).train()
    out = drop(x)
    _, scale = keep_threshold(0.25)
    kept = out != 0
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[kept], (x * scale)[kept])
    assert 0.6 < kept.float().mean().item() < 0.9
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale)


def test_eval_and_p0_are_identity_and_seeded_masks_repeat():
    x = torch.randn(3, 5, 4, 4)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    torch.manual_seed(7)
    first = Dropout(0.5).train()(x)
    torch.manual_seed(7)
    assert torch.equal(Dropout(0.5).train()(x), first)
    # a non-dense (transposed) input works and keeps its values where kept
    xt = x.transpose(2, 3)
    out = Dropout(0.5).train()(xt)
    assert torch.equal(out[out != 0], (xt * 2.0)[out != 0])


@pytest.mark.parametrize("p", [-0.1, 1.0, True])
def test_bad_p_is_refused(p):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        keep_threshold(p)


def test_unet_with_dropout_traces_without_graph_breaks():
    """module.compile=true compiles the whole training network: the CPU mask must not break the graph."""
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.1, channels_last=True).train()
    x, t = torch.randn(2, 1, 8, 8), torch.randint(0, 1000, (2,))
    explained = torch._dynamo.explain(net)(x, t)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
