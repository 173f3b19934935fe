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
--means (difflab alone, `run_means`): each performance mean of issue 18 on / off against the current setup,
one row each (MEANS: compile of the training net, compile of the sampling net, channels_last, cudnn.benchmark,
foreach vs fused Adam, float32 matmul precision; plus cross-checks), img/s relative to the row's base row,
compile seconds apart, within --budget (300 s), the JSON rewritten after each row.

Precisions: bf16 (torch.autocast("cuda", bfloat16), what trainer.precision=bf16-mixed does) and tf32
(float32 weights, TF32 matmuls and convolutions). cudnn.benchmark stays at torch's default (off) for
both, as neither tool's default turns it on. lucidrains' denoising-diffusion-pytorch is measured only
when installed (it is not carried to the GPU machine). MFU = images/s x 3 x forward FLOPs per image
(FlopCounterMode) / 989e12 (H100/H200 SXM dense bf16 datasheet peak).

    python benchmarks/bench_cuda.py --json out.json              # on a CUDA machine
    python benchmarks/bench_cuda.py --device cpu --ch 8 --batch 2 --train-steps 1 --ddim-steps 2   # plumbing
    python benchmarks/bench_cuda.py --means --json means.json     # each mean on / off, on a CUDA machine
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
from dataclasses import dataclass
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

    def __init__(self, device: torch.device, ch: int, batch: int, ddim_steps: int,
                 overrides: tuple[str, ...] = ()) -> None:
        from difflab.lit.from_config import build_module

        cfg = compose_train(["experiment=ddpm_cifar10", f"model.ch={ch}", *overrides])
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


# ------------------------------------------------------------------ --means: each performance mean on / off


@dataclass(frozen=True)
class Mean:
    """One row of --means: difflab's ddpm_cifar10 with one mean switched against the current setup (row `base`)."""

    name: str
    mean: str  # what this row switches, in words
    precision: str = "bf16"  # bf16: autocast bfloat16; fp32: float32 weights, no autocast (see `matmul`)
    base: str | None = "base"  # the row it is compared with (None: a reference row itself)
    train: bool = True
    ddim: bool = True
    overrides: tuple[str, ...] = ()  # Hydra overrides on top of experiment=ddpm_cifar10
    cudnn_benchmark: bool = False
    matmul: str | None = None  # torch.set_float32_matmul_precision for fp32 rows
    compile_train: bool = False  # net.compile(dynamic=False): the training net in place (what module.compile does)
    compile_sampling: str | None = None  # "ema": the EMA net compiled; "sampling_net": sampling_net(EMA) compiled
    extra: bool = False  # not one of issue 18's six means: an added cross-check

    @property
    def compiles(self) -> bool:
        return self.compile_train or self.compile_sampling is not None


MEANS = (  # issue 18's six means first (cheap rows, then the two compile rows), cross-checks (extra) last
    Mean("base", "current setup: channels_last, fused Adam, eager, cudnn.benchmark off", base=None),
    Mean("channels_last_off", "channels_last off (NCHW net): model.channels_last=false",
         overrides=("model.channels_last=false",)),
    Mean("cudnn_benchmark", "torch.backends.cudnn.benchmark=True", cudnn_benchmark=True),
    Mean("foreach_adam", "optimizer foreach instead of fused: optimizer.fused=false +optimizer.foreach=true",
         overrides=("optimizer.fused=false", "+optimizer.foreach=true"), ddim=False),
    Mean("compile_train", "torch.compile of the training net: net.compile(dynamic=False), default mode",
         compile_train=True, ddim=False),
    Mean("compile_sampling", "torch.compile of the EMA net that module.sample/generate runs (sampling_net "
         "returns a compiled net as is: no weights cast once)", compile_sampling="ema", train=False),
    Mean("fp32_highest", "float32, torch defaults: matmuls full fp32, cuDNN convs TF32 (what trainer.precision=32 "
         "runs: difflab sets neither flag)", precision="fp32", base=None, matmul="highest"),
    Mean("fp32_high", "float32 + torch.set_float32_matmul_precision('high'): TF32 matmuls too (= bench tf32)",
         precision="fp32", base="fp32_highest", matmul="high"),
    Mean("base_again", "current setup again: the run-to-run spread of the eager rows", extra=True),
    Mean("tf32_channels_last_off", "fp32_high with channels_last off (the tf32 gap to diffusers)", precision="fp32",
         base="fp32_high", matmul="high", overrides=("model.channels_last=false",), extra=True),
    Mean("compile_sampling_net", "torch.compile of sampling_net(EMA, bf16) (weights cast once, then compiled; "
         "generate runs it as is)", compile_sampling="sampling_net", train=False, extra=True),
    Mean("all_on", "compile_train + compile_sampling + cudnn_benchmark together", compile_train=True,
         compile_sampling="ema", cudnn_benchmark=True, extra=True),
)
MEAN_NAMES = tuple(m.name for m in MEANS)
COMPILE_MIN_LEFT = 60.0  # seconds of the budget a compile row needs left to start


def float32_flags() -> dict:
    flags = {"matmul_precision": torch.get_float32_matmul_precision(),
             "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
             "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    return flags


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def measure_mean(row: Mean, args: argparse.Namespace, deadline: float, facts: dict, out: dict,
                 save=lambda: None) -> dict:
    """Training and/or DDIM img/s of difflab with `row`'s mean into `out`; first-call (compile) seconds apart from
    timing. save() after each phase, so a process killed in a long compile still leaves what it measured."""
    device = torch.device(args.device)
    gc.collect()
    if row.compiles:
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh process's compile state: no earlier row's graphs or guards
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    set_precision("bf16" if row.precision == "bf16" else "tf32")  # cuDNN TF32 on for both (torch's default)
    if row.matmul:
        torch.set_float32_matmul_precision(row.matmul)
    torch.backends.cudnn.benchmark = row.cudnn_benchmark
    prec = "bf16" if row.precision == "bf16" else "fp32"
    torch.manual_seed(0)
    system = Difflab(device, args.ch, args.batch, args.ddim_steps, overrides=row.overrides)
    if "forward_flops_per_image" not in facts:
        facts["forward_flops_per_image"] = system.flops_per_image()
    out.update(flags=float32_flags(), channels_last=bool(system.net.channels_last),
               optimizer={k: system.optimizer.defaults.get(k) for k in ("fused", "foreach")})
    graphs0, breaks0 = dynamo_counts()
    compile_kw = dict(dynamic=False, backend=args.compile_backend)
    if row.compile_train:
        system.net.compile(**compile_kw)

    def repeats(fn, n: int, count: int) -> list[float]:  # at least one timed repetition, more while in budget
        times = [timed(fn, device, n)]
        while len(times) < count and time.perf_counter() < deadline:
            times.append(timed(fn, device, n))
        return times

    if row.train:
        step = lambda: system.train_step(prec)  # noqa: E731
        out["train_first_step_s"] = timed(step, device, 1)  # compiles forward and backward on a compiled row
        save()
        for _ in range(max(args.warmup - 1, 1 if row.compile_train else 0)):
            step()
        out["train_s_per_step"] = statistics.median(repeats(step, args.train_steps, args.repeats))
        out["train_images_per_s"] = args.batch / out["train_s_per_step"]
        out["train_mfu"] = out["train_images_per_s"] * 3 * facts["forward_flops_per_image"] / args.peak_flops
        if row.compile_train:
            out["train_compile_s"] = max(0.0, out["train_first_step_s"] - out["train_s_per_step"])
        if device.type == "cuda":
            out["train_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        save()
    if row.ddim and time.perf_counter() < deadline:
        ddim = lambda: system.ddim(prec)  # noqa: E731  module.sample -> generate -> sampling_net(EMA)
        if row.compile_sampling == "ema":
            system.module.ema.module.compile(**compile_kw)
        elif row.compile_sampling == "sampling_net":
            from difflab.nets.inference import sampling_net
            from difflab.samplers import DDIM
            from difflab.samplers.generate import generate

            module = system.module
            fast = sampling_net(module.ema.module.eval(), torch.bfloat16 if prec == "bf16" else None)
            fast.compile(**compile_kw)
            ddim = lambda: generate(fast, module.schedule, DDIM(steps=args.ddim_steps), range(args.batch),  # noqa: E731
                                    parameterization=module.parameterization, model_variance=module.model_variance,
                                    precision="bf16-mixed" if prec == "bf16" else None)
        with torch.no_grad():
            out["ddim_first_s"] = timed(ddim, device, 1)  # warm-up: cuDNN plans, allocations, the compile
            save()
            out["ddim_s_per_batch"] = statistics.median(repeats(ddim, 1, args.ddim_repeats))
        out["ddim_images_per_s"] = args.batch / out["ddim_s_per_batch"]
        if row.compile_sampling:
            out["ddim_compile_s"] = max(0.0, out["ddim_first_s"] - out["ddim_s_per_batch"])
        if device.type == "cuda":
            out["ddim_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif row.ddim:
        out["ddim_skipped"] = "over the budget"
    if row.compiles:
        graphs, breaks = dynamo_counts()
        out["dynamo_graphs"], out["graph_breaks"] = graphs - graphs0, breaks - breaks0
    del system
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def means_table(result: dict) -> str:
    """The --means rows as Markdown: img/s of each row and its ratio to the row it is compared with."""
    fmt = lambda v, spec=".4g": "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| row | precision | train img/s | vs base | DDIM img/s | vs base | compile s (train / DDIM) | "
             "train peak GiB | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r.get("measured") or {}
        lines.append(
            f"| {r['name']}{' (extra)' if r['extra'] else ''} | {r['precision']} | {fmt(m.get('train_images_per_s'))} | "
            f"{fmt(r.get('train_vs_base'), '.3f')}{'x' if r.get('train_vs_base') else ''} | "
            f"{fmt(m.get('ddim_images_per_s'))} | {fmt(r.get('ddim_vs_base'), '.3f')}{'x' if r.get('ddim_vs_base') else ''} | "
            f"{fmt(m.get('train_compile_s'), '.0f')} / {fmt(m.get('ddim_compile_s'), '.0f')} | "
            f"{fmt(m.get('train_peak_memory_gib'), '.2f')} | {r['status'].splitlines()[0][:60]} |")
    return "\n".join(lines)


def write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)


def run_means(args: argparse.Namespace) -> dict:
    """Every selected row of MEANS in this process, in order, within args.budget; the JSON rewritten after each."""
    start = time.perf_counter()
    deadline = start + args.budget
    device = torch.device(args.device)
    selected = [m for m in MEANS if m.name in args.means_rows]
    result: dict = {"facts": {
        "mode": "means", "system": "difflab (experiment=ddpm_cifar10)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "batch": args.batch, "ch": args.ch,
        "ddim_steps": args.ddim_steps, "warmup": args.warmup, "train_steps": args.train_steps,
        "repeats": args.repeats, "ddim_repeats": args.ddim_repeats, "budget_s": args.budget,
        "compile_backend": args.compile_backend, "compile_mode": "default", "compile_dynamic": False,
        "compile_min_left_s": COMPILE_MIN_LEFT, "peak_flops": args.peak_flops,
        "defaults": float32_flags(),
        "timing": "median seconds of `repeats` x `train_steps` steps (DDIM: `ddim_repeats` batches) after warm-up; "
                  "the first step / DDIM batch (with any compile) is timed apart: *_first_s, *_compile_s = first - "
                  "median; vs base = img/s over the `base` row's img/s (> 1: the mean helps)",
    }, "rows": [dict(name=m.name, mean=m.mean, precision=m.precision, base=m.base, extra=m.extra, status="pending")
                for m in selected], "errors": {}}
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    by_name: dict[str, dict] = {}
    try:
        for row, rec in zip(selected, result["rows"]):
            left = deadline - time.perf_counter()
            if left <= 0:
                rec["status"] = "skipped: over the budget"
            elif row.compiles and left < min(COMPILE_MIN_LEFT, args.budget / 2):
                rec["status"] = f"skipped: {left:.0f} s of the budget left, a compile row needs {COMPILE_MIN_LEFT:.0f} s"
            else:
                rec["status"] = "running"
                write_json(args.json, result)
                t0 = time.perf_counter()
                try:
                    rec["measured"] = {}
                    by_name[row.name] = measure_mean(row, args, deadline, result["facts"], rec["measured"],
                                                     lambda: write_json(args.json, result))
                    rec["status"] = "measured"
                except Exception:
                    rec["status"] = "failed: " + traceback.format_exc().strip().splitlines()[-1][:300]
                    result["errors"][row.name] = traceback.format_exc()[-3000:]
                    print(f"  means/{row.name} failed:\n{result['errors'][row.name]}", file=sys.stderr, flush=True)
                finally:
                    torch.set_float32_matmul_precision(saved[0])
                    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
                    gc.collect()
                rec["seconds"] = round(time.perf_counter() - t0, 1)
                base = by_name.get(row.base or "", {})
                m = rec.get("measured") or {}
                rec["train_vs_base"] = ratio(m.get("train_images_per_s"), base.get("train_images_per_s"))
                rec["ddim_vs_base"] = ratio(m.get("ddim_images_per_s"), base.get("ddim_images_per_s"))
                print(f"  means/{row.name} ({rec['seconds']} s): {json.dumps(m)}", file=sys.stderr, flush=True)
            result["facts"]["seconds"] = round(time.perf_counter() - start, 1)
            result["table"] = means_table(result)
            write_json(args.json, result)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
    return result


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
    p.add_argument("--budget", type=float, default=None,
                   help="seconds (default 110, with --means 300); later measurements are skipped past it")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_DENSE_PEAK)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--means", action="store_true",
                   help="difflab only: each performance mean on / off against the current setup (rows of MEANS)")
    p.add_argument("--means-rows", default=",".join(MEAN_NAMES), help="comma list of --means rows (default: all)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --means' compile rows")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 300.0 if args.means else 110.0
    args.means_rows = [s for s in args.means_rows.split(",") if s]
    unknown = [s for s in args.means_rows if s not in MEAN_NAMES]
    if unknown or not args.means_rows:
        p.error(f"--means-rows: unknown {unknown or 'empty list'}; rows: {', '.join(MEAN_NAMES)}")
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
    if args.means:
        result = run_means(args)
        print(result["table"])
        print(f"means: {result['facts']['seconds']} s; JSON: {args.json}", file=sys.stderr)
        return 1 if result["errors"] or not any(r["status"] == "measured" for r in result["rows"]) else 0
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
