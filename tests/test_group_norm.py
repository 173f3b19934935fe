"""difflab's NHWC GroupNorm(+SiLU) kernel against torch's GroupNorm and SiLU, forward and backward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difflab.nets import UNet
from difflab.nets import group_norm as gn
from difflab.nets.group_norm import GroupNorm, build_kernel, compiler, group_norm_act, kernel_available, uses_kernel

# with a C compiler on the machine the kernel must build and load: a broken build fails here, not skips
pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler: the kernel falls back to torch")


def test_kernel_builds_and_loads():
    assert kernel_available()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _reference(x, groups, weight, bias, eps, act, dy):
    """torch's GroupNorm (+ SiLU) in float64 on the same input values: outputs and gradients."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.group_norm(x64, groups, w64, b64, eps)
    y = F.silu(y) if act == "silu" else y
    y.backward(dy.double())
    return y, x64.grad, w64.grad, b64.grad


def _ours(x, groups, weight, bias, eps, act, dy):
    xk, wk, bk = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    xk = _nhwc(xk.detach()).requires_grad_()
    assert uses_kernel(xk, wk)
    y = group_norm_act(xk, groups, wk, bk, eps, act)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    return y, xk.grad, wk.grad, bk.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# (B, C, H, W, groups): B=8 takes the one-image-per-task path, B=1 and 2 split images into row chunks;
# C=48 with 24 groups and odd sizes exercise the vector loops' remainders; 1x1 is both layouts at once
SHAPES = [(8, 128, 8, 8, 32), (1, 64, 16, 16, 32), (2, 48, 5, 7, 24), (3, 96, 1, 1, 32), (8, 3, 4, 4, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["none", "silu"])
def test_float32_matches_torch(shape, act):
    B, C, H, W, G = shape
    g = torch.Generator().manual_seed(0)
    x = _nhwc(torch.randn(B, C, H, W, generator=g) * 3 + 1)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    dy = _nhwc(torch.randn(B, C, H, W, generator=g))
    ours, ref = _ours(x, G, w, b, 1e-6, act, dy), _reference(x, G, w, b, 1e-6, act, dy)
    for name, o, r in zip(("y", "dx", "dgamma", "dbeta"), ours, ref):
        assert _rel(o, r) < 2e-5, f"{name}: relative error {_rel(o, r):.2e}"


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_bfloat16_within_rounding(shape, act):
    """bf16 in and out, float statistics: errors at bf16's rounding (2^-8), gamma/beta grads in float."""
    B, C, H, W, G = shape
    g = torch.Generator().manual_seed(1)
    x = _nhwc(torch.randn(B, C, H, W, generator=g) * 2 + 0.5).bfloat16()
    w, b = torch.randn(C, generator=g) * 0.2 + 1, torch.randn(C, generator=g) * 0.2
    dy = _nhwc(torch.randn(B, C, H, W, generator=g)).bfloat16()
    ours, ref = _ours(x, G, w, b, 1e-6, act, dy), _reference(x, G, w, b, 1e-6, act, dy)
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for name, o, r, tol in zip(("y", "dx", "dgamma", "dbeta"), ours, ref, (8e-3, 8e-3, 1e-5, 1e-5)):
        assert _rel(o, r) < tol, f"{name}: relative error {_rel(o, r):.2e}"


def test_large_mean_keeps_variance_accurate():
    """Statistics in float/double: a mean 100x the spread still normalises to float32 accuracy."""
    g = torch.Generator().manual_seed(2)
    x = _nhwc(torch.randn(4, 64, 16, 16, generator=g) + 100.0)
    w, b = torch.ones(64), torch.zeros(64)
    dy = _nhwc(torch.randn(4, 64, 16, 16, generator=g))
    ours, ref = _ours(x, 32, w, b, 1e-6, "none", dy), _reference(x, 32, w, b, 1e-6, "none", dy)
    assert _rel(ours[0], ref[0]) < 1e-3 and _rel(ours[1], ref[1]) < 1e-3


def test_deterministic_and_nan_propagates():
    g = torch.Generator().manual_seed(3)
    x = _nhwc(torch.randn(2, 32, 8, 8, generator=g)).bfloat16()
    w, b = torch.ones(32), torch.zeros(32)
    y1, y2 = group_norm_act(x, 8, w, b, 1e-6, "silu"), group_norm_act(x, 8, w, b, 1e-6, "silu")
    assert torch.equal(y1, y2)
    x[1, 5, 2, 3] = float("nan")  # group 1 (channels 4..7) of image 1
    y = group_norm_act(_nhwc(x), 8, w, b, 1e-6, "silu")
    assert y[1, 4:8].isnan().all() and not y[1, :4].isnan().any() and not y[0].isnan().any()


def test_no_grad_and_inference_paths_match_autograd_path():
    x = _nhwc(torch.randn(8, 64, 8, 8))
    m = GroupNorm(32, 64, eps=1e-6, act="silu")
    with torch.no_grad():
        a = m(x)
    with torch.inference_mode():
        b = m(x)
    c = m(x.clone().requires_grad_())
    assert torch.equal(a, b) and torch.equal(a, c.detach())


def test_module_is_nn_group_norm_with_act():
    m = GroupNorm(8, 32, eps=1e-6, act="silu")
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    assert isinstance(m, torch.nn.GroupNorm) and m.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 32, 4, 4)  # NCHW: torch's path
    assert not uses_kernel(x, m.weight)
    assert torch.allclose(m(x), F.silu(ref(x)))
    assert torch.allclose(m(_nhwc(x)), F.silu(ref(x)), atol=1e-5)
    assert "act=silu" in repr(m)
    with pytest.raises(ValueError, match=r"act='gelu' is not one of \('none', 'silu'\)"):
        GroupNorm(8, 32, act="gelu")
    with pytest.raises(ValueError, match="act='relu'"):
        group_norm_act(x, 8, None, None, 1e-5, act="relu")


def test_kernel_only_where_it_applies():
    w = torch.ones(16)
    assert uses_kernel(_nhwc(torch.randn(2, 16, 4, 4)).bfloat16(), w)
    assert not uses_kernel(torch.randn(2, 16, 4, 4), w)  # NCHW
    assert not uses_kernel(_nhwc(torch.randn(2, 16, 4, 4)).double(), w)  # float64
    assert not uses_kernel(_nhwc(torch.randn(2, 16, 4, 4)), w.bfloat16())  # bf16 affine parameters
    assert not uses_kernel(torch.randn(2, 16, 4), w)  # 3-D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_with_kernel_matches_torch_path(monkeypatch, dtype):
    """The whole channels_last U-Net: outputs and every gradient agree with torch's GroupNorm + SiLU."""
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0,
               channels_last=True)
    for p in net.parameters():  # non-zero everywhere, so every branch carries gradient
        p.data.add_(torch.randn_like(p) * 0.02)
    x, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))

    def run():
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = net(x, t)
        out.float().square().mean().backward()
        return out.float(), [p.grad.clone() for p in net.parameters()]

    out_k, grads_k = run()
    monkeypatch.setattr(gn, "uses_kernel", lambda x, w: False)
    out_t, grads_t = run()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert _rel(out_k, out_t) < tol
    # biases added right before a GroupNorm have zero gradient up to rounding: judge against the net's scale
    scale = max(g.abs().max().item() for g in grads_t)
    worst = max(((a - b).abs().max() / max(b.abs().max().item(), 1e-2 * scale)).item() for a, b in zip(grads_k, grads_t))
    assert worst < (1e-3 if dtype == torch.float32 else 0.1), worst


def test_build_is_cached_per_source_and_machine(tmp_path: Path):
    first = build_kernel(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build_kernel(tmp_path) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftovers from the build


def test_build_failure_names_the_compiler(tmp_path: Path, monkeypatch):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(RuntimeError, match="fakecc.*failed"):
        build_kernel(tmp_path / "kernels")


def test_turned_off_falls_back_to_torch():
    code = ("import torch; from difflab.nets.group_norm import kernel_available, group_norm_act; "
            "x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last); "
            "y = group_norm_act(x, 4, None, None, 1e-5, 'silu'); "
            "ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, eps=1e-5)); "
            "print(kernel_available(), torch.equal(y, ref))")
    env = {**os.environ, "DIFFLAB_GROUP_NORM": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dropout_is_difflab_dropout_after_the_norm(dtype):
    """Same generator state, same 15-bit draws: the fused mask equals Dropout's, values and gradients agree."""
    from difflab.nets.dropout import Dropout

    g = torch.Generator().manual_seed(4)
    x = _nhwc(torch.randn(4, 64, 8, 8, generator=g)).to(dtype)
    w, b = torch.randn(64, generator=g) * 0.1 + 1, torch.randn(64, generator=g) * 0.1
    dy = _nhwc(torch.randn(4, 64, 8, 8, generator=g)).to(dtype)
    drop = Dropout(0.3).train()

    def run(fused: bool):
        xk, wk, bk = (t.detach().clone().requires_grad_() for t in (x, w, b))
        torch.manual_seed(123)
        if fused:
            y = group_norm_act(xk, 32, wk, bk, 1e-6, "silu", dropout=drop)
        else:
            y = drop(F.silu(F.group_norm(xk, 32, wk, bk, 1e-6)))
        y.backward(dy)
        return y, xk.grad, wk.grad, bk.grad

    fused, ref = run(True), run(False)
    assert torch.equal(fused[0] == 0, ref[0] == 0)  # the same elements dropped
    assert 0.2 < (ref[0] == 0).float().mean().item() < 0.4
    tol = (2e-5, 2e-5, 2e-5, 2e-5) if dtype == torch.float32 else (1.6e-2, 1.6e-2, 1e-2, 1e-2)
    for name, o, r, t in zip(("y", "dx", "dgamma", "dbeta"), fused, ref, tol):
        assert _rel(o, r) < t, f"{name}: relative error {_rel(o, r):.2e}"
    drop.eval()  # eval: no dropout at all; torch's nn.Dropout is applied after the kernel
    assert torch.equal(group_norm_act(x, 32, w, b, 1e-6, "silu", dropout=drop), group_norm_act(x, 32, w, b, 1e-6, "silu"))
    torch.manual_seed(5)
    a = group_norm_act(x, 32, w, b, 1e-6, "silu", dropout=torch.nn.Dropout(0.5))
    assert 0.4 < (a == 0).float().mean().item() < 0.6


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_kernel_shares_torchs_openmp_runtime():
    """The kernel's OpenMP threads are torch's: its libgomp.so.1 dependency resolves to the one torch loaded
    (a second copy would start a second thread pool). Other packages' renamed copies (scikit-learn bundles
    libgomp-<hash>.so) are theirs."""
    assert kernel_available()
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith("libgomp.so")}
    assert len(mapped) <= 1, mapped
