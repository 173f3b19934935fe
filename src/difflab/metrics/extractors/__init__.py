"""Feature extractors: uint8 images (B, C, H, W) -> features (B, D) and logits (B, K)."""

from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.extractors.classifier import ClassifierExtractor
from difflab.metrics.extractors.efficientnet import EfficientNetLite0Extractor
from difflab.metrics.extractors.inception import (
    INCEPTION_WEIGHTS_FILE,
    InceptionExtractor,
    default_inception_weights_path,
)

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "ClassifierExtractor",
    "EfficientNetLite0Extractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "default_inception_weights_path",
]
