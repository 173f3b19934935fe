"""torch-fidelity's InceptionV3 (the TF-FID network): the extractor whose scores match papers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.images import to_rgb

INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
CONFIG_KEY = "metrics.extractor.weights_path"


def default_inception_weights_path() -> Path:
    """Where torch-fidelity and torchmetrics look: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights_path: str | Path | None) -> Path:
    """The weights file to load (a directory means <dir>/<file>); FileNotFoundError if absent."""
    path = default_inception_weights_path() if weights_path is None else Path(weights_path).expanduser()
    if path.is_dir():
        path = path / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights not found: {path} does not exist and nothing can be downloaded here. "
            f"Put the file {INCEPTION_WEIGHTS_FILE} (torch-fidelity's TF-FID weights, {URL_INCEPTION_V3}) "
            f"in the directory {default_inception_weights_path().parent}, or set {CONFIG_KEY} to its path; "
            "otherwise evaluate with the efficientnet_lite0 or classifier extractor"
        )
    return path


def _check_plain_state_dict(path: Path) -> None:
    """torch-fidelity loads with weights_only=False; refuse anything but tensors before it does."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a plain state_dict of tensors ({type(err).__name__}); expected torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE}, set by {CONFIG_KEY}"
        ) from err


class InceptionExtractor(FeatureExtractor):
    """2048-d pool3 features and 1008 unbiased logits of torch-fidelity's FeatureExtractorInceptionV3.

    torch-fidelity resizes to 299x299 internally with TF1-compatible bilinear interpolation
    (no antialias), so FID/IS/KID match torch-fidelity, torchmetrics(antialias=False) and the
    TF reference code. Logits are `logits_unbiased` (no fc bias), as both libraries use for IS.
    """

    def __init__(self, *, weights_path: str | None = None) -> None:
        super().__init__()
        path = resolve_inception_weights(weights_path)
        _check_plain_state_dict(path)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        self.weights_path = str(path)
        self.name = "inception_v3"
        self.num_features = 2048
        self.num_classes = 1008
        self.comparable_to_published = True
        self.eval()

    def _features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(to_rgb(images))  # (B, 2048), (B, 1008)
        return features, logits
