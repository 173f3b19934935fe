"""`make bench-quality`: FID after the same wall-clock training budget, difflab vs denoising-diffusion-pytorch.

Both train at the same time on the same scikit-learn digits (train split, 8x8, batch 64), each
with one thread, so both see the same machine load for the same `--budget` seconds:
- difflab: `difflab-train` with its default digits configuration; only the stopping rule
  (trainer.max_time = budget, no step limit) and the periodic extras (validation, sample grids,
  in-training evaluation) differ;
- lucidrains: `GaussianDiffusion` with its defaults (v-prediction, sigmoid schedule) around its
  `Unet` of similar size (dim 32, mults 1-2-2: 1.41M vs 1.62M parameters) and the recipe of its
  `Trainer` (Adam 1e-4, betas 0.9/0.99, EMA 0.995 every 10 steps, gradient clip 1).
Then both draw `--samples` DDIM-50 samples from their EMA weights and are scored with the same
FID in the features of difflab's digits classifier (`difflab-train-classifier`).

    python benchmarks/quality_per_minute.py --budget 120 --samples 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

IMAGE_SIZE = 8


def cache_dir() -> Path:
    from difflab.cli.config import cache_dir as difflab_cache_dir  # what paths.cache_dir resolves to

    return Path(difflab_cache_dir())


def ensure_classifier() -> Path:
    """The digits classifier checkpoint, trained first if missing (as difflab-train does on first use)."""
    from difflab.metrics.build import classifier_path

    path = classifier_path(cache_dir(), "digits", IMAGE_SIZE)
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix="difflab-clf-") as run_dir:
            subprocess.run([sys.executable, "-m", "difflab.cli.train_classifier", f"out_path={path.resolve()}",
                            f"hydra.run.dir={run_dir}"], check=True)
    return path


def digits_train_uint8() -> torch.Tensor:
    """The digits train split (the one difflab-train uses) as uint8 (N, 1, 8, 8)."""
    from difflab.data import DigitsDataModule

    dm = DigitsDataModule(image_size=IMAGE_SIZE, channels=1, batch_size=64, num_workers=0, val_fraction=0.1,
                          seed=0, hflip=False)  # conf/data/digits.yaml's split
    return torch.cat(list(dm.uint8_batches("train")))


def ours_command(budget: float, run_dir: Path) -> list[str]:
    """difflab-train with the default config; stops on the budget instead of at 1,500 steps."""
    minutes, seconds = divmod(int(budget), 60)
    return [sys.executable, "-m", "difflab.cli.train", f"hydra.run.dir={run_dir}", "logger=csv",
            f"trainer.max_time=00:00:{minutes:02d}:{seconds:02d}", "trainer.max_steps=-1",
            "trainer.limit_val_batches=0", "callbacks.progress_bar=null",
            "callbacks.evaluation=null", "callbacks.sample_grid=null", "callbacks.model_checkpoint=null"]


def lucidrains_diffusion():
    """GaussianDiffusion with its defaults around the similar-size Unet; DDIM-50 for sampling."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from denoising_diffusion_pytorch import GaussianDiffusion

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_systems import lucidrains_unet

    return GaussianDiffusion(lucidrains_unet(), image_size=IMAGE_SIZE, timesteps=1000, sampling_timesteps=50)


def train_lucidrains(budget: float, out: Path, seed: int = 0) -> None:
    """lucidrains' Trainer recipe on the digits for `budget` seconds; saves the EMA weights and the step count."""
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    diffusion = lucidrains_diffusion()
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    images = digits_train_uint8().float() / 255  # it maps [0, 1] to [-1, 1] itself
    g = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        for idx in torch.randperm(len(images), generator=g).split(64):
            if len(idx) < 64 or time.perf_counter() - start >= budget:
                break
            loss = diffusion(images[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()
            steps += 1
    torch.save({"ema": ema.ema_model.state_dict(), "steps": steps}, out)


def fid_of(images_uint8: torch.Tensor, classifier: Path) -> float:
    """FID of uint8 samples against the digits train split, in the classifier's features."""
    from difflab.lit.checkpoint_io import load_classifier
    from difflab.metrics.build import build_metrics
    from difflab.metrics.reference import ReferenceStats

    metrics = build_metrics(extractor="classifier", dataset="digits", image_size=IMAGE_SIZE,
                            cache_dir=str(cache_dir()), metrics=["fid"], classifier_ckpt=str(classifier),
                            classifier_loader=load_classifier)
    real = digits_train_uint8()
    metrics.set_reference(ReferenceStats.from_batches(real.split(500), metrics.extractor, num_images=len(real)))
    for batch in images_uint8.split(500):
        metrics.update_fake(batch)
    return float(metrics.compute()["fid"])


def sample_ours(run_dir: Path, n: int) -> tuple[torch.Tensor, int]:
    from difflab.lit.checkpoint_io import load_run
    from difflab.data.transforms import to_uint8
    from difflab.samplers import DDIM

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run = load_run(ckpt)
    module = run.module
    x = torch.cat([module.sample(DDIM(steps=50), seeds=range(s, min(s + 250, n))) for s in range(0, n, 250)])
    return to_uint8(x), run.checkpoint.global_step


def sample_lucidrains(path: Path, n: int) -> tuple[torch.Tensor, int]:
    state = torch.load(path, weights_only=True)
    diffusion = lucidrains_diffusion()
    diffusion.load_state_dict(state["ema"])
    diffusion.eval()
    torch.manual_seed(0)
    with torch.inference_mode():
        x = torch.cat([diffusion.sample(batch_size=min(250, n - s)) for s in range(0, n, 250)])  # [0, 1]
    return (x * 255).round().clamp(0, 255).to(torch.uint8), int(state["steps"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET", 120)), help="seconds of training each")
    p.add_argument("--samples", type=int, default=int(os.environ.get("BENCH_SAMPLES", 1000)))
    p.add_argument("--peer-train", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the peer's process
    args = p.parse_args(argv)
    if args.peer_train:
        torch.set_num_threads(1)
        train_lucidrains(args.budget, args.peer_train)
        return {}
    if args.budget <= 0 or args.samples < 2:
        raise SystemExit(f"--budget={args.budget} must be > 0 and --samples={args.samples} >= 2")
    classifier = ensure_classifier()
    with tempfile.TemporaryDirectory(prefix="difflab-qpm-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        peer_out = tmp / "lucidrains.pt"
        start = time.perf_counter()
        procs = [subprocess.Popen(ours_command(args.budget, tmp / "ours"), env=env, stdout=subprocess.DEVNULL),
                 subprocess.Popen([sys.executable, __file__, "--budget", str(args.budget), "--peer-train", str(peer_out)],
                                  env=env)]
        if any([proc.wait() != 0 for proc in procs]):  # wait for both before leaving tmp
            raise SystemExit("a training run failed; see its output above")
        wall = time.perf_counter() - start
        ours, ours_steps = sample_ours(tmp / "ours", args.samples)
        peer, peer_steps = sample_lucidrains(peer_out, args.samples)
        result = {"budget_s": args.budget, "wall_s_both": round(wall, 1), "samples": args.samples, "sampler": "DDIM-50",
                  "difflab": {"steps": ours_steps, "fid": fid_of(ours, classifier)},
                  "lucidrains": {"steps": peer_steps, "fid": fid_of(peer, classifier)}}
    print(f"training budget {args.budget:.0f} s each (1 thread each, run side by side), "
          f"{args.samples} DDIM-50 samples, FID in difflab's digits-classifier features (lower is better)")
    for name in ("difflab", "lucidrains"):
        print(f"  {name:<11} steps {result[name]['steps']:>6}   FID {result[name]['fid']:.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
