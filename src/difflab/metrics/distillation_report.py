"""The teacher-vs-students table and plot of difflab-eval students=[...]: quality against NFE, one line per model.

Rows are the engine's (metrics.evaluation.evaluate_samplers) with `model` added ('teacher', or a student's
'progressive' / 'consistency' and its checkpoint name) and, for students, `distill_seconds`: the wall-clock
time its distillation took (every run that resumed it included; the teacher's own training excluded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_KEYS = ("fid", "is_mean", "precision", "recall")


def joint_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: model, sampler, NFE, FID / IS / precision / recall, distillation seconds."""
    keys = [k for k in PLOT_KEYS if any(k in r for r in rows)]
    model_w = max([8] + [len(str(r.get("model", ""))) + 2 for r in rows])
    sampler_w = max([10] + [len(str(r["sampler"])) + 2 for r in rows])
    head = f"{'model':<{model_w}}{'sampler':<{sampler_w}}{'nfe':>5}" + "".join(f"{k:>11}" for k in keys) + f"{'distill_s':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cost = r.get("distill_seconds")
        lines.append(f"{str(r.get('model', '')):<{model_w}}{r['sampler']:<{sampler_w}}{r['nfe']:>5}"
                     + "".join(f"{r.get(k, float('nan')):>11.4f}" for k in keys)
                     + (f"{cost:>11.0f}" if cost is not None else f"{'-':>11}"))
    return "\n".join(lines)


def plot_models_vs_nfe(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric, metric against NFE (log x), one line per model and teacher sampler family (paper style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOT_KEYS if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4), squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        family = r["sampler"].split("-")[0] if r.get("model") == "teacher" else ""
        name = f"teacher {family}" if family else str(r.get("model"))
        groups.setdefault(name, []).append(r)
    for ax, key in zip(axes[0], keys):
        for name, members in groups.items():
            pts = sorted((m["nfe"], m[key]) for m in members if key in m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if name.startswith("teacher") else "s--", label=name)
        ax.set_xscale("log")
        ticks = sorted({r["nfe"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(key)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
