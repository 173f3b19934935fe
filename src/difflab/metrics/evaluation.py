"""The evaluation engine: FID/IS/KID/PR of a model's samplers, sample indices sharded over DDP ranks.

Used by the training callback (difflab.callbacks.Evaluation) and difflab-eval. Sample i always uses
seed base + i and rank r takes a contiguous block of indices, so the same checkpoint, seeds and
sample count give the same images, and the same metrics, on any number of processes.
`GenerativeMetrics.compute()` is a collective: every rank calls it; the caller's rank zero writes.

The engine knows neither the module nor the samplers' classes: a model is anything with
`sample(sampler, seeds, *, use_ema, labels=, prompts=, guidance_scale=, precision=)` returning images in
[-1, 1], and a sampler anything with `name`, `nfe(T)` and `validate(T)`. The sampling path checks
what it is asked (guidance scales included), so callers validate before they call.

Conditional models are scored per class: sample i asks for class i mod K (by label, or by a prompt of
that class, phrasing (i // K) mod its phrasings), so classes are balanced and independent of sharding;
with the data's own classifier as extractor the rows add class (prompt) accuracy.
"""

from __future__ import annotations

import itertools
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


def class_prompt_of(i: int, class_prompts: Sequence[Sequence[str]]) -> str:
    """The prompt of sample i: class i mod K, its phrasing (i // K) mod the class's phrasings."""
    phrasings = class_prompts[i % len(class_prompts)]
    return phrasings[(i // len(class_prompts)) % len(phrasings)]


def prompt_id_of(i: int, class_prompts: Sequence[Sequence[str]]) -> int:
    """The index of sample i's prompt in all phrasings listed class by class (the per-prompt CLIP score's key)."""
    k = i % len(class_prompts)
    return sum(len(p) for p in class_prompts[:k]) + (i // len(class_prompts)) % len(class_prompts[k])


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
    class_prompts: Sequence[Sequence[str]] | None = None,
    clip: Any = None,
    clip_scale: float | None = None,
) -> dict[str, float]:
    """Stream this rank's share of num_samples through the metrics; returns the synced scores.

    With guidance_scale, sample i asks for class i mod K: label i mod num_classes (class-conditional
    models) or a prompt of that class from class_prompts (text models), so every class is equally
    represented and conditions, like seeds, do not depend on sharding. With `clip` and clip_scale the samples are
    steered towards their prompts by CLIP guidance (any DDPM model; the model's sample() takes clip, clip_scale).
    """
    metrics.reset()
    block = shard(num_samples, rank, world_size)
    classes = len(class_prompts) if class_prompts is not None else num_classes
    scored = guidance_scale is not None and classes == metrics.extractor.num_classes  # the data's own classifier
    for start in range(block.start, block.stop, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, block.stop))
        kwargs: dict[str, Any] = {} if precision is None else {"precision": precision}
        targets = None
        if guidance_scale is not None:
            asked = [(s - seed) % classes for s in seeds]
            kwargs |= {"guidance_scale": guidance_scale}
            if class_prompts is not None:
                kwargs["prompts"] = [class_prompt_of(s - seed, class_prompts) for s in seeds]
            else:
                kwargs["labels"] = asked
            targets = torch.tensor(asked) if scored else None
        if clip is not None:
            kwargs |= {"clip": clip, "clip_scale": clip_scale}
        images = to_uint8(model.sample(sampler, seeds, use_ema=use_ema, **kwargs))
        ids = None if class_prompts is None else torch.tensor([prompt_id_of(s - seed, class_prompts) for s in seeds])
        metrics.update_fake(images, None if targets is None else targets.to(images.device), kwargs.get("prompts"), ids)
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
    prompt_sets: Mapping[str, Sequence[Sequence[str]]] | None = None,
    clip: Any = None,
    clip_scales: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One row per sampler (and guidance scale w, for conditional models): label, NFE, every metric, settings.

    prompt_sets ({"train": per-class phrasings, "heldout": ...}) score a text model: one row per sampler,
    phrasing set and w, with prompt_accuracy (class_accuracy of the prompts' classes), and clip_score (overall;
    clip_score_per_prompt: {prompt: score}) when the metrics have a CLIP scorer. `clip` with clip_scales: one row per
    CLIP guidance scale s as well (any DDPM model, prompted by prompt_sets).
    NFE counts network evaluations per sample: a guided step (w not 0 or 1) evaluates the net twice.
    """
    if prompt_sets is None:
        check_guidance_scales(guidance_scales, num_classes)
    elif not guidance_scales:
        guidance_scales = [1.0]
    rows = []
    for sampler in samplers.values():
        sampler.validate(T)
    for sampler in samplers.values():
        for (phrasing, prompts), w, s in itertools.product((prompt_sets or {None: None}).items(), guidance_scales or [None],
                                                           (clip_scales or [None]) if clip is not None else [None]):
            start = time.perf_counter()
            scores = evaluate_sampler(
                model, sampler, metrics, num_samples=num_samples, batch_size=batch_size, seed=seed,
                rank=rank, world_size=world_size, use_ema=use_ema, guidance_scale=w, num_classes=num_classes,
                precision=precision, class_prompts=prompts, clip=None if s is None else clip, clip_scale=s,
            )
            label, nfe = sampler_label(sampler, T), sampler.nfe(T)
            row = {"sampler": label if w is None else f"{label}-w{w:g}", "nfe": nfe if w in (None, 0.0, 1.0) else 2 * nfe}
            if w is not None:
                row["guidance_scale"] = w
            if s is not None:
                row["sampler"] += f"-clip{s:g}"
                row["clip_guidance_scale"] = s
            if "clip_scores" in scores:  # per prompt: {prompt: CLIP score} over the prompts this set asked for
                flat = [p for phrasings in (prompts or []) for p in phrasings]
                scores["clip_score_per_prompt"] = {flat[i]: v for i, v in enumerate(scores.pop("clip_scores"))
                                                   if i < len(flat) and v == v}
            if phrasing is not None:
                row["sampler"] += f"-{phrasing}"
                row["prompts"] = phrasing
                scores = {("prompt_" + k.removeprefix("class_") if k.startswith("class_") else k): v
                          for k, v in scores.items()}
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
