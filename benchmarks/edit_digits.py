"""Inpainting quality on the digits: known-region error, FID and class agreement, per mask x method x steps.

    python benchmarks/edit_digits.py --ckpt outputs/<run>/checkpoints/last.ckpt [--n 200] [--rows ddpm] [--out DIR]

For each row the first n digits (scikit-learn's order) are inpainted through difflab-edit's own pieces
(cli/edit_inputs.build_plan, module.sample), image i with seed i. Scores, with the project's digits
classifier (difflab-train-classifier data=digits, the FID feature net of difflab-eval):
- known_err: max |result - source| over the known pixels, uint8 levels (0 = the known region is kept exactly);
- fid: FID of the n completed images against the digits train split, the classifier's features (n is small, so
  compare rows with the `sources` row: the real digits themselves, the floor at this n);
- agree: share of completed images the classifier assigns the source's class;
- seconds: wall time of the sampling on this machine (report its CPU with the table).
Writes edit_digits.json and prints a markdown table (docs/editing.md holds the measured one).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from difflab.cli.config import cache_dir
from difflab.cli.edit_inputs import build_plan, load_sources
from difflab.cli.sampler_specs import build_sampler
from difflab.data.digits import DigitsDataModule
from difflab.data.transforms import to_uint8
from difflab.lit.checkpoint_io import load_classifier, load_run
from difflab.metrics.build import classifier_path, train_classifier_command
from difflab.metrics.extractors.classifier import ClassifierExtractor
from difflab.metrics.generative import GenerativeMetrics
from difflab.metrics.reference import shared_reference
from difflab.samplers.inpaint import repaint_nfe

MASKS = ("right_half", "center_box", "random_box", "strokes")
# (label, sampler spec, method, jump_length, resamplings)
ROWS = {
    "ddpm": [("replace ddpm-50", "ddpm-50", "repaint", 1, 1), ("repaint ddpm-50 j5 r5", "ddpm-50", "repaint", 5, 5),
             ("replace ddpm-250", "ddpm-250", "repaint", 1, 1), ("repaint ddpm-25 j5 r5", "ddpm-25", "repaint", 5, 5)],
    "score": [("pc inpainter pc-200", "pc-200", "pc", 1, 1), ("pc inpainter pc-290", "pc-290", "pc", 1, 1),
              ("repaint pc-100 j5 r3", "pc-100", "repaint", 5, 3)],
    # RePaint's j and r around the defaults (the paper: T = 250, j = r = 10), at and beyond the default's cost
    "search": [("repaint ddpm-50 j2 r5", "ddpm-50", "repaint", 2, 5), ("repaint ddpm-50 j5 r3", "ddpm-50", "repaint", 5, 3),
               ("repaint ddpm-50 j10 r5", "ddpm-50", "repaint", 10, 5),
               ("repaint ddpm-50 j5 r10", "ddpm-50", "repaint", 5, 10),
               ("repaint ddpm-50 j10 r10", "ddpm-50", "repaint", 10, 10),
               ("repaint ddpm-100 j10 r5", "ddpm-100", "repaint", 10, 5)],
}


def scorer(n_ref: int | None = None) -> tuple[GenerativeMetrics, ClassifierExtractor]:
    """FID against the digits train split with the project's 8x8 digits classifier, and that classifier."""
    path = classifier_path(cache_dir(), "digits", 8)
    if not path.is_file():
        raise SystemExit(f"no digits classifier at {path}: {train_classifier_command('digits', 8, path)}")
    extractor = ClassifierExtractor(net=load_classifier(path), name=f"classifier_{path.stem}")
    metrics = GenerativeMetrics(extractor=extractor, metrics=["fid"])
    data = DigitsDataModule(image_size=8, channels=1, batch_size=64, num_workers=0, val_fraction=0.1, seed=0,
                            hflip=False)
    metrics.set_reference(shared_reference(data, extractor, dataset="digits", split="train",
                                           cache_dir=Path(cache_dir()) / "reference", num_images=n_ref))
    return metrics, extractor


def score(images: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
          metrics: GenerativeMetrics, extractor: ClassifierExtractor) -> dict[str, float]:
    """known_err, fid and agree of uint8 images (N, C, H, W) against their sources and labels."""
    metrics.reset()
    metrics.update_fake(images)
    _, logits = extractor.features_and_logits(images)
    err = (images.int() - sources.int()).abs()[masks]
    return {"known_err": int(err.max()) if err.numel() else 0, "fid": round(metrics.compute()["fid"], 2),
            "agree": round(float((logits.argmax(1) == labels).float().mean()), 3)}


def sdedit_rows(run, src, metrics: GenerativeMetrics, extractor: ClassifierExtractor) -> list[dict]:
    """SDEdit of the real digits with ddim-50 at strengths 0 .. 1: how much of the source (its class) survives."""
    rows = []
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        plan = build_plan("sdedit", "sdedit", src.images, channels=1, size=8, mask="", mask_seed=0,
                          strength=strength, factor=2, jr=(1, 1))
        t0 = time.perf_counter()
        x = run.module.sample(build_sampler("ddim-50"), range(len(src.images)), edit=plan.edit)
        rows.append({"mask": f"strength {strength:g}", "method": "sdedit ddim-50",
                     "nfe": math.ceil(50 * strength), "seconds": round(time.perf_counter() - t0, 1),
                     **score(to_uint8(x), src.images, plan.masks, src.labels, metrics, extractor)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--rows", choices=sorted(ROWS) + ["sdedit"], default="ddpm")
    p.add_argument("--masks", nargs="+", default=list(MASKS))
    p.add_argument("--out", default="outputs/edit_digits")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = load_run(args.ckpt)
    metrics, extractor = scorer()
    src = load_sources(f"digits:0-{args.n - 1}", channels=1, size=8)
    results = [{"mask": "-", "method": "sources (real digits)", "nfe": 0, "seconds": 0.0,
                **score(src.images, src.images, torch.ones_like(src.images, dtype=torch.bool), src.labels, metrics,
                        extractor)}]
    if args.rows == "sdedit":
        results += sdedit_rows(run, src, metrics, extractor)
    for mask in args.masks if args.rows != "sdedit" else []:
        for label, spec, method, j, r in ROWS[args.rows]:
            sampler = build_sampler(spec)
            plan = build_plan("inpaint", method, src.images, channels=1, size=8, mask=mask, mask_seed=0, strength=0.0,
                              factor=2, jr=(j, r))
            t0 = time.perf_counter()
            x = run.module.sample(sampler, range(args.n), edit=plan.edit)
            seconds = round(time.perf_counter() - t0, 1)
            per_step = sampler.nfe(run.module.schedule.T) // sampler.steps  # pc: predictor + corrector
            row = {"mask": mask, "method": label, "nfe": repaint_nfe(sampler.steps, j, r) * per_step,
                   "seconds": seconds,
                   **score(to_uint8(x), src.images, plan.masks, src.labels, metrics, extractor)}
            print(json.dumps(row), flush=True)
            results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"edit_digits_{args.rows}.json").write_text(json.dumps({"ckpt": args.ckpt, "n": args.n, "rows": results},
                                                                  indent=2))
    print("| mask | method | NFE | seconds | known err | FID | agree |\n|---|---|---|---|---|---|---|")
    for r in results:
        cells = [r[k] for k in ("mask", "method", "nfe", "seconds", "known_err", "fid", "agree")]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
