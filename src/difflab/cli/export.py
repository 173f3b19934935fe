"""difflab-export: a normal difflab checkpoint whose EMA is the post-hoc EMA of one sigma_rel (Karras et al. 2024).

    difflab-export ckpt_path=<run dir>/checkpoints/last.ckpt ema.sigma_rel=0.1 out=<file>

`ckpt_path` may also be the run directory. The run must have been trained with module.ema=power (its
<run dir>/ema_snapshots/ hold the snapshots); difflab-sample and difflab-eval read the result like any other
checkpoint. Also home to what difflab-eval's `ema.sigma_rel=[...]` sweep shares with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from difflab.cli.process_setup import hydra_entry_point
from difflab.lit.checkpoint_io import AtomicCheckpointIO, load_run
from difflab.lit.posthoc_ema import (Reconstruction, apply_to, export_contents, find_run, read_snapshots,
                                     reconstruct)

log = logging.getLogger("difflab")


def sigma_rel_values(value: Any) -> list[float]:
    """ema.sigma_rel as a list of floats: a number or a non-empty list of numbers."""
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ValueError(f"ema.sigma_rel={value!r} must be a number or a non-empty list of numbers, e.g. 0.1 or "
                         "[0.05,0.1,0.2]")
    return [float(v) for v in values]


def posthoc_reconstructions(ckpt_path: str, ema: DictConfig | None) -> tuple[str, list[Reconstruction | None]]:
    """(checkpoint to load, reconstructions): ckpt_path and [None] when ema.sigma_rel is null (the stored EMA);
    else the run's checkpoint (a run directory gives its newest) and one reconstruction per sigma_rel."""
    if ema is None or ema.get("sigma_rel") is None:
        return ckpt_path, [None]
    sigma_rels = sigma_rel_values(ema.sigma_rel)
    ckpt, snapshot_dir = find_run(ckpt_path, ema.get("snapshot_dir"))
    snapshots = read_snapshots(snapshot_dir)
    found = reconstruct(snapshots, sigma_rels, step=ema.get("step"), max_error=float(ema.get("max_error", 0.15)))
    for rec in found:
        log.info("post-hoc EMA sigma_rel=%g at step %d from %d snapshots of %s (weighting error %.4f)",
                 rec.sigma_rel, rec.step, rec.snapshots, snapshot_dir, rec.error)
    return str(ckpt), list(found)


def posthoc_rows(rows: list[dict[str, Any]], rec: Reconstruction | None) -> list[dict[str, Any]]:
    """Evaluation rows of a reconstruction: '-ema<sigma_rel>' appended to the sampler label, sigma_rel, its step
    and weighting error added (rows unchanged for the stored EMA)."""
    if rec is None:
        return rows
    return [{**r, "sampler": f"{r['sampler']}-ema{rec.sigma_rel:g}", "sigma_rel": rec.sigma_rel, "ema_step": rec.step,
             "ema_error": round(rec.error, 6)} for r in rows]


def default_out(ckpt: Path, rec: Reconstruction) -> Path:
    """<run dir>/posthoc_ema/ema-<sigma_rel>-step<step>.ckpt"""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "posthoc_ema" / f"ema-{rec.sigma_rel:g}-step{rec.step:07d}.ckpt"


def export(cfg: DictConfig) -> Path:
    """Reconstruct the EMA of ema.sigma_rel and write it as a normal difflab checkpoint; returns its path."""
    sigma_rels = sigma_rel_values(cfg.ema.sigma_rel)
    if len(sigma_rels) != 1:
        raise ValueError(f"ema.sigma_rel={sigma_rels} names {len(sigma_rels)} values; difflab-export writes one "
                         "checkpoint: give one value (difflab-eval compares several)")
    ckpt_path, (rec,) = posthoc_reconstructions(cfg.ckpt_path, cfg.ema)
    run = load_run(ckpt_path)
    out = Path(cfg.out).expanduser() if cfg.get("out") else default_out(Path(ckpt_path), rec)
    if out.resolve().parent == Path(ckpt_path).resolve().parent and Path(ckpt_path).parent.name == "checkpoints":
        raise ValueError(f"out={str(out)!r} lies in the run's checkpoints/ folder, where ckpt_path=last would take it "
                         "for a resume point; write it elsewhere (default: <run dir>/posthoc_ema/)")
    apply_to(run.module, rec, source=f"the EMA snapshots of {ckpt_path!r}")  # refuses another architecture
    contents = export_contents(run.checkpoint, run.config, rec)
    AtomicCheckpointIO().save_checkpoint(contents, out)
    print(f"post-hoc EMA sigma_rel={rec.sigma_rel:g} at step {rec.step} ({rec.snapshots} snapshots, weighting error "
          f"{rec.error:.4f}): {out}")
    return out


main = hydra_entry_point("export", export)


if __name__ == "__main__":
    main()
