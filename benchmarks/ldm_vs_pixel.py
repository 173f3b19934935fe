"""Pixel-space diffusion vs latent diffusion (autoencoder training included) at the same wall-clock budget.

Both pipelines run at the same time, each with `--threads` threads, so both see the same machine load:
- pixel: `difflab-train experiment=fashion_pixel` for the whole budget (trainer.max_time, no step limit);
- latent: `difflab-train experiment=fashion_autoencoder` for `--ae-share` of the budget, then
  `difflab-train experiment=fashion_ldm` on its last.ckpt for the rest.
Neither runs its periodic grids or in-training evaluation. Then both are scored by `difflab-eval` with the same
settings: `--samples` stochastic DDIM-50 (eta = 1) samples per guidance scale (deterministic DDIM lets
undertrained latent models diverge, docs/latent_diffusion.md), FID / IS / precision / recall in the Fashion-MNIST
classifier's features (`make data` trains it), samples per second of the sampling itself (decoding included).
The autoencoder's PSNR and rFID (its last validation) are reported too.

    python benchmarks/ldm_vs_pixel.py --budget 900 --samples 1000 --out outputs/ldm_vs_pixel
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUIET = ["logger=csv", "callbacks.sample_grid.every_n_steps=10000000", "callbacks.evaluation=null",
         "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]


def hms(seconds: float) -> str:
    """Lightning's max_time format DD:HH:MM:SS."""
    s = max(1, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def launch(args: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, what: str) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}); see its log")


def last_validation(run: Path) -> dict[str, float]:
    """The last val/psnr and val/rfid an autoencoder run logged (CSV logger)."""
    out: dict[str, float] = {}
    for path in sorted(run.glob("csv/**/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                for key in ("val/psnr", "val/ssim", "val/rfid"):
                    if row.get(key):
                        out[key] = float(row[key])
    return out


def train_both(out: Path, budget: float, ae_share: float, threads: int) -> dict[str, float]:
    """Start the pixel run and the autoencoder together; start the LDM when the autoencoder ends."""
    start = time.perf_counter()
    pixel = launch(["difflab.cli.train", "experiment=fashion_pixel", *QUIET, "trainer.max_steps=-1",
                    f"trainer.max_time={hms(budget)}", f"hydra.run.dir={out / 'pixel'}"], out / "pixel.log", threads)
    ae = launch(["difflab.cli.train", "experiment=fashion_autoencoder", "logger=csv", "trainer.max_steps=-1",
                 f"trainer.max_time={hms(budget * ae_share)}", f"hydra.run.dir={out / 'ae'}"], out / "ae.log", threads)
    wait(ae, "the autoencoder")
    ae_seconds = time.perf_counter() - start
    ldm = launch(["difflab.cli.train", "experiment=fashion_ldm", *QUIET, "trainer.max_steps=-1",
                  f"first_stage.ckpt_path={out / 'ae' / 'checkpoints' / 'last.ckpt'}",
                  f"trainer.max_time={hms(budget - ae_seconds)}", f"hydra.run.dir={out / 'ldm'}"], out / "ldm.log", threads)
    wait(ldm, "the latent diffusion model")
    wait(pixel, "the pixel-space model")
    return {"ae_seconds": ae_seconds, "total_seconds": time.perf_counter() - start}


def evaluate(out: Path, name: str, samples: int, threads: int) -> list[dict]:
    ckpt = out / name / "checkpoints" / "last.ckpt"
    proc = launch(["difflab.cli.evaluate", f"ckpt_path={ckpt}", f"num_samples={samples}", "samplers=[ddim-50-eta1]",
                   "guidance_scales=[1.0,2.0]", "metrics.names=[fid,is,precision_recall]", "bpd.num_images=0",
                   f"out_dir={out / name / 'bench_eval'}"], out / f"{name}_eval.log", threads)
    wait(proc, f"difflab-eval of {name}")
    return json.loads((out / name / "bench_eval" / "metrics.json").read_text())["results"]


def steps_of(run: Path) -> int:
    return int(json.loads((run / "status.json").read_text()).get("global_step", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=900.0, help="seconds of training per pipeline")
    parser.add_argument("--ae-share", type=float, default=1 / 3, help="the autoencoder's share of the latent budget")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="threads per pipeline (both train at once)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1,
                        help="threads of each evaluation (they run one after the other, after training)")
    parser.add_argument("--out", type=Path, default=Path("outputs/ldm_vs_pixel"))
    args = parser.parse_args()
    if args.threads < 1 or args.eval_threads < 1:
        raise SystemExit(f"--threads={args.threads} and --eval-threads={args.eval_threads} must be >= 1")
    if not 0 < args.ae_share < 1:
        raise SystemExit(f"--ae-share={args.ae_share} must lie strictly between 0 and 1")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out={args.out} is not empty; choose a new folder (nothing is overwritten)")
    args.out.mkdir(parents=True, exist_ok=True)
    timing = train_both(args.out, args.budget, args.ae_share, args.threads)
    result = {"budget_s": args.budget, "threads": args.threads, **timing,
              "autoencoder": {"steps": steps_of(args.out / "ae"), **last_validation(args.out / "ae")},
              "pixel": {"steps": steps_of(args.out / "pixel"), "eval": evaluate(args.out, "pixel", args.samples, args.eval_threads)},
              "ldm": {"steps": steps_of(args.out / "ldm"), "eval": evaluate(args.out, "ldm", args.samples, args.eval_threads)}}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print("| pipeline | steps | w | FID | IS | precision | recall | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("pixel", "ldm"):
        for r in result[name]["eval"]:
            rate = r.get("num_samples", args.samples) / r["seconds"] if r.get("seconds") else float("nan")
            print(f"| {name} | {result[name]['steps']} | {r.get('guidance_scale', 1.0)} | {r['fid']:.2f} | "
                  f"{r.get('is_mean', float('nan')):.2f} | {r.get('precision', float('nan')):.2f} | "
                  f"{r.get('recall', float('nan')):.2f} | {rate:.1f} |")
    print(json.dumps(result["autoencoder"]))


if __name__ == "__main__":
    main()
