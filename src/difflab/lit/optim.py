"""torch's Adam and AdamW whose fused kernel updates channels_last parameters in place, without copies.

torch's CPU fused Adam(W) kernel makes every non-contiguous parameter, gradient and moment
contiguous and copies the results back: for a channels_last network (`ddpm_cifar10`) that is
~350 copies per step, ~20 ms of a ~50 ms optimizer step on the 35.7 M net (README, Performance).
The update is elementwise, and a channels_last (O, I, kh, kw) tensor is a contiguous
(O, kh, kw, I) one, so these subclasses hand the kernel that contiguous view of each tensor whose
parameter, gradient and moments share channels_last strides: the same update bit for bit
(tests/test_optim.py), in the same memory. Everything else is torch's optimizer unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.nets.inference import strictly_channels_last


def dense_views(tensors: list[list[Tensor]]) -> int:
    """At each index where every list holds a channels_last tensor of the same strides, put in its
    contiguous NHWC view instead; return how many indices were replaced."""
    replaced = 0
    for i in range(len(tensors[0])):
        column = [ts[i] for ts in tensors]
        if all(strictly_channels_last(t) and t.stride() == column[0].stride() for t in column):
            for ts in tensors:
                ts[i] = ts[i].permute(0, 2, 3, 1)  # (O, kh, kw, I), contiguous, same storage
            replaced += 1
    return replaced


class _FusedDenseViews:
    """Adam-family `_init_group` that gives the fused kernel contiguous views of channels_last tensors."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if group.get("fused") and params:
            dense_views([params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else []))
        return has_complex


class Adam(_FusedDenseViews, torch.optim.Adam):
    """`torch.optim.Adam`; with fused=True channels_last parameters are updated without layout copies."""


class AdamW(_FusedDenseViews, torch.optim.AdamW):
    """`torch.optim.AdamW`; with fused=True channels_last parameters are updated without layout copies."""
