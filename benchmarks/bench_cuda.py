"""A minimal CUDA bench (`make gpu-check`'s bench stage): difflab's ddpm_cifar10 vs diffusers' UNet2DModel.

The same network on both sides (35,746,307 parameters, peer_systems.diffusers_unet), the same batch
(128), each driven as its users drive it, one system after the other in this process (peak memory is
reset between them):
- difflab: `DiffusionModule` built from `experiment=ddpm_cifar10` (its fused Adam, channels_last net),
  `module.loss` + backward + optimizer step + `module.ema.update_parameters` (what optimizer_step
  adds); DDIM-50 through `module.sample(DDIM(steps=50), seeds, precision=...)` (the EMA net).
- diffusers: its train_unconditional example's step (DDPMScheduler.add_noise, MSE on the noise,
  AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, EMAModel with its warm-up), DDIM-50 through
  DDIMPipeline.
Precisions: bf16 (torch.autocast("cuda", bfloat16), what trainer.precision=bf16-mixed does) and tf32
(float32 weights, TF32 matmuls and convolutions). cudnn.benchmark stays at torch's default (off) for
both, as neither tool's default turns it on. lucidrains' denoising-diffusion-pytorch is measured only
when installed (it is not carried to the GPU machine). MFU = images/s x 3 x forward FLOPs per image
(FlopCounterMode) / 989e12 (H100/H200 SXM dense bf16 datasheet peak).

    python benchmarks/bench_cuda.py --json out.json              # on a CUDA machine
    python benchmarks/bench_cuda.py --device cpu --ch 8 --batch 2 --train-steps 1 --ddim-steps 2   # plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_throughput import H200_BF16_DENSE_PEAK, forward_flops_per_image  # noqa: E402
from peer_systems import DDPM_CIFAR10_PARAMS, compose_train, diffusers_unet  # noqa: E402


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Difflab:
    name = "difflab"

    def __init__(self, device: torch.device, ch: int, batch: int, ddim_steps: int) -> None:
        from difflab.lit.from_config import build_module

        cfg = compose_train(["experiment=ddpm_cifar10", f"model.ch={ch}"])
        self.module = build_module(cfg).to(device)
        self.optimizer = self.module.configure_optimizers()["optimizer"]  # after .to(): fused needs CUDA params
        self.net = self.module.net
        self.device, self.batch, self.ddim_steps = device, batch, ddim_steps
        self.x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def flops_per_image(self) -> float:
        return forward_flops_per_image(self.net)

    def train_step(self, precision: str) -> None:
        self.module.train()
        with autocast(self.device, precision):
            loss = self.module.loss(self.x0).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.ema.update_parameters(self.net)

    def ddim(self, precision: str):
        from difflab.samplers import DDIM

        return self.module.sample(DDIM(steps=self.ddim_steps), seeds=range(self.batch),
                                  precision="bf16-mixed" if precision == "bf16" else None)


class Diffusers:
    name = "diffusers"

    def __init__(self, device: torch.device, ch: int, batch: int, ddim_steps: int) -> None:
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

        self.net = diffusers_unet(ch).to(device)
        try:
            from diffusers.training_utils import EMAModel

            # train_unconditional.py --use_ema defaults (ema_max_decay 0.9999, inv_gamma 1, power 3/4)
            self.ema = EMAModel(self.net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
            self.ema_kind = "diffusers.training_utils.EMAModel"
        except Exception as err:  # training_utils imports transformers/accelerate when present: keep the bench going
            self.ema, self.ema_kind = None, f"torch._foreach_lerp_ (EMAModel unavailable: {type(err).__name__}: {err})"
            self._shadow = [p.detach().clone() for p in self.net.parameters()]
        kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        self.scheduler = DDPMScheduler(**kw)
        # train_unconditional.py's defaults: lr 1e-4, Adam betas (0.95, 0.999), weight decay 1e-6, eps 1e-8
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                                           eps=1e-8)
        self.pipe = DDIMPipeline(unet=self.net, scheduler=DDIMScheduler(**kw)).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.batch, self.ddim_steps = device, batch, ddim_steps
        self.x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def flops_per_image(self) -> float:
        """As difflab's: one image through a CPU copy."""
        from torch.utils.flop_counter import FlopCounterMode

        net = copy.deepcopy(self.net).cpu().eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
        return float(counter.get_total_flops())

    def train_step(self, precision: str) -> None:
        self.net.train()
        noise = torch.randn_like(self.x0)
        t = torch.randint(0, 1000, (self.x0.shape[0],), device=self.device)
        with autocast(self.device, precision):
            pred = self.net(self.scheduler.add_noise(self.x0, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.net.parameters())
        else:
            with torch.no_grad():
                torch._foreach_lerp_(self._shadow, [p.detach() for p in self.net.parameters()], 1e-4)

    def ddim(self, precision: str):
        self.net.eval()  # DDIMPipeline leaves the mode alone
        with autocast(self.device, precision):
            return self.pipe(batch_size=self.batch, num_inference_steps=self.ddim_steps,
                             generator=torch.Generator(device=self.device).manual_seed(0), output_type="np")


SYSTEMS = {"difflab": Difflab, "diffusers": Diffusers}


def set_precision(precision: str) -> None:
    """tf32: TF32 matmuls and convolutions; fp32: neither; bf16: torch's defaults (TF32 convolutions only)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")


def timed(fn, device: torch.device, n: int) -> float:
    """Seconds per call of fn over n calls, synchronised at both ends."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def measure(kind: str, args: argparse.Namespace, precision: str, deadline: float) -> dict:
    device = torch.device(args.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    set_precision(precision)
    torch.manual_seed(0)
    system = SYSTEMS[kind](device, args.ch, args.batch, args.ddim_steps)
    out = {"params": sum(p.numel() for p in system.net.parameters()),
           "ema": getattr(system, "ema_kind", "AveragedModel + EMADecay (difflab)")}
    out["forward_flops_per_image"] = system.flops_per_image()
    for _ in range(args.warmup):
        system.train_step(precision)
    train = [timed(lambda: system.train_step(precision), device, args.train_steps) for _ in range(args.repeats)
             if time.perf_counter() < deadline]
    if train:
        out["train_s_per_step"] = statistics.median(train)
        out["train_images_per_s"] = args.batch / out["train_s_per_step"]
        out["train_mfu"] = out["train_images_per_s"] * 3 * out["forward_flops_per_image"] / args.peak_flops
    if device.type == "cuda":
        out["train_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if time.perf_counter() < deadline:
        with torch.no_grad():
            system.ddim(precision)  # warm-up: cuDNN plans and allocations of the sampling shapes
            ddim = [timed(lambda: system.ddim(precision), device, 1) for _ in range(args.ddim_repeats)
                    if time.perf_counter() < deadline]
        if ddim:
            out["ddim_s_per_batch"] = statistics.median(ddim)
            out["ddim_images_per_s"] = args.batch / out["ddim_s_per_batch"]
        if device.type == "cuda":
            out["ddim_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del system
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ch", type=int, default=128, help="base width (128 = ddpm_cifar10)")
    p.add_argument("--precisions", default="bf16,tf32", help="comma list of bf16, tf32, fp32")
    p.add_argument("--systems", default="difflab,diffusers")
    p.add_argument("--warmup", type=int, default=5, help="training steps before timing")
    p.add_argument("--train-steps", type=int, default=20, help="steps per timed repetition")
    p.add_argument("--repeats", type=int, default=3, help="timed training repetitions (median)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddim-repeats", type=int, default=2, help="timed DDIM samples after one warm-up (median)")
    p.add_argument("--budget", type=float, default=110.0, help="seconds; later measurements are skipped past it")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_DENSE_PEAK)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.precisions = [s for s in args.precisions.split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in args.precisions if s not in ("bf16", "tf32", "fp32")] + [s for s in args.systems if s not in SYSTEMS]
    if bad or min(args.batch, args.ch, args.train_steps, args.repeats, args.ddim_steps, args.ddim_repeats) < 1:
        p.error(f"bad value(s) {bad or ''}: precisions are bf16, tf32, fp32; systems {sorted(SYSTEMS)}; sizes >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    deadline = start + args.budget
    device = torch.device(args.device)
    result: dict = {"facts": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch": args.batch, "ch": args.ch, "ddim_steps": args.ddim_steps,
        "peak_flops": args.peak_flops, "peak_name": "H100/H200 SXM dense bf16 (datasheet)",
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "lucidrains": "skipped: denoising-diffusion-pytorch is not installed"
        if importlib.util.find_spec("denoising_diffusion_pytorch") is None else "not measured on CUDA here",
    }, "systems": {}, "rows": [], "errors": {}}
    for prec in args.precisions:
        for kind in args.systems:
            key = f"{kind}/{prec}"
            if time.perf_counter() > deadline:
                result["errors"][key] = "skipped: over the budget"
                continue
            try:
                result["systems"][key] = measure(kind, args, prec, deadline)
                print(f"  {key}: {json.dumps(result['systems'][key])}", file=sys.stderr, flush=True)
            except Exception:
                result["errors"][key] = traceback.format_exc()[-3000:]
                print(f"  {key} failed:\n{result['errors'][key]}", file=sys.stderr, flush=True)
    systems = result["systems"]
    for prec in args.precisions:
        ours, peer = systems.get(f"difflab/{prec}", {}), systems.get(f"diffusers/{prec}", {})
        for what, key in (("train img/s", "train_images_per_s"), ("DDIM-%d sample img/s" % args.ddim_steps,
                                                                   "ddim_images_per_s"),
                          ("train MFU", "train_mfu"), ("train peak GiB", "train_peak_memory_gib")):
            a, b = ours.get(key), peer.get(key)
            if a is None and b is None:
                continue
            ratio = None
            if a and b:
                ratio = b / a if key.endswith("gib") else a / b  # > 1: difflab faster / smaller
            result["rows"].append({"what": what, "precision": prec, "batch": args.batch, "difflab": a,
                                   "diffusers": b, "ratio": ratio})
    params = {k: v.get("params") for k, v in systems.items()}
    result["facts"]["params"] = params
    if args.ch == 128 and any(p != DDPM_CIFAR10_PARAMS for p in params.values()):
        result["errors"]["params"] = f"parameter counts differ from {DDPM_CIFAR10_PARAMS}: {params}"
    result["facts"]["seconds"] = round(time.perf_counter() - start, 1)
    return result


def format_table(result: dict) -> str:
    lines = ["| measure | precision | batch | difflab | diffusers | ratio (>1: difflab better) |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    for r in result["rows"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['what']} | {r['precision']} | {r['batch']} | {fmt(r['difflab'])} | {fmt(r['diffusers'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if result["errors"]:
        print("errors: " + ", ".join(result["errors"]), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(k != "params" and not v.startswith("skipped") for k, v in result["errors"].items()) \
        or not result["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
