"""`make bench`: difflab against diffusers and denoising-diffusion-pytorch on the same networks.

Every system lives in its own worker process (so peak memory is its own), and the parent
interleaves them: repetition r runs difflab then the peer (the order alternates between
repetitions), so both see the same machine load; each ratio is taken within one repetition and
the table reports the median over repetitions. Sizes come from the options below or BENCH_* env
variables (BENCH_REPEATS=9 make bench). Results: a Markdown table on stdout, JSON with --json.

    python benchmarks/bench.py                       # the defaults (see the README for their cost)
    python benchmarks/bench.py --no-bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_systems import DDPM_CIFAR10_PARAMS  # noqa: E402


def _env(name: str, default):
    value = os.environ.get(f"BENCH_{name.upper()}")
    return default if value is None else type(default)(value)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM) in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _prepare(kind: str) -> None:
    """Import what a system needs before the memory baseline is taken."""
    if kind.startswith("difflab"):
        import difflab.cli.trainer_setup  # noqa: F401
        import hydra  # noqa: F401
    elif kind == "diffusers":
        import diffusers  # noqa: F401
    else:
        import denoising_diffusion_pytorch  # noqa: F401


def worker(conn, kind: str, precision: str, threads: int, ch: int, batch: int, ddim_steps: int, setup: bool) -> None:
    """Build one system, then time whatever the parent asks for until told to stop."""
    import torch

    from peer_systems import build

    try:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        _prepare(kind)
        if setup:  # what every difflab entry point does first (denormal flushing, malloc reuse)
            from difflab.cli.process_setup import setup_process

            setup_process()
        base = rss_mb()
        system = build(kind, ch=ch, batch=batch, ddim_steps=ddim_steps)
        conn.send(("ok", sum(p.numel() for p in system.net.parameters())))
        while True:
            cmd, n, size = conn.recv()
            if cmd == "stop":
                return
            if cmd == "peak_mb":
                conn.send(("ok", rss_mb("VmHWM") - base))
            elif cmd == "flops":
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    system.train_step("fp32")
                conn.send(("ok", counter.get_total_flops() / batch))
            else:
                run = {"train": lambda: system.train_step(precision),
                       "train_ema": lambda: (system.train_step(precision), system.ema_update()),
                       "forward": lambda: system.forward(size, precision),
                       "sampler_forward": lambda: system.sampler_forward(size, precision),
                       "ddim": lambda: system.ddim(size, precision)}[cmd]
                start = time.perf_counter()
                for _ in range(n):
                    run()
                conn.send(("ok", (time.perf_counter() - start) / n))
    except Exception:  # report to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, ctx, kind: str, precision: str, args: argparse.Namespace, batch: int) -> None:
        self.kind, self.precision = kind, precision
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, daemon=True,
                                args=(child, kind, precision, args.threads, args.ch, batch, args.ddim_steps,
                                      kind.startswith("difflab") or args.peer_setup))
        self.proc.start()
        self.params = None

    def ask(self, cmd: str, n: int = 1, size: int = 0) -> float:
        if cmd != "ready":
            self.conn.send((cmd, n, size))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker {self.kind}/{self.precision} failed on {cmd!r}:\n{value}")
        return value

    def ready(self) -> "Worker":
        self.params = self.ask("ready")
        return self

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop", 0, 0))
            self.proc.join(timeout=30)


def compare(ours: Worker, peer: Worker, cmd: str, *, repeats: int, n: int, size: int, warmup: int) -> dict:
    """Seconds per call of each, interleaved; ratio = peer seconds / our seconds (> 1: difflab faster)."""
    for w in (ours, peer):
        for _ in range(warmup):
            w.ask(cmd, 1, size)
    a, b = [], []
    for r in range(repeats):
        pair = (ours, peer) if r % 2 == 0 else (peer, ours)
        got = {w.kind: w.ask(cmd, n, size) for w in pair}
        a.append(got[ours.kind])
        b.append(got[peer.kind])
    ratios = [y / x for x, y in zip(a, b)]
    return {"ours_s": statistics.median(a), "peer_s": statistics.median(b), "ratio": statistics.median(ratios),
            "ratios": ratios}


def matmul_peak(dtype_name: str, threads: int, n: int, repeats: int = 5) -> float:
    """Best dense n x n matmul rate in FLOP/s at this thread count (the MFU denominator)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bf16_hardware() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (difflab's own check, which sampling uses)."""
    from difflab.nets.inference import onednn_bf16

    return onednn_bf16()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fast_bf16 = bf16_hardware()  # bf16 sizes: full on bf16 hardware, a token run on CPUs without it
    p.add_argument("--repeats", type=int, default=_env("repeats", 5), help="interleaved repetitions (median)")
    p.add_argument("--bf16-repeats", type=int, default=_env("bf16_repeats", 5 if fast_bf16 else 1))
    p.add_argument("--train-batch", type=int, default=_env("train_batch", 8))
    p.add_argument("--train-steps", type=int, default=_env("train_steps", 2), help="steps per repetition")
    p.add_argument("--forward-batch", type=int, default=_env("forward_batch", 16))
    p.add_argument("--ddim-batch", type=int, default=_env("ddim_batch", 2))
    p.add_argument("--ddim-steps", type=int, default=_env("ddim_steps", 50))
    p.add_argument("--bf16-batch", type=int, default=_env("bf16_batch", 8 if fast_bf16 else 1))
    p.add_argument("--digits-batch", type=int, default=_env("digits_batch", 64))
    p.add_argument("--digits-ddim-batch", type=int, default=_env("digits_ddim_batch", 64))
    p.add_argument("--ch", type=int, default=_env("ch", 128), help="base width of the CIFAR-10 pair (128 = the paper's)")
    p.add_argument("--threads", type=int, default=_env("threads", os.cpu_count() or 1))
    p.add_argument("--no-bf16", action="store_true", default=bool(_env("no_bf16", 0)))
    p.add_argument("--bf16-ddim", action="store_true", default=bool(_env("bf16_ddim", int(fast_bf16))),
                   help="also a bf16 DDIM sample (default on bf16 hardware; without it this takes many minutes)")
    p.add_argument("--peer-setup", action="store_true", default=bool(_env("peer_setup", 0)),
                   help="give the peers difflab's process setup too (malloc reuse, denormal flushing), which "
                        "difflab's entry points apply and the peers' users do not get by default")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.bf16_hardware = fast_bf16
    for name in ("repeats", "bf16_repeats", "train_batch", "train_steps", "forward_batch", "ddim_batch",
                 "ddim_steps", "bf16_batch", "digits_batch", "digits_ddim_batch", "ch", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    """All comparisons; returns rows and machine facts."""
    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    facts = {"threads": args.threads, "cpu": _cpu_name(), "bf16_hardware": args.bf16_hardware,
             "peer_setup": args.peer_setup, "load_avg_start": os.getloadavg()}
    precisions = ["fp32"] + ([] if args.no_bf16 else ["bf16"])
    for prec in precisions:
        if prec == "bf16":  # the slow part last
            rows += _digits(ctx, args, facts)
        batch = args.train_batch if prec == "fp32" else args.bf16_batch
        reps = args.repeats if prec == "fp32" else args.bf16_repeats
        full_size = prec == "fp32" or args.bf16_hardware  # else a token bf16 run (no bf16 units)
        steps = args.train_steps if full_size else 1
        ours = Worker(ctx, "difflab-cifar", prec, args, batch)
        peer = Worker(ctx, "diffusers", prec, args, batch)
        try:
            ours.ready(), peer.ready()
            facts["params"] = {"difflab": ours.params, "diffusers": peer.params}
            if args.ch == 128 and not ours.params == peer.params == DDPM_CIFAR10_PARAMS:
                raise RuntimeError(f"parameter counts differ from {DDPM_CIFAR10_PARAMS}: {facts['params']}")
            warm = 2 if full_size else 0  # first steps allocate and fault pages
            res = compare(ours, peer, "train", repeats=reps, n=steps, size=batch, warmup=warm)
            rows.append(_row("CIFAR-10 U-Net vs diffusers", "train img/s", prec, batch, res, per_call=batch))
            res = compare(ours, peer, "train_ema", repeats=reps, n=steps, size=batch, warmup=0)
            rows.append(_row("CIFAR-10 U-Net vs diffusers", "train + EMA update img/s", prec, batch, res,
                             per_call=batch))
            mem = {w.kind: w.ask("peak_mb") for w in (ours, peer)}
            rows.append({"pair": "CIFAR-10 U-Net vs diffusers", "what": "train peak RSS MB", "precision": prec,
                         "batch": batch, "ours": mem["difflab-cifar"], "peer": mem["diffusers"],
                         "ratio": mem["diffusers"] / mem["difflab-cifar"]})
            if prec == "fp32":
                flops = {w.kind: w.ask("flops") for w in (ours, peer)}
                facts["train_flop_per_image"] = flops
            fb = args.forward_batch if full_size else args.bf16_batch
            res = compare(ours, peer, "forward", repeats=reps, n=1, size=fb, warmup=warm)
            rows.append(_row("CIFAR-10 U-Net vs diffusers", "no-grad forward img/s", prec, fb, res, per_call=fb))
            res = compare(ours, peer, "sampler_forward", repeats=reps, n=1, size=fb, warmup=max(warm, 1))
            rows.append(_row("CIFAR-10 U-Net vs diffusers", "sampler-step forward img/s", prec, fb, res, per_call=fb))
            if prec == "fp32" or args.bf16_ddim:
                res = compare(ours, peer, "ddim", repeats=reps, n=1, size=args.ddim_batch, warmup=0)
                rows.append(_row("CIFAR-10 U-Net vs diffusers", f"DDIM-{args.ddim_steps} sample img/s", prec,
                                 args.ddim_batch, res, per_call=args.ddim_batch))
        finally:
            ours.stop(), peer.stop()
    if args.no_bf16:
        rows += _digits(ctx, args, facts)
    facts["matmul_peak_flops"] = {p: matmul_peak(p, args.threads, 2048 if p == "fp32" else 512) for p in precisions}
    _add_mfu(rows, facts)
    facts["load_avg_end"] = os.getloadavg()
    return {"rows": rows, "facts": facts, "args": {k: str(v) for k, v in vars(args).items()}}


def _digits(ctx, args: argparse.Namespace, facts: dict) -> list[dict]:
    rows = []
    b = args.digits_batch
    ours = Worker(ctx, "difflab-digits", "fp32", args, b)
    peer = Worker(ctx, "lucidrains", "fp32", args, b)
    try:
        ours.ready(), peer.ready()
        facts["digits_params"] = {"difflab": ours.params, "lucidrains": peer.params}
        pair = "digits U-Net vs denoising-diffusion-pytorch"
        res = compare(ours, peer, "train", repeats=args.repeats, n=10, size=b, warmup=2)
        rows.append(_row(pair, "train img/s", "fp32", b, res, per_call=b))
        mem = {w.kind: w.ask("peak_mb") for w in (ours, peer)}
        rows.append({"pair": pair, "what": "train peak RSS MB", "precision": "fp32", "batch": b,
                     "ours": mem["difflab-digits"], "peer": mem["lucidrains"],
                     "ratio": mem["lucidrains"] / mem["difflab-digits"]})
        res = compare(ours, peer, "forward", repeats=args.repeats, n=10, size=b, warmup=2)
        rows.append(_row(pair, "no-grad forward img/s", "fp32", b, res, per_call=b))
        db = args.digits_ddim_batch
        res = compare(ours, peer, "ddim", repeats=args.repeats, n=1, size=db, warmup=1)
        rows.append(_row(pair, f"DDIM-{args.ddim_steps} sample img/s", "fp32", db, res, per_call=db))
    finally:
        ours.stop(), peer.stop()
    return rows


def _row(pair: str, what: str, prec: str, batch: int, res: dict, *, per_call: int) -> dict:
    row = {"pair": pair, "what": what, "precision": prec, "batch": batch,
           "ours": per_call / res["ours_s"], "peer": per_call / res["peer_s"], "ratio": res["ratio"],
           "ratios": [round(r, 3) for r in res["ratios"]]}
    print(f"  {pair}: {what} {prec} batch {batch}: difflab {row['ours']:.3g}, peer {row['peer']:.3g}, "
          f"ratios {row['ratios']}", file=sys.stderr, flush=True)
    return row


def _add_mfu(rows: list[dict], facts: dict) -> None:
    """Model FLOP/s of the training step over the measured matmul peak of the same precision."""
    flops = facts.get("train_flop_per_image")
    if not flops:
        return
    for row in list(rows):
        if row["what"] == "train img/s" and row["pair"].startswith("CIFAR"):
            peak = facts["matmul_peak_flops"][row["precision"]]
            rows.append({"pair": row["pair"], "what": "train MFU % (of measured matmul peak)",
                         "precision": row["precision"], "batch": row["batch"],
                         "ours": 100 * row["ours"] * flops["difflab-cifar"] / peak,
                         "peer": 100 * row["peer"] * flops["diffusers"] / peak, "ratio": row["ratio"]})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(result: dict) -> str:
    """The Markdown table `make bench` prints."""
    lines = ["| pair | measure | precision | batch | difflab | peer | ratio (median, >1 = difflab better) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} | {r['what']} | {r['precision']} | {r['batch']} | {r['ours']:.3g} | "
                     f"{r['peer']:.3g} | {r['ratio']:.2f}x |")
    f = result["facts"]
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in f.get("matmul_peak_flops", {}).items())
    flops = f.get("train_flop_per_image", {})
    bf16 = {True: "native bf16 kernels", False: "no bf16 units", None: "bf16 units unknown"}[f.get("bf16_hardware")]
    lines += ["", f"CPU: {f['cpu']} ({bf16}), {f['threads']} threads; load average {f['load_avg_start'][0]:.1f} at start, "
              f"{f['load_avg_end'][0]:.1f} at end", f"parameters: {f.get('params')}, digits: {f.get('digits_params')}",
              f"matmul peak: {peaks}; training FLOP per image: "
              + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()),
              "process setup (malloc reuse, denormal flushing): difflab" + (" and the peers" if f.get("peer_setup")
                                                                           else " only, as its entry points do")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # lucidrains' sampler draws progress bars; workers inherit this
    start = time.perf_counter()
    result = run(args)
    result["facts"]["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(result))
    print(f"total {result['facts']['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
