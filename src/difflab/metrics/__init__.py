"""Metrics room: feature extractors, reference-statistics cache, FID/IS/KID/PR wrappers, and the
evaluation engine (evaluation.py: sharded sampling into the metrics; reports.py: JSON / CSV / plots / tables;
build.py: the extractor and metrics a config names).

Stands alone (no other difflab room, no Hydra). Images enter as uint8 (B, C, H, W), C in {1, 3};
`difflab.data.to_uint8` converts the data room's float [-1, 1] images.
"""

from difflab.metrics.extractors import (
    INCEPTION_WEIGHTS_FILE,
    ClassifierExtractor,
    EfficientNetLite0Extractor,
    FeatureExtractor,
    InceptionExtractor,
    default_inception_weights_path,
)
from difflab.metrics.generative import METRIC_NAMES, GenerativeMetrics, MetricName
from difflab.metrics.reference import ReferenceKey, ReferenceStats, load_or_compute, shared_reference

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "METRIC_NAMES",
    "ClassifierExtractor",
    "EfficientNetLite0Extractor",
    "FeatureExtractor",
    "GenerativeMetrics",
    "InceptionExtractor",
    "MetricName",
    "ReferenceKey",
    "ReferenceStats",
    "default_inception_weights_path",
    "load_or_compute",
    "shared_reference",
]
