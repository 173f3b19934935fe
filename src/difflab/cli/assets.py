"""`python -m difflab.cli.assets fashion_mnist` (what `make data` runs): the one-time assets of a data set's demo,
created once where later runs look for them. Today that is the data set's feature classifier for FID / IS / rFID
(cli.feature_classifier: `<cache_dir>/classifiers/<data>_<size>px.ckpt`, at the image size of conf/data/<data>.yaml),
which difflab-train and difflab-eval would otherwise train on first use. A second run finds it and does nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from difflab.cli.config import cache_dir as default_cache_dir
from difflab.cli.feature_classifier import ensure_feature_classifier
from difflab.cli.sampler_specs import compose_config
from difflab.data.errors import DatasetNotFoundError
from difflab.metrics.build import CLASSIFIER_DATASETS, classifier_path

log = logging.getLogger("difflab")


def data_image_size(dataset: str) -> int:
    """The image size conf/data/<dataset>.yaml trains at (what the demo's runs and their metrics use)."""
    return int(compose_config("train_classifier", [f"data={dataset}"]).data.image_size)


def prepare_assets(dataset: str, *, image_size: int | None = None, cache_dir: str | Path | None = None) -> Path:
    """The feature classifier of `dataset` at `image_size` (default: its config's), trained now if missing."""
    if dataset not in CLASSIFIER_DATASETS:
        raise ValueError(f"data={dataset!r} has no one-time assets; choose one of {CLASSIFIER_DATASETS}")
    size = data_image_size(dataset) if image_size is None else int(image_size)
    cache = Path(default_cache_dir() if cache_dir is None else cache_dir)
    path = classifier_path(cache, dataset, size)
    if path.is_file():
        print(f"{dataset}: feature classifier already there: {path}")
        return path
    start = time.perf_counter()
    ensure_feature_classifier(extractor="auto", dataset=dataset, image_size=size, cache_dir=cache)
    print(f"{dataset}: feature classifier trained in {time.perf_counter() - start:.0f} s: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Create the assets of each named data set; exit 2 with the data module's message when its files are missing."""
    parser = argparse.ArgumentParser(prog="python -m difflab.cli.assets", description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="+", choices=CLASSIFIER_DATASETS, help="data sets (conf/data/<name>.yaml)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the data config's image_size")
    parser.add_argument("--cache-dir", default=None, help="default: $DIFFLAB_CACHE_DIR, else ~/.cache/difflab")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for dataset in args.data:
        try:
            prepare_assets(dataset, image_size=args.image_size, cache_dir=args.cache_dir)
        except DatasetNotFoundError as err:
            print(f"{dataset}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
