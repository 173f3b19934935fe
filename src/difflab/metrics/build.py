"""The feature extractor and GenerativeMetrics a config names (the training callback's and difflab-eval's).

The metrics room does not read checkpoints: a classifier extractor gets its network from the injected
`classifier_loader(path) -> nn.Module` (difflab.lit.checkpoint_io.load_classifier in the configs and
in difflab-eval).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from difflab.metrics.extractors import (
    ClassifierExtractor,
    EfficientNetLite0Extractor,
    FeatureExtractor,
    InceptionExtractor,
)
from difflab.metrics.generative import GenerativeMetrics
from difflab.metrics.reconstruction import ReconstructionMetrics

EXTRACTORS = ("auto", "inception", "efficientnet_lite0", "classifier")
# data sets with a small difflab classifier: their offline metrics use its features
CLASSIFIER_DATASETS = ("digits", "mnist", "fashion_mnist")

ClassifierLoader = Callable[[Path], nn.Module]


def classifier_path(cache_dir: str | Path, dataset: str, image_size: int) -> Path:
    """Where `difflab-train-classifier data=<dataset> data.image_size=<size>` writes its checkpoint."""
    return Path(cache_dir) / "classifiers" / f"{dataset}_{image_size}px.ckpt"


def train_classifier_command(dataset: str, image_size: int, path: str | Path) -> str:
    """The command line that writes the feature classifier of a data set to `path`."""
    return f"difflab-train-classifier data={dataset} data.image_size={image_size} out_path={Path(path).expanduser().resolve()}"


def resolve_extractor_kind(kind: str, dataset: str) -> str:
    """'auto' -> the classifier for small labelled data, else EfficientNet-Lite0 (offline ImageNet features)."""
    if kind not in EXTRACTORS:
        raise ValueError(f"extractor={kind!r} is not supported; choose one of {EXTRACTORS}")
    if kind == "auto":
        return "classifier" if dataset in CLASSIFIER_DATASETS else "efficientnet_lite0"
    return kind


def default_classifier_needed(kind: str, dataset: str, classifier_ckpt: str | None) -> bool:
    """True when the features come from the default classifier file (classifier_path), not a named one."""
    return resolve_extractor_kind(kind, dataset) == "classifier" and not classifier_ckpt


def build_extractor(
    kind: str = "auto",
    *,
    dataset: str,
    image_size: int,
    cache_dir: str | Path,
    weights_path: str | None = None,
    classifier_ckpt: str | None = None,
    classifier_loader: ClassifierLoader | None = None,
) -> FeatureExtractor:
    """The feature extractor; fails before any sampling when its weights are missing."""
    kind = resolve_extractor_kind(kind, dataset)
    if kind == "inception":
        return InceptionExtractor(weights_path=weights_path)
    if kind == "efficientnet_lite0":
        return EfficientNetLite0Extractor()
    path = Path(classifier_ckpt).expanduser() if classifier_ckpt else classifier_path(cache_dir, dataset, image_size)
    if not path.is_file():
        how = "" if classifier_ckpt else " (difflab-train and difflab-eval create it on first use)"
        raise FileNotFoundError(f"no classifier checkpoint at {path}{how}; create it with: "
                                f"{train_classifier_command(dataset, image_size, path)}")
    if classifier_loader is None:
        raise ValueError("extractor=classifier needs a classifier_loader(path) -> nn.Module, "
                         "e.g. difflab.lit.checkpoint_io.load_classifier")
    return ClassifierExtractor(net=classifier_loader(path), name=f"classifier_{path.stem}")


def build_metrics(
    *,
    extractor: str = "auto",
    dataset: str,
    image_size: int,
    cache_dir: str | Path,
    metrics: Sequence[str] = ("fid", "is", "kid", "precision_recall"),
    weights_path: str | None = None,
    classifier_ckpt: str | None = None,
    classifier_loader: ClassifierLoader | None = None,
    seed: int = 0,
) -> GenerativeMetrics:
    """GenerativeMetrics over the chosen extractor (Hydra target of the training callback's metrics)."""
    feature_extractor = build_extractor(
        extractor, dataset=dataset, image_size=image_size, cache_dir=cache_dir, weights_path=weights_path,
        classifier_ckpt=classifier_ckpt, classifier_loader=classifier_loader,
    )
    return GenerativeMetrics(extractor=feature_extractor, metrics=list(metrics), seed=seed)


def build_reconstruction_metrics(
    *,
    extractor: str = "auto",
    dataset: str,
    image_size: int,
    cache_dir: str | Path,
    weights_path: str | None = None,
    classifier_ckpt: str | None = None,
    classifier_loader: ClassifierLoader | None = None,
) -> ReconstructionMetrics:
    """rFID over the chosen extractor (Hydra target of the autoencoder's ReconstructionFID callback)."""
    feature_extractor = build_extractor(
        extractor, dataset=dataset, image_size=image_size, cache_dir=cache_dir, weights_path=weights_path,
        classifier_ckpt=classifier_ckpt, classifier_loader=classifier_loader,
    )
    return ReconstructionMetrics(extractor=feature_extractor)
