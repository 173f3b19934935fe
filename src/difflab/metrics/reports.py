"""What an evaluation writes: metrics JSON, quality-vs-NFE CSV and plots, a fixed-width table, logger keys.

Rows are the engine's (difflab.metrics.evaluation.evaluate_samplers): one dict per sampler (and
guidance scale) with `sampler`, `nfe`, the metric values and the settings that produced them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

METRIC_KEYS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall", "class_accuracy",
               "prompt_accuracy", "clip_score")


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
    if any("prompt_accuracy" in r for r in rows):  # text models: accuracy and FID vs guidance scale
        paths["prompt_sweep"] = out_dir / f"{stem}_prompt_sweep.png"
        plot_prompt_sweep(rows, paths["prompt_sweep"])
    if any("sigma_rel" in r for r in rows):  # post-hoc EMA sweep (difflab-eval ema.sigma_rel=[...])
        paths["vs_sigma_rel"] = out_dir / f"{stem}_vs_sigma_rel.png"
        plot_vs_sigma_rel(rows, paths["vs_sigma_rel"])
    return paths


def best_sigma_rel(rows: list[dict[str, Any]], key: str = "fid") -> dict[str, dict[str, Any]]:
    """{sampler label without its -ema<sigma_rel> suffix: the row of lowest `key`} over a post-hoc EMA sweep."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "sigma_rel" in r and key in r:
            base = r["sampler"].removesuffix(f"-ema{r['sigma_rel']:g}")
            if base not in best or r[key] < best[base][key]:
                best[base] = r
    return best


def plot_vs_sigma_rel(rows: list[dict[str, Any]], path: Path, key: str = "fid") -> None:
    """A metric (FID) against the post-hoc EMA length sigma_rel, one line per sampler, the best marked (EDM2, Fig. 5 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for base, best in best_sigma_rel(rows, key).items():
        pts = sorted((r["sigma_rel"], r[key]) for r in rows
                     if "sigma_rel" in r and key in r and r["sampler"].removesuffix(f"-ema{r['sigma_rel']:g}") == base)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=base)
        ax.plot([best["sigma_rel"]], [best[key]], "*", ms=14, color=line.get_color())
        ax.annotate(f"best {best['sigma_rel']:g}: {best[key]:.3g}", (best["sigma_rel"], best[key]), fontsize=7,
                    xytext=(4, 6), textcoords="offset points")
    ax.set_xscale("log")
    ticks = sorted({r["sigma_rel"] for r in rows if "sigma_rel" in r})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("EMA length sigma_rel (post hoc)")
    ax.set_ylabel(key.upper() if key == "fid" else key)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def plot_prompt_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Prompt accuracy and FID against the guidance scale w, one line per sampler and phrasing set (training / held-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("prompt_accuracy", "fid") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "prompt_accuracy" in r and "guidance_scale" in r:
            base = r["sampler"].rsplit("-w", 1)[0]
            groups.setdefault(f"{base} {r['prompts']}", []).append(r)
    for ax, key in zip(axes[0], keys):
        for name, members in groups.items():
            members = sorted((r for r in members if key in r), key=lambda r: r["guidance_scale"])
            ax.plot([r["guidance_scale"] for r in members], [r[key] for r in members], "o-", label=name)
        ax.set_xlabel("guidance scale w")
        ax.set_title(key.replace("_", " "))
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
    width = max([16] + [len(r["sampler"]) + 2 for r in rows])
    head = f"{'sampler':<{width}}{'nfe':>6}" + "".join(f"{k:>{max(11, len(k) + 1)}}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['sampler']:<{width}}{r['nfe']:>6}"
                     + "".join(f"{r.get(k, float('nan')):>{max(11, len(k) + 1)}.4f}" for k in keys))
    return "\n".join(lines)
