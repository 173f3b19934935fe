"""Sample-based evaluation (FID/IS/KID/PR) of a model's samplers, sharded over DDP ranks.

Sample i always uses seed base + i and rank r takes a contiguous block of indices, so the same
checkpoint, seeds and sample count give the same images, and the same metrics, on any number of
processes. `GenerativeMetrics.compute()` is a collective: every rank calls it; rank zero writes.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from difflab.data.transforms import to_uint8
from difflab.metrics.generative import GenerativeMetrics
from difflab.metrics.reference import ReferenceKey, load_or_compute
from difflab.samplers.base import Sampler
from difflab.nets.inference import autocast_dtype

log = logging.getLogger("difflab")


class SamplingModel(Protocol):
    """What evaluation needs of a model: its public sample() and its number of timesteps."""

    def sample(self, sampler: Sampler, seeds: Sequence[int], *, use_ema: bool = True, **guidance) -> torch.Tensor: ...


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank r's contiguous block of 0..n-1; concatenated in rank order the blocks give 0..n-1."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def sampler_label(sampler: Sampler, T: int) -> str:
    """'<sampler>-<steps>', e.g. ddpm-1000, ddim-50."""
    name = sampler.name
    return name if name.rsplit("-", 1)[-1].isdigit() else f"{name}-{sampler.nfe(T)}"


def evaluate_sampler(
    model: SamplingModel,
    sampler: Sampler,
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
    samplers: Mapping[str, Sampler],
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
    """Guidance scales need a class-conditional model and must be >= 0."""
    if not guidance_scales:
        return
    if num_classes is None:
        raise ValueError(
            f"guidance_scales={list(guidance_scales)} but the model is unconditional (num_classes=None); "
            "train with model.num_classes=auto or set guidance_scales to null"
        )
    bad = [w for w in guidance_scales if not float(w) >= 0]
    if bad:
        raise ValueError(f"guidance_scales contains {bad[0]!r}; every w must be >= 0 (0 unconditional, 1 conditional)")


METRIC_KEYS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")


def flat_metrics(rows: Iterable[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """{'eval/fid/ddim-50': ...} for loggers."""
    return {f"{prefix}/{k}/{r['sampler']}": float(r[k]) for r in rows for k in METRIC_KEYS if k in r}


def write_results(rows: list[dict[str, Any]], out_dir: Path, stem: str, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """metrics JSON, quality-vs-NFE CSV and PNG plot in out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}_vs_nfe.csv", "png": out_dir / f"{stem}_vs_nfe.png"}
    paths["json"].write_text(json.dumps({"results": rows, **(extra or {})}, indent=2, default=str))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_quality_vs_nfe(rows, paths["png"])
    if any("guidance_scale" in r for r in rows) and any("fid" in r and "is_mean" in r for r in rows):
        paths["fid_vs_is"] = out_dir / f"{stem}_fid_vs_is.png"
        plot_fid_vs_is(rows, paths["fid_vs_is"])
    return paths


def plot_fid_vs_is(rows: list[dict[str, Any]], path: Path) -> None:
    """FID against IS, one line per sampler through its guidance scales, each point labelled w (Ho & Salimans 2022, Fig. 1 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "guidance_scale" in r and "fid" in r and "is_mean" in r:
            groups.setdefault(r["settings"] + str(r.get("step", "")), []).append(r)
    for members in groups.values():
        members = sorted(members, key=lambda r: r["guidance_scale"])
        base = members[0]["sampler"].rsplit("-w", 1)[0] + (f" @{members[0]['step']}" if "step" in members[0] else "")
        ax.plot([r["is_mean"] for r in members], [r["fid"] for r in members], "o-", label=base)
        for r in members:
            ax.annotate(f"w={r['guidance_scale']:g}", (r["is_mean"], r["fid"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("IS")
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_quality_vs_nfe(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric present: metric against NFE (log x), one labelled point per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fid", "is_mean", "kid_mean", "precision", "recall") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = sorted((r["nfe"], r[key], r["sampler"]) for r in rows if key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for nfe, value, label in pts:
            ax.annotate(label, (nfe, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xticks(sorted({p[0] for p in pts}), [str(p) for p in sorted({p[0] for p in pts})])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A compact fixed-width table of the metrics per sampler."""
    keys = [k for k in METRIC_KEYS if any(k in r for r in rows)]
    head = f"{'sampler':<16}{'nfe':>6}" + "".join(f"{k:>11}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['sampler']:<16}{r['nfe']:>6}" + "".join(f"{r[k]:>11.4f}" for k in keys))
    return "\n".join(lines)


class Evaluation(pl.Callback):
    """Every N steps (and at the end of training) score each sampler with FID/IS/KID/PR on all ranks."""

    def __init__(
        self,
        *,
        metrics: GenerativeMetrics,
        samplers: Mapping[str, Sampler],
        dataset: str,
        cache_dir: str,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 250,
        seed: int = 0,
        use_ema: bool = True,
        reference_split: str = "train",
        reference_images: int | None = None,
        at_train_end: bool = True,
        guidance_scales: Sequence[float] | None = None,
        precision: str | int | None = None,
    ) -> None:
        if precision is not None:
            autocast_dtype(precision)  # names the bad value before any training
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"every_n_steps={every_n_steps}, num_samples={num_samples}, batch_size={batch_size}: "
                "need every_n_steps >= 1, num_samples >= 2, batch_size >= 1"
            )
        self.metrics, self.samplers, self.dataset, self.cache_dir = metrics, dict(samplers), dataset, cache_dir
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.seed, self.use_ema, self.at_train_end = seed, use_ema, at_train_end
        self.reference_split, self.reference_images = reference_split, reference_images
        self.guidance_scales = None if not guidance_scales else [float(w) for w in guidance_scales]
        self.precision = precision  # sampling precision: None float32, bf16-mixed / 16-mixed autocast
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_guidance_scales(self.guidance_scales, getattr(pl_module, "num_classes", None))
        for sampler in self.samplers.values():
            pl_module.check_sampler(sampler)
        self.metrics.to(pl_module.device)
        dm = trainer.datamodule
        n = dm.num_images(self.reference_split)
        n = n if self.reference_images is None else min(n, self.reference_images)
        key = ReferenceKey(dataset=self.dataset, split=self.reference_split, resolution=dm.image_size,
                           num_images=n, extractor=self.metrics.extractor.name)
        batches = lambda: dm.uint8_batches(self.reference_split, limit=n)  # noqa: E731
        if trainer.is_global_zero:  # rank zero computes and caches, the others then read the cache
            reference = load_or_compute(key, batches, self.metrics.extractor, self.cache_dir)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            reference = load_or_compute(key, batches, self.metrics.extractor, self.cache_dir)
        self.metrics.set_reference(reference)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        rows = evaluate_samplers(
            pl_module, self.samplers, self.metrics, T=pl_module.schedule.T, num_samples=self.num_samples,
            batch_size=self.batch_size, seed=self.seed, rank=trainer.global_rank,
            world_size=trainer.world_size, use_ema=self.use_ema, guidance_scales=self.guidance_scales,
            num_classes=getattr(pl_module, "num_classes", None), precision=self.precision,
        )
        for r in rows:
            r["step"] = step
        self.history.extend(rows)
        # on every rank, so ModelCheckpoint / EarlyStopping can monitor them and a sweeper can read them
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in flat_metrics(rows).items()})
        self._publish(trainer, rows, step)

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer, rows: list[dict[str, Any]], step: int) -> None:
        out = Path(trainer.default_root_dir) / "eval"
        paths = write_results(self.history, out, "metrics", {"last_step": step})
        log.info("evaluation at step %d (%s, %d samples):\n%s", step, self.metrics.extractor.name,
                 self.num_samples, format_table(rows))
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(rows), step=step)
            if isinstance(logger, WandbLogger):
                columns = [k for k in rows[0] if k != "settings"]
                logger.log_table(key="eval/quality_vs_nfe", columns=columns,
                                 data=[[r[c] for c in columns] for r in rows], step=step)
                logger.log_image(key="eval/quality_vs_nfe_plot", images=[str(paths["png"])], step=step)
                if "fid_vs_is" in paths:
                    logger.log_image(key="eval/fid_vs_is_plot", images=[str(paths["fid_vs_is"])], step=step)
