"""What a run directory holds, read back without a dashboard: overrides, status, metrics, files.

A run directory (one job of a Hydra sweep, or a single run) has `.hydra/overrides.yaml`; difflab-train
adds `status.json` (running / finished / interrupted / failed, the final callback metrics and step),
the CSV logger `csv/metrics.csv` (the metric history), the evaluation callback `eval/metrics.json`
(quality per sampler and NFE at each evaluation), `checkpoints/*.ckpt` and `samples/*.png` grids.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

STATUS_FILE = "status.json"
# metric name patterns whose larger values are better; every other metric is minimised
HIGHER_IS_BETTER = re.compile(r"(^|/)(is_mean|precision|recall|acc\w*)(/|$)")
IGNORED_METRICS = re.compile(r"^(epoch|step)$|^lr-|_std(/|$)")  # bookkeeping and spreads, not results


@contextmanager
def run_status(run_dir: Path, *, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Write <run_dir>/status.json: 'running' now, then 'finished', 'interrupted' or 'failed' (+ error).

    The caller may add keys (metrics, global_step, ...) to the yielded dict; they are written at exit.
    """
    status: dict[str, Any] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write = (lambda: _write_json(run_dir / STATUS_FILE, status)) if enabled else (lambda: None)
    write()
    try:
        yield status
        status["status"] = "finished"
    except Exception as exc:
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-8))
        raise
    except BaseException as exc:  # KeyboardInterrupt, SystemExit (Lightning's SIGTERM exit on preemption)
        status.update(status="interrupted", error=type(exc).__name__)
        raise
    finally:
        status["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def higher_is_better(metric: str) -> bool:
    """True for IS, precision, recall, accuracy; False for losses, FID, KID."""
    return bool(HIGHER_IS_BETTER.search(metric))


@dataclass
class Best:
    value: float
    step: int | None


@dataclass
class Run:
    """Everything the report shows about one run directory."""

    path: Path
    name: str
    overrides: dict[str, str]
    status: str
    error: str | None = None
    global_step: int | None = None
    optimized_metric: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, Best] = field(default_factory=dict)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.json rows of the last evaluation
    checkpoints: list[Path] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)  # the newest sample grid of each sampler


def find_runs(root: Path) -> list[Path]:
    """Every run directory (holding .hydra/overrides.yaml) below root, in job order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{str(root)!r} does not exist; pass a Hydra multirun directory "
                                "(e.g. outputs/multirun/<date>/<time>)")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a directory; pass a Hydra multirun directory")
    runs = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml") if ".submitit" not in p.parts]
    if not runs:
        raise ValueError(f"no runs in {str(root)!r}: no */.hydra/overrides.yaml below it "
                         "(is it the output of `difflab-train -m ...`?)")
    return sorted(runs, key=_job_order)


def _job_order(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """['schedule=cosine', '+trainer.x=1', '~a'] -> {'schedule': 'cosine', '+trainer.x': '1', '~a': ''}."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key] = value
    return out


def read_run(path: Path, root: Path) -> Run:
    """Read one run directory; missing files leave fields empty, never raise."""
    overrides = parse_overrides(yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or [])
    status = _read_json(path / STATUS_FILE)
    name = str(path.relative_to(root)) if path != root else path.name
    run = Run(path=path, name=name, overrides=overrides, status=status.get("status", "unknown"),
              error=status.get("error"), global_step=status.get("global_step"),
              optimized_metric=status.get("optimized_metric"))
    history = read_csv_metrics(path / "csv" / "metrics.csv")
    run.eval_rows, eval_history = read_eval(path / "eval" / "metrics.json")
    for metric, points in {**history, **eval_history}.items():
        run.final[metric] = points[-1][1]
        pick = max if higher_is_better(metric) else min
        step, value = pick(points, key=lambda p: p[1])
        run.best[metric] = Best(value, step)
    run.final.update({k: float(v) for k, v in (status.get("metrics") or {}).items()
                      if not IGNORED_METRICS.search(k) and _finite(v)})
    run.checkpoints = sorted((path / "checkpoints").glob("*.ckpt")) + sorted(path.glob("hpc_ckpt_*.ckpt"))
    run.grids = newest_grids(path / "samples")
    return run


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def read_csv_metrics(path: Path) -> dict[str, list[tuple[int | None, float]]]:
    """Lightning CSVLogger metrics.csv -> {metric: [(step, value), ...]} in file order."""
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[int | None, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"])) if row.get("step") not in (None, "") else None
            for key, value in row.items():
                if key and not IGNORED_METRICS.search(key) and value not in (None, "") and _finite(value):
                    out.setdefault(key, []).append((step, float(value)))
    return out


EVAL_KEYS = ("fid", "is_mean", "kid_mean", "precision", "recall")


def read_eval(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int | None, float]]]]:
    """eval/metrics.json -> (rows of the last evaluation, {eval/<metric>/<sampler>: [(step, value)]})."""
    rows = _read_json(path).get("results") or []
    history: dict[str, list[tuple[int | None, float]]] = {}
    for r in rows:
        for key in EVAL_KEYS:
            if key in r and _finite(r[key]):
                history.setdefault(f"eval/{key}/{r['sampler']}", []).append((r.get("step"), float(r[key])))
    last = max((r.get("step", -1) for r in rows), default=None)
    return [r for r in rows if r.get("step", -1) == last], history


def newest_grids(samples: Path) -> list[Path]:
    """The newest <sampler>_step<k>.png of each sampler."""
    newest: dict[str, tuple[int, Path]] = {}
    for p in samples.glob("*.png"):
        match = re.match(r"(?P<sampler>.+)_step(?P<step>\d+)$", p.stem)
        sampler, step = (match["sampler"], int(match["step"])) if match else (p.stem, -1)
        if sampler not in newest or step > newest[sampler][0]:
            newest[sampler] = (step, p)
    return [newest[k][1] for k in sorted(newest)]


def metric_order(runs: list[Run]) -> list[str]:
    """val/* first, then train/*, then eval/* (FID first), then the rest."""
    names = {m for r in runs for m in (*r.final, *r.best)}
    rank = lambda m: (0 if m.startswith("val/") else 1 if m.startswith("train/") else  # noqa: E731
                      2 if m.startswith("eval/fid") else 3 if m.startswith("eval/") else 4, m)
    return sorted(names, key=rank)


def varying_overrides(runs: list[Run]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between runs, {key: value} shared by all runs)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    common = {k: runs[0].overrides[k] for k in keys if k not in varying}
    return varying, common
