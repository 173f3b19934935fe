"""The one conditioning structure: what a sample is conditioned on, from generate() through samplers to the net.

Samplers never look inside it: they pass it to `model_fn(x_t, t, cond)` untouched, and guidance
wrappers combine it with its null version. A field is a tensor with the batch on dim 0, or None.
Fields: class labels; a prompt as token ids + attention mask (a text net encodes them itself), and the
encoded context (+ pooled embedding) that generate() computes once per sampling call so the text
encoder does not run at every step. Known pixels (inpainting) travel in samplers/edit.py's Edit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """labels: (B,) long class indices in [0, num_classes], num_classes being the null (unconditional) label.

    tokens: (B, L) long prompt token ids, token_mask: (B, L) bool (True = a real token, start/end included);
    context: (B, L, D) the text encoder's token embeddings of `tokens`, pooled: (B, D) its pooled embedding.
    """

    labels: Tensor | None = None
    tokens: Tensor | None = None
    token_mask: Tensor | None = None
    context: Tensor | None = None
    pooled: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """fn applied to every set field (e.g. a device move or a batch slice)."""
        return replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def cat(self, other: Conditioning) -> Conditioning:
        """Both batches one after the other, field by field (a batched guided call on 2B inputs)."""
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot concatenate conditionings with fields {sorted(mine)} and {sorted(theirs)}")
        return replace(self, **{k: torch.cat([mine[k], theirs[k]]) for k in mine})

    def batch_size(self) -> int | None:
        """The batch size of the set fields (None when nothing is set); they must agree."""
        sizes = {v.shape[0] for v in self.tensors().values()}
        if len(sizes) > 1:
            raise ValueError(f"conditioning fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None
