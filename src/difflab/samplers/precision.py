"""Sampling precision: the autocast a network runs under while a sampler calls it, cast once.

Precision names are Lightning's (32, bf16-mixed, 16-mixed). Under autocast every conv/linear call
casts its float32 weight to the autocast dtype; `precast_for_autocast` does those casts once per
sampling call, so a 50-1000 step sampler does not pay them at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn
from torch.func import functional_call

# sampling precisions by Lightning's names: None runs float32 without autocast
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
    "16-mixed": torch.float16, "16": torch.float16,
}


# the layers whose weights and bias autocast casts to its lower-precision dtype at every call
# (convolutions and linear layers are on its lower-precision list; norms and embeddings are not)
_AUTOCAST_LOWP_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                         nn.ConvTranspose3d, nn.Linear)


def precast_for_autocast(net: nn.Module) -> Callable[..., Any]:
    """`net` as the active autocast runs it, with the casts autocast repeats at every call done once.

    Autocast casts a float32 conv/linear weight to its dtype at every call and caches the cast only
    for leaves that require grad, so an EMA net (requires_grad=False) sampled for 50-1000 steps
    recasts all its weights each step. Returned: a callable running `net` with those weights and
    biases pre-cast (`torch.func.functional_call`), which computes exactly what autocast computes;
    `net` itself when no autocast is active on its device or it has nothing to cast.
    """
    first = next(net.parameters(), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return net
    dtype = torch.get_autocast_dtype(first.device.type)
    cast = {
        f"{name}.{p_name}" if name else p_name: p.detach().to(dtype)
        for name, module in net.named_modules() if isinstance(module, _AUTOCAST_LOWP_LAYERS)
        for p_name, p in module.named_parameters(recurse=False) if p.dtype == torch.float32
    }
    if not cast:
        return net
    return lambda *args, **kwargs: functional_call(net, cast, args, kwargs, strict=False)


def autocast_dtype(precision: str | int) -> torch.dtype | None:
    """The autocast dtype a Lightning precision name stands for: bfloat16, float16, or None (float32)."""
    key = str(precision)
    if key not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of 32 (float32), bf16-mixed (bfloat16 autocast) "
                         "or 16-mixed (float16 autocast)")
    return AUTOCAST_DTYPES[key]


def sampling_autocast(precision: str | int | None, device_type: str) -> ContextManager[Any]:
    """Autocast on device_type for a sampling precision; None or 32 leaves the caller's context as it is."""
    dtype = None if precision is None else autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
