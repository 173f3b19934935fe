"""`first_stage.cache_latents=true`: encode the training split once and train on the cached posterior moments.

The cache file records the sha256 of the first stage's weights and of the training images it encoded;
a cache made by other weights or of other data is refused by name (never silently reused). By default
it lives at ${paths.cache_dir}/latents/<data>_<size>px_<weights hash>.pt, so retraining the autoencoder
gives a new file; `first_stage.cache_path=` names one explicitly. Written atomically (every DDP rank
that finds no cache writes the same bytes; the last rename wins).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from difflab.data.latents import LatentDataset
from difflab.data.transforms import to_model_range
from difflab.nets.first_stage import FirstStage

log = logging.getLogger("difflab")
VERSION = 1


def weights_digest(first_stage: FirstStage) -> str:
    """sha256 of the first stage's autoencoder weights (names, shapes, dtypes and values, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(first_stage.autoencoder.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def images_digest(datamodule: Any, batch_size: int = 1024) -> str:
    """sha256 of the training split's un-augmented uint8 images, in order."""
    h = hashlib.sha256()
    for images, _ in train_batches(datamodule, batch_size):
        h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def default_cache_path(cache_dir: str | os.PathLike, data_name: str, image_size: int, weights: str) -> Path:
    """${paths.cache_dir}/latents/<data>_<size>px_<first 16 hex of the weights hash>.pt"""
    return Path(cache_dir) / "latents" / f"{data_name}_{image_size}px_{weights[:16]}.pt"


def train_batches(datamodule: Any, batch_size: int):
    """(uint8 images, labels) of the training split, un-augmented, in index order."""
    dataset = datamodule.train_dataset
    for start in range(0, len(dataset), batch_size):
        yield dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))


@torch.no_grad()
def encode_split(first_stage: FirstStage, datamodule: Any, *, hflip: bool, batch_size: int = 256,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Posterior moments (mean, std) of every training image (and of its mirror image when hflip), float32."""
    stage = first_stage.to(device)
    plain, flipped, labels = [], [], []
    for images, y in train_batches(datamodule, batch_size):
        x = to_model_range(images.to(device))
        plain.append(stage.moments(x).float().cpu())
        if hflip:
            flipped.append(stage.moments(x.flip(-1)).float().cpu())
        labels.append(torch.as_tensor(y).long())
    out = {"moments": torch.cat(plain), "labels": torch.cat(labels)}
    if hflip:
        out["flipped"] = torch.cat(flipped)
    return out


def load_or_build_cache(first_stage: FirstStage, datamodule: Any, *, data_name: str, cache_dir: str | os.PathLike,
                        cache_path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> LatentDataset:
    """The training split's cached latents: read (and checked against these weights and images) or encoded now."""
    weights = weights_digest(first_stage)
    images = images_digest(datamodule)
    hflip = bool(getattr(datamodule, "hflip", False))
    path = Path(cache_path) if cache_path else default_cache_path(cache_dir, data_name, datamodule.image_size, weights)
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        check_cache(stored, path=path, weights=weights, images=images, hflip=hflip)
        log.info("latent cache: %s (%d images)", path, len(stored["moments"]))
    else:
        start = time.perf_counter()
        stored = {"version": VERSION, "weights_sha256": weights, "images_sha256": images, "hflip": hflip,
                  **encode_split(first_stage, datamodule, hflip=hflip, device=device)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(stored, tmp)
        os.replace(tmp, path)
        log.info("latent cache: encoded %d training images in %.1f s -> %s", len(stored["moments"]),
                 time.perf_counter() - start, path)
    first_stage.to("cpu")
    return LatentDataset(stored["moments"], stored["labels"], stored.get("flipped"))


def check_cache(stored: dict, *, path: Path, weights: str, images: str, hflip: bool) -> None:
    """Refuse a cache of another version, other first-stage weights, other images, or without flipped moments."""
    where = f"first_stage.cache_path={str(path)!r}"
    if not isinstance(stored, dict) or stored.get("version") != VERSION:
        raise ValueError(f"{where} is not a difflab latent cache (version {VERSION}); delete it or choose another path")
    if stored.get("weights_sha256") != weights:
        raise ValueError(f"{where} was made by other first-stage weights (sha256 {str(stored.get('weights_sha256'))[:16]}..., "
                         f"this first stage: {weights[:16]}...): it is stale; delete it, or set first_stage.cache_path=null "
                         "(a file per weights)")
    if stored.get("images_sha256") != images:
        raise ValueError(f"{where} encodes other training images (another data set, size, split or seed); delete it "
                         "or set first_stage.cache_path=null")
    if hflip and not stored.get("hflip"):
        raise ValueError(f"{where} was made without data.hflip, so it holds no flipped images; delete it or set "
                         "first_stage.cache_path=null")
