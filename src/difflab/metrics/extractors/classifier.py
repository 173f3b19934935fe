"""Any difflab classifier as a feature extractor (e.g. the digits classifier: a domain FID)."""

from __future__ import annotations

from torch import Tensor, nn

from difflab.metrics.extractors.base import FeatureExtractor
from difflab.data.transforms import to_model_range
from difflab.metrics.images import resize
from difflab.metrics.names import check_safe_name


class ClassifierExtractor(FeatureExtractor):
    """Wraps `net` with `features(x) -> (B, D)` and `forward(x) -> logits (B, K)` on x in [-1, 1].

    `net` must carry `num_features` and `num_classes`; optional `image_size` (inputs are resized
    to it, bilinear with antialias) and `in_channels` (grey is repeated to 3 channels when the net
    wants RGB). The net is put in eval mode. Features and logits take two passes of the net,
    since the contract has no shared trunk.
    """

    def __init__(self, *, net: nn.Module, name: str) -> None:
        super().__init__()
        missing = [a for a in ("features", "num_features", "num_classes") if not hasattr(net, a)]
        if missing:
            raise TypeError(
                f"ClassifierExtractor needs a net with features(x), num_features and num_classes; "
                f"{type(net).__name__} lacks {missing}"
            )
        self.net = net
        self.name = check_safe_name(name, what="name")
        self.num_features = int(net.num_features)
        self.num_classes = int(net.num_classes)
        self.image_size: int | None = getattr(net, "image_size", None)
        self.in_channels: int | None = getattr(net, "in_channels", None)
        self.comparable_to_published = False
        self.eval()

    def _prepare(self, images: Tensor) -> Tensor:
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            if not (images.shape[1] == 1 and self.in_channels == 3):
                raise ValueError(
                    f"{self.name} takes {self.in_channels}-channel images, got {images.shape[1]}; "
                    "only grey -> RGB is converted"
                )
            images = images.repeat(1, 3, 1, 1)
        x = to_model_range(images)  # (B, C, H, W) in [-1, 1]
        return x if self.image_size is None else resize(x, int(self.image_size))

    def _features(self, images: Tensor) -> Tensor:
        return self.net.features(self._prepare(images))

    def _features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self._prepare(images)
        return self.net.features(x), self.net(x)
