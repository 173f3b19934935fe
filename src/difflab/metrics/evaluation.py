"""The evaluation engine: FID/IS/KID/PR of a model's samplers, sample indices sharded over DDP ranks.

Used by the training callback (difflab.callbacks.Evaluation) and difflab-eval. Sample i always uses
seed base + i and rank r takes a contiguous block of indices, so the same checkpoint, seeds and
sample count give the same images, and the same metrics, on any number of processes.
`GenerativeMetrics.compute()` is a collective: every rank calls it; the caller's rank zero writes.

The engine knows neither the module nor the samplers' classes: a model is anything with
`sample(sampler, seeds, *, use_ema, labels=, guidance_scale=, precision=)` returning images in
[-1, 1], and a sampler anything with `name`, `nfe(T)` and `validate(T)`. The sampling path checks
what it is asked (guidance scales included), so callers validate before they call.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Protocol, Sequence

import torch

from difflab.metrics.generative import GenerativeMetrics
from difflab.data.transforms import to_uint8  # the one [-1, 1] -> uint8 formula: samples quantised like real images


class SamplerLike(Protocol):
    """What the engine asks of a sampler: a name, its network evaluations per sample, a validity check."""

    @property
    def name(self) -> str: ...

    def nfe(self, T: int) -> int: ...

    def validate(self, T: int) -> None: ...


class SamplingModel(Protocol):
    """What evaluation needs of a model: its public sample() (images in [-1, 1], one per seed)."""

    def sample(self, sampler: Any, seeds: Sequence[int], *, use_ema: bool = True, **kwargs: Any) -> torch.Tensor: ...


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank r's contiguous block of 0..n-1; concatenated in rank order the blocks give 0..n-1."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def sampler_label(sampler: SamplerLike, T: int) -> str:
    """'<sampler>-<steps>', e.g. ddpm-1000, ddim-50."""
    name = sampler.name
    return name if name.rsplit("-", 1)[-1].isdigit() else f"{name}-{sampler.nfe(T)}"


def evaluate_sampler(
    model: SamplingModel,
    sampler: SamplerLike,
    metrics: GenerativeMetrics,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    use_ema: bool = True,
    guidance_scale: float | None = None,
    num_classes: int | None = None,
    precision: str | int | None = None,
) -> dict[str, float]:
    """Stream this rank's share of num_samples through the metrics; returns the synced scores.

    With guidance_scale (class-conditional models) sample i gets label i mod num_classes, so every
    class is equally represented and labels, like seeds, do not depend on sharding.
    """
    metrics.reset()
    block = shard(num_samples, rank, world_size)
    for start in range(block.start, block.stop, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, block.stop))
        kwargs: dict[str, Any] = {} if precision is None else {"precision": precision}
        if guidance_scale is not None:
            kwargs |= {"labels": [(s - seed) % num_classes for s in seeds], "guidance_scale": guidance_scale}
        metrics.update_fake(to_uint8(model.sample(sampler, seeds, use_ema=use_ema, **kwargs)))
    return metrics.compute()


def evaluate_samplers(
    model: SamplingModel,
    samplers: Mapping[str, SamplerLike],
    metrics: GenerativeMetrics,
    *,
    T: int,
    num_samples: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    use_ema: bool = True,
    guidance_scales: Sequence[float] | None = None,
    num_classes: int | None = None,
    precision: str | int | None = None,
) -> list[dict[str, Any]]:
    """One row per sampler (and guidance scale w, for class-conditional models): label, NFE, every metric, settings.

    NFE counts network evaluations per sample: a guided step (w not 0 or 1) evaluates the net twice.
    """
    check_guidance_scales(guidance_scales, num_classes)
    rows = []
    for sampler in samplers.values():
        sampler.validate(T)
    for sampler in samplers.values():
        for w in guidance_scales or [None]:
            start = time.perf_counter()
            scores = evaluate_sampler(
                model, sampler, metrics, num_samples=num_samples, batch_size=batch_size, seed=seed,
                rank=rank, world_size=world_size, use_ema=use_ema, guidance_scale=w, num_classes=num_classes,
                precision=precision,
            )
            label, nfe = sampler_label(sampler, T), sampler.nfe(T)
            row = {"sampler": label if w is None else f"{label}-w{w:g}", "nfe": nfe if w in (None, 0.0, 1.0) else 2 * nfe}
            if w is not None:
                row["guidance_scale"] = w
            rows.append({
                **row, **scores,
                "num_samples": num_samples, "seed": seed, "extractor": metrics.extractor.name,
                "weights": "ema" if use_ema else "raw", "sampling_precision": str(precision or 32),
                "seconds": round(time.perf_counter() - start, 2),
                "settings": repr(sampler),
            })
    return rows


def check_guidance_scales(guidance_scales: Sequence[float] | None, num_classes: int | None) -> None:
    """A guidance sweep labels sample i with class i mod num_classes: it needs a class-conditional model.
    (The scales' values are checked where guidance is built: samplers.generate.Guidance.)"""
    if guidance_scales and num_classes is None:
        raise ValueError(
            f"guidance_scales={list(guidance_scales)} but the model is unconditional (num_classes=None); "
            "train with model.num_classes=auto or set guidance_scales to null"
        )
