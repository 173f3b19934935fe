"""Build the feature extractor and GenerativeMetrics named in config (used by train and eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from difflab.metrics import (
    ClassifierExtractor,
    EfficientNetLite0Extractor,
    FeatureExtractor,
    GenerativeMetrics,
    InceptionExtractor,
)

EXTRACTORS = ("auto", "inception", "efficientnet_lite0", "classifier")
# data sets with a small difflab classifier: their offline metrics use its features
CLASSIFIER_DATASETS = ("digits", "mnist", "fashion_mnist")


def classifier_path(cache_dir: str | Path, dataset: str, image_size: int) -> Path:
    """Where `difflab-train-classifier data=<dataset> data.image_size=<size>` writes its checkpoint."""
    return Path(cache_dir) / "classifiers" / f"{dataset}_{image_size}px.ckpt"


def resolve_extractor_kind(kind: str, dataset: str) -> str:
    """'auto' -> the classifier for small labelled data, else EfficientNet-Lite0 (offline ImageNet features)."""
    if kind not in EXTRACTORS:
        raise ValueError(f"extractor={kind!r} is not supported; choose one of {EXTRACTORS}")
    if kind == "auto":
        return "classifier" if dataset in CLASSIFIER_DATASETS else "efficientnet_lite0"
    return kind


def build_extractor(
    kind: str = "auto",
    *,
    dataset: str,
    image_size: int,
    cache_dir: str,
    weights_path: str | None = None,
    classifier_ckpt: str | None = None,
) -> FeatureExtractor:
    """The feature extractor; fails before any sampling when its weights are missing."""
    kind = resolve_extractor_kind(kind, dataset)
    if kind == "inception":
        return InceptionExtractor(weights_path=weights_path)
    if kind == "efficientnet_lite0":
        return EfficientNetLite0Extractor()
    from difflab.cli.train_classifier import train_command
    from difflab.lit.checkpoint_io import load_classifier

    path = Path(classifier_ckpt) if classifier_ckpt else classifier_path(cache_dir, dataset, image_size)
    net = load_classifier(path, missing_hint=f"; create it with: {train_command(path)}")
    return ClassifierExtractor(net=net, name=f"classifier_{path.stem}")


def build_metrics(
    *,
    extractor: str = "auto",
    dataset: str,
    image_size: int,
    cache_dir: str,
    metrics: Sequence[str] = ("fid", "is", "kid", "precision_recall"),
    weights_path: str | None = None,
    classifier_ckpt: str | None = None,
    seed: int = 0,
) -> GenerativeMetrics:
    """GenerativeMetrics over the chosen extractor (Hydra target of the eval configs)."""
    feature_extractor = build_extractor(
        extractor, dataset=dataset, image_size=image_size, cache_dir=cache_dir,
        weights_path=weights_path, classifier_ckpt=classifier_ckpt,
    )
    return GenerativeMetrics(extractor=feature_extractor, metrics=list(metrics), seed=seed)
