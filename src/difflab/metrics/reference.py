"""Reference statistics of real images, computed once per (data, extractor) and cached on disk.

A cache file `<cache_dir>/<key>.pt` holds plain tensors and a small dict (loaded with
`weights_only=True`) and is written atomically (temporary file + os.replace), so a crash never
leaves a half-written cache; an unreadable or stale file is recomputed and replaced.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from difflab.metrics.extractors.base import FeatureExtractor
from difflab.metrics.names import check_safe_name

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceKey:
    """What the statistics depend on; `str(key)` is the cache file stem, e.g.
    'cifar10-train-32px-n50000-inception_v3'."""

    dataset: str
    split: str
    resolution: int
    num_images: int
    extractor: str

    def __post_init__(self) -> None:
        for field in ("dataset", "split", "extractor"):
            check_safe_name(getattr(self, field), what=f"ReferenceKey.{field}")
        for field in ("resolution", "num_images"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ReferenceKey.{field}={value!r} is not allowed: use a positive int")

    def __str__(self) -> str:
        return f"{self.dataset}-{self.split}-{self.resolution}px-n{self.num_images}-{self.extractor}"


@dataclass
class ReferenceStats:
    """FID moments of all real images (float64) and a subsample of their features (float32)."""

    mu: Tensor  # (D,) float64
    sigma: Tensor  # (D, D) float64
    features: Tensor  # (M, D) float32, for KID and precision/recall; M <= max_features
    num_images: int  # images behind mu and sigma
    extractor: str

    @property
    def num_features(self) -> int:
        return self.mu.shape[0]

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Tensor],
        extractor: FeatureExtractor,
        *,
        num_images: int,
        max_features: int | None = 10_000,
        seed: int = 0,
    ) -> "ReferenceStats":
        """Statistics of exactly `num_images` uint8 images (B, C, H, W), features of a fixed random
        subset of at most `max_features` of them kept."""
        keep = _keep_mask(num_images, max_features, seed)
        device = _device_of(extractor)
        total = torch.zeros(extractor.num_features, dtype=torch.float64)
        outer = torch.zeros(extractor.num_features, extractor.num_features, dtype=torch.float64)
        kept, n = [], 0
        for images in batches:
            f = extractor(images.to(device)).cpu()  # (B, D) float32
            if n + f.shape[0] > num_images:
                raise ValueError(f"reference needs exactly num_images={num_images} images, batches gave more")
            total += f.double().sum(0)
            outer += f.double().T @ f.double()
            kept.append(f[keep[n : n + f.shape[0]]])
            n += f.shape[0]
        if n != num_images:
            raise ValueError(f"reference needs exactly num_images={num_images} images, batches gave {n}")
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return cls(mu=mu, sigma=sigma, features=torch.cat(kept), num_images=n, extractor=extractor.name)

    def to_dict(self) -> dict:
        return {
            "mu": self.mu,
            "sigma": self.sigma,
            "features": self.features,
            "num_images": self.num_images,
            "extractor": self.extractor,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ReferenceStats":
        return cls(
            mu=d["mu"].double(),
            sigma=d["sigma"].double(),
            features=d["features"].float(),
            num_images=int(d["num_images"]),
            extractor=str(d["extractor"]),
        )


def _keep_mask(n: int, max_features: int | None, seed: int) -> Tensor:
    if max_features is None or max_features >= n:
        return torch.ones(n, dtype=torch.bool)
    if max_features < 2:
        raise ValueError(f"max_features={max_features} is not allowed: use None or an int >= 2")
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_features]] = True
    return keep


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def load_or_compute(
    key: ReferenceKey,
    batches_fn: Callable[[], Iterable[Tensor]],
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    *,
    max_features: int | None = 10_000,
) -> ReferenceStats:
    """The cached statistics for `key`, or computed from `batches_fn()` (un-augmented uint8 real
    images) and cached. Not a collective: under DDP let rank zero call it first, then barrier."""
    if key.extractor != extractor.name:
        raise ValueError(f"ReferenceKey.extractor={key.extractor!r} but the extractor is {extractor.name!r}")
    path = Path(cache_dir) / f"{key}.pt"
    header = _header(key, extractor, max_features)
    stats = _load_if_valid(path, header)
    if stats is None:
        stats = ReferenceStats.from_batches(
            batches_fn(), extractor, num_images=key.num_images, max_features=max_features
        )
        save_atomic({**stats.to_dict(), **header}, path)
    return stats


class ReferenceData(Protocol):
    """What reference statistics need of a data module (difflab.data's image modules provide it)."""

    image_size: int

    def num_images(self, split: str) -> int: ...

    def uint8_batches(self, split: str, *, limit: int | None = None) -> Iterable[Tensor]: ...


def shared_reference(
    data: ReferenceData,
    extractor: FeatureExtractor,
    *,
    dataset: str,
    split: str,
    cache_dir: str | Path,
    num_images: int | None = None,
    is_rank_zero: bool = True,
    barrier: Callable[[], None] | None = None,
) -> ReferenceStats:
    """The reference statistics of `split` (at most num_images of its un-augmented images) on every rank.

    Rank zero computes and caches them (or reads the cache), everyone meets at `barrier` (the DDP
    barrier; None for one process), then the other ranks read the cache rank zero wrote.
    """
    n = data.num_images(split)
    n = n if num_images is None else min(n, num_images)
    key = ReferenceKey(dataset=dataset, split=split, resolution=data.image_size, num_images=n, extractor=extractor.name)
    batches = lambda: data.uint8_batches(split, limit=n)  # noqa: E731
    stats = load_or_compute(key, batches, extractor, cache_dir) if is_rank_zero else None
    if barrier is not None:
        barrier()
    return stats if stats is not None else load_or_compute(key, batches, extractor, cache_dir)


def _header(key: ReferenceKey, extractor: FeatureExtractor, max_features: int | None) -> dict:
    return {
        "format": FORMAT_VERSION,
        "key": str(key),
        "max_features": max_features,
        "weights": weights_fingerprint(extractor),
    }


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap digest of the weights, so a retrained extractor under the same name is noticed."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    sums = [t.detach().cpu().double().abs().sum() for t in tensors]  # on CPU: the same on every rank
    total = torch.stack(sums).sum().item() if sums else 0.0
    return f"{len(sums)}:{total:.6e}"


def _load_if_valid(path: Path, header: dict) -> ReferenceStats | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if {k: d.get(k) for k in header} != header:
            return None  # written by another version or with other settings: recompute
        return ReferenceStats.from_dict(d)
    except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed
        warnings.warn(f"ignoring unreadable reference cache {path} ({type(err).__name__}: {err}); recomputing")
        return None


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ClassReferenceData(ReferenceData, Protocol):
    """A labelled data module: per-class uint8 images and counts (difflab.data's labelled image modules)."""

    def class_counts(self, split: str) -> list[int]: ...

    def class_uint8_batches(self, split: str, label: int) -> Iterable[Tensor]: ...


def shared_class_references(
    data: ClassReferenceData,
    extractor: FeatureExtractor,
    *,
    dataset: str,
    split: str,
    cache_dir: str | Path,
    is_rank_zero: bool = True,
    barrier: Callable[[], None] | None = None,
) -> list[ReferenceStats]:
    """Reference statistics of every class of `split` (index = class), for per-class FID; cached like shared_reference."""
    counts = data.class_counts(split)
    keys = [ReferenceKey(dataset=dataset, split=f"{split}_class{k}", resolution=data.image_size, num_images=n,
                         extractor=extractor.name) for k, n in enumerate(counts) if n > 0]
    if len(keys) != len(counts):
        empty = [k for k, n in enumerate(counts) if n == 0]
        raise ValueError(f"classes {empty} have no image in the {split!r} split; per-class FID needs every class")

    def compute() -> list[ReferenceStats]:
        return [load_or_compute(key, lambda k=k: data.class_uint8_batches(split, k), extractor, cache_dir)
                for k, key in enumerate(keys)]

    stats = compute() if is_rank_zero else None
    if barrier is not None:
        barrier()
    return stats if stats is not None else compute()
