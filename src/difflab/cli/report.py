"""difflab-report <multirun dir>: a Markdown table and an HTML page of every run of a sweep.

    difflab-report outputs/multirun/2026-11-22/10-00-00            # -> report.md, report.html there
    difflab-report outputs/multirun/2026-11-22/10-00-00 --out review/

One row per run: the overrides that differ between runs as columns, the status (finished, failed
with its error, interrupted, running or killed, no metrics), every metric's final value and its
best value with the step it was reached at, checkpoints and the newest sample grids. The HTML page
adds a quality-vs-NFE plot per run (report_nfe_<run>.png next to it) and grid thumbnails.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from difflab.cli.runs import Run, find_runs, higher_is_better, metric_order, read_run, varying_overrides

STATUS_TEXT = {"running": "running or killed"}


def status_text(run: Run) -> str:
    """'finished', 'failed: ValueError: ...', 'no metrics', 'no status file' (older runs), ..."""
    if run.status == "unknown":
        return "no status file" if run.final or run.best else "no metrics"
    text = STATUS_TEXT.get(run.status, run.status)
    if not (run.final or run.best):
        text += ", no metrics"
    return f"{text}: {run.error}" if run.error and run.status == "failed" else text


def best_runs(runs: list[Run], metrics: list[str]) -> dict[str, set[str]]:
    """{metric: names of the runs whose final value is the best of the sweep (ties all count)}."""
    out = {}
    for m in metrics:
        scored = [(r.final[m], r.name) for r in runs if m in r.final]
        if scored:
            top = (max if higher_is_better(m) else min)(v for v, _ in scored)
            out[m] = {name for v, name in scored if v == top}
    return out


def cell(run: Run, metric: str) -> str:
    """'0.1234 (best 0.1200 @40)' or '' when the run never logged the metric."""
    final, best = run.final.get(metric), run.best.get(metric)
    text = "" if final is None else f"{final:.4g}"
    if best is not None and (final is None or not math.isclose(best.value, final, rel_tol=1e-5, abs_tol=1e-12)):
        at = f" @{best.step}" if best.step is not None else ""
        text += f" (best {best.value:.4g}{at})"
    return text


def table(runs: list[Run], root: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows of plain text, metric names) shared by the Markdown and the HTML report."""
    varying, _ = varying_overrides(runs)
    metrics = metric_order(runs)
    header = ["run", *varying, "status", "step", *metrics, "checkpoints", "sample grids"]
    rows = []
    for r in runs:
        rows.append([r.name, *(r.overrides.get(k, "") for k in varying), status_text(r),
                     "" if r.global_step is None else str(r.global_step), *(cell(r, m) for m in metrics),
                     ", ".join(p.name for p in r.checkpoints), ", ".join(p.stem for p in r.grids)])
    return header, rows, metrics


def summary_lines(runs: list[Run], root: Path) -> list[str]:
    """Counts per status, the overrides shared by all runs, Optuna's result if any."""
    _, common = varying_overrides(runs)
    counts: dict[str, int] = {}
    for r in runs:
        key = status_text(r).split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
             "Shared overrides: " + (" ".join(f"{k}={v}" for k, v in common.items()) or "none")]
    optimized = sorted({r.optimized_metric for r in runs if r.optimized_metric})
    if optimized:
        lines.append("Optimised metric (returned to the sweeper): " + ", ".join(optimized))
    optuna = root / "optimization_results.yaml"
    if optuna.is_file():
        res = yaml.safe_load(optuna.read_text()) or {}
        lines.append(f"Optuna: best value {res.get('best_value')} with {res.get('best_params')}")
    return lines


def markdown(runs: list[Run], root: Path) -> str:
    header, rows, metrics = table(runs, root)
    best = best_runs(runs, metrics)
    first_metric = header.index("step") + 1
    out = [f"# Sweep report: {root}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    out += [f"- {line}" for line in summary_lines(runs, root)]
    out += ["- Cells: final value (best value @ step, when different); **bold** = best final value of the sweep", ""]
    out.append("| " + " | ".join(_md(h) for h in header) + " |")
    out.append("|" + "---|" * len(header))
    for r, row in zip(runs, rows):
        cells = [_md(c) for c in row]
        for j, m in enumerate(metrics):
            if r.name in best.get(m, ()) and cells[first_metric + j]:
                cells[first_metric + j] = f"**{cells[first_metric + j]}**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def plot_nfe(run: Run, out_dir: Path) -> Path | None:
    """report_nfe_<run>.png in out_dir: the run's last evaluation, quality against NFE (None if none)."""
    if not run.eval_rows:
        return None
    from difflab.metrics.reports import plot_quality_vs_nfe

    path = out_dir / f"report_nfe_{run.name.replace(os.sep, '_')}.png"
    plot_quality_vs_nfe(run.eval_rows, path)
    return path


def html_page(runs: list[Run], root: Path, out_dir: Path, plots: dict[str, Path | None]) -> str:
    header, rows, metrics = table(runs, root)
    best = best_runs(runs, metrics)
    first_metric, n_cols = header.index("step") + 1, len(header)
    rel = lambda p: html.escape(os.path.relpath(p, out_dir))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*header[:-2], "checkpoints", "sample grids", "quality vs NFE"])
    body = []
    for r, row in zip(runs, rows):
        cls = "ok" if r.status == "finished" else "bad"
        cells = []
        for j, text in enumerate(row[: n_cols - 2]):
            m = metrics[j - first_metric] if first_metric <= j < first_metric + len(metrics) else None
            strong = m is not None and r.name in best.get(m, ()) and text
            cells.append(f"<td class='{cls if j == header.index('status') else ''}'>"
                         f"{'<b>' if strong else ''}{html.escape(text)}{'</b>' if strong else ''}</td>")
        cells.append("<td>" + "<br>".join(f"<a href='{rel(p)}'>{html.escape(p.name)}</a>" for p in r.checkpoints) + "</td>")
        cells.append("<td>" + " ".join(
            f"<a href='{rel(p)}'><img src='{rel(p)}' title='{html.escape(p.name)}' class='grid'></a>" for p in r.grids) + "</td>")
        plot = plots.get(r.name)
        cells.append(f"<td><a href='{rel(plot)}'><img src='{rel(plot)}' class='plot'></a></td>" if plot else "<td></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(runs, root))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep report: {html.escape(str(root))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }} th {{ background: #f3f3f3; }}
td.ok {{ color: #070; }} td.bad {{ color: #b00; }}
img.grid {{ width: 96px; image-rendering: pixelated; }} img.plot {{ width: 320px; }}
</style></head><body>
<h1>Sweep report: {html.escape(str(root))}</h1>
<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Cells: final value (best value @ step, when different);
<b>bold</b> = best final value of the sweep.</p>
<ul>{summary}</ul>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""


def write_report(root: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Read every run below root; write report.md, report.html and the NFE plots into out_dir (default root)."""
    root = Path(root).resolve()
    runs = [read_run(p, root) for p in find_runs(root)]
    out_dir = Path(out_dir).resolve() if out_dir else root
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {r.name: plot_nfe(r, out_dir) for r in runs}
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html"}
    paths["md"].write_text(markdown(runs, root))
    paths["html"].write_text(html_page(runs, root, out_dir, plots))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="difflab-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (outputs/multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.sweep_dir, args.out)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"difflab-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"markdown: {paths['md']}\nhtml: {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
