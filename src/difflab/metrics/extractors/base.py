"""The contract every feature extractor of the metrics room fulfils."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.metrics.images import check_images


class FeatureExtractor(nn.Module):
    """A frozen network mapping uint8 images (B, C, H, W), C in {1, 3}, to features and logits.

    `forward` returns float32 features (B, num_features), so an extractor can be passed as the
    custom `feature=` module of torchmetrics' FID and KID (they read `num_features` instead of
    running a dummy image). `logits` returns (B, num_classes) for the Inception Score;
    `logits_module()` wraps it for torchmetrics' `InceptionScore(feature=...)`.
    Subclasses implement `_features_and_logits` (and `_features` when features alone are
    cheaper). An extractor stays in eval mode for good and never builds autograd graphs.
    """

    name: str
    num_features: int
    num_classes: int
    comparable_to_published: bool

    def _features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """One backbone pass: features (B, num_features) and logits (B, num_classes), float32."""
        check_images(images)
        features, logits = self._features_and_logits(images)
        return features.float(), logits.float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_images(images)
        return self._features(images).float()

    def _features(self, images: Tensor) -> Tensor:
        return self._features_and_logits(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]

    def logits_module(self) -> nn.Module:
        return _LogitsView(self)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # batch-norm statistics must never move

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, num_classes={self.num_classes}"


class _LogitsView(nn.Module):
    """`forward` = the extractor's logits, for torchmetrics' InceptionScore(feature=...)."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor.logits(images)
