"""bf16 mixed precision that, unlike Lightning's MixedPrecision, clips gradients of fused optimizers.

Lightning's `MixedPrecision.clip_gradients` refuses every optimizer that "handles unscaling"
(torch's fused Adam/AdamW set `_step_supports_amp_scaling`), because with float16 and a
GradScaler the gradients are still scaled when Lightning would clip them. bf16 has no scaler, so
the gradients are the true ones and clipping them before a fused step is exact; this plugin lets
`trainer.precision=bf16-mixed` run with difflab's default fused AdamW and `gradient_clip_val`.
"""

from __future__ import annotations

from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch.optim import Optimizer

from difflab.nets.inference import BF16_MIXED, FP16_MIXED  # noqa: F401 (the one precision vocabulary)


class BF16MixedPrecision(MixedPrecision):
    """`MixedPrecision("bf16-mixed")` (autocast to bfloat16, no scaler) whose clipping is the plain one."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device=device)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """Clip as `Precision` does: no scaler, so fused optimizers see unscaled gradients."""
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
