"""How a network runs at inference: the one precision vocabulary, and weights prepared once per sampling call.

Precision names are Lightning's (32, bf16-mixed, 16-mixed), for training and sampling alike. Under autocast every conv/linear call
casts its float32 weight to the autocast dtype, and on CPU oneDNN reorders every conv weight at
every call; `sampling_net` does that work once per sampling call, so a 50-1000 step sampler does
not pay it at every step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# precisions by Lightning's names: None runs float32 without autocast
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
    "16-mixed": torch.float16, "16": torch.float16,
}
BF16_MIXED = ("bf16-mixed", "bf16")  # Lightning's names for bf16 autocast (the short one is its legacy alias)
FP16_MIXED = ("16-mixed", "16", 16)


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without them bf16 is ~50x slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _mkldnn_prepack(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run CPU convolutions of this dtype from a prepacked weight."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16())


def strictly_channels_last(t: Tensor) -> bool:
    """NHWC strides that are not also NCHW ones (a C=1 or 1x1 tensor is both; other ranks are neither)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class PrepackedConv2d(nn.Module):
    """A frozen Conv2d for inference: weight cast once and, on CPU, reordered once per input shape for oneDNN.

    `F.conv2d` on CPU reorders the weight into oneDNN's blocked layout at every call; a sampler calls
    the same convolution with the same input shape 50-1000 times, so the reorder is done once
    (`torch.ops.mkldnn._reorder_convolution_weight`, the prepacking inductor's freezing uses).
    Prepacks undilated, ungrouped convolutions of channels_last inputs or weights
    (`UNet(channels_last=True)`; the ones torch runs through oneDNN's NHWC path, with torch's
    float32 size rule mirrored), so the outputs equal `F.conv2d`'s bit for bit
    (tests/test_sampling_precision.py); anything else runs `F.conv2d` with the cast weight.
    No autograd.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"PrepackedConv2d takes zero-padded convolutions, not padding_mode={conv.padding_mode!r}")
        self.weight = conv.weight.detach().to(dtype)  # plain attributes: never trained or saved
        self.bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        # the convolutions torch itself runs through oneDNN's NHWC path, so results stay bit for bit
        self.prepack = (conv.weight.device.type == "cpu" and not isinstance(conv.padding, str)
                        and conv.groups == 1 and all(d == 1 for d in conv.dilation) and _mkldnn_prepack(dtype))
        self._weight_nhwc = strictly_channels_last(self.weight)
        self._kernel = tuple(self.weight.shape[-2:])
        self._args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)  # oneDNN op order
        self._packed: dict[tuple[int, ...], Tensor] = {}  # input shape -> reordered weight

    def forward(self, x: Tensor) -> Tensor:
        # torch takes oneDNN's NHWC path when the input or the weight is channels_last (and only then
        # are the results the same bit for bit); an ambiguous layout (C=1, 1x1) follows the other
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and (self._weight_nhwc or strictly_channels_last(x))
        if not (self.prepack and nhwc) or (self.weight.dtype == torch.float32 and not self._onednn_fp32(x)):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        x = x.to(self.weight.dtype)  # what autocast does to a conv input
        packed = self._packed.get(tuple(x.shape))
        if packed is None:
            packed = self._packed[tuple(x.shape)] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, *self._args, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *self._args, "none", [], "")

    def _onednn_fp32(self, x: Tensor) -> bool:
        """torch's rule (ConvParams::use_mkldnn) for an ungrouped float32 convolution: small ones stay native."""
        (kh, kw), n = self._kernel, x.shape[0]
        pointwise, strided = (kh, kw) == (1, 1), any(s != 1 for s in self.stride)
        if not (strided or n >= 16 or not pointwise or torch.get_num_threads() > 1):
            return False
        return (kh > 3 and kw > 3) or n > 1 or x.numel() > 20480


class CastLinear(nn.Module):
    """A frozen Linear with its weight and bias cast once to the autocast dtype (autocast casts the input)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def sampling_net(net: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """`net` as one sampling call should run it: the same outputs bit for bit, without per-step weight work.

    Under autocast every float32 conv/linear weight is cast at every call, and the casts are cached
    only for leaves that require grad, which an EMA copy does not: a 50-step sampler recast the
    whole network 50 times. On CPU oneDNN also reorders every conv weight at every call. Returned:
    a structural copy of `net` sharing its tensors, whose Conv2d and Linear layers hold their
    weights cast once to `dtype` (the autocast dtype the caller runs under; None: float32) and whose CPU
    convolutions are prepacked (`PrepackedConv2d`); `net` itself when there is nothing to gain
    (no parameters, compiled, or no autocast and not on CPU). Other layers keep autocast's
    per-call casts (norms and embeddings stay float32 under autocast anyway). Inference only: no
    autograd through the copy.
    """
    first = next(net.parameters(), None)
    if first is None or getattr(net, "_compiled_call_impl", None) is not None:  # torch.compile'd: as it is
        return net
    device = first.device.type
    lowp = dtype is not None
    if not lowp and device != "cpu":
        return net
    dtype = dtype or torch.float32
    shared = {id(t): t for t in (*net.parameters(), *net.buffers())}
    fast = copy.deepcopy(net, memo=dict(shared))  # modules copied, tensors shared
    for module in list(fast.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d) and child.weight.dtype == torch.float32 and child.padding_mode == "zeros":
                setattr(module, name, PrepackedConv2d(child, dtype))
            elif lowp and isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
                setattr(module, name, CastLinear(child, dtype))
    return fast


def autocast_dtype(precision: str | int) -> torch.dtype | None:
    """The autocast dtype a Lightning precision name stands for: bfloat16, float16, or None (float32)."""
    key = str(precision)
    if key not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of 32 (float32), bf16-mixed (bfloat16 autocast) "
                         "or 16-mixed (float16 autocast)")
    return AUTOCAST_DTYPES[key]


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast the caller runs under on device_type, or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def precision_autocast(dtype: torch.dtype | None, device_type: str) -> ContextManager[Any]:
    """Autocast to dtype on device_type; None leaves the caller's context as it is."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
