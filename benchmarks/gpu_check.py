"""`make gpu-check`: one command that shows difflab runs, agrees with the CPU and is fast on a CUDA GPU.

Stages, each in its own subprocess with its own time budget (seconds; --budgets env=60,train=200):
  env     GPU, driver, torch / CUDA / cuDNN, Python and package versions, bf16 support; that difflab
          and its config tree (pkg://difflab.conf) import from this tree                       (45 s)
  pytest  `pytest -m gpu` over the test files that mark tests `gpu` (tests/test_gpu.py, ...)  (110 s)
  train   a real `python -m difflab.cli.train experiment=ddpm_cifar10 trainer=gpu` run, bf16-mixed,
          logger=csv, on generated CIFAR-10-format data (5 x 10,000 random 32x32 images: the network
          cannot fetch CIFAR-10 there) for --train-seconds (90), with the callback of
          benchmarks/gpu_check_throughput.py: images/s, peak GPU memory, MFU                   (170 s)
  bench   benchmarks/bench_cuda.py: difflab's ddpm_cifar10 vs diffusers' UNet2DModel, batch 128,
          bf16 and tf32: training img/s (forward + backward + optimizer + EMA), DDIM-50 img/s,
          peak memory, MFU                                                                      (130 s)
  means   (only when selected: --stages means) `bench_cuda.py --means`: difflab alone, each performance
          mean on / off against its current setup (compile of the training step and of the sampling
          net, channels_last, cudnn.benchmark, fused vs foreach Adam, float32 matmul precision)   (330 s)
The whole run also stops at --total-budget (450 s): a stage gets at most what is left.

Without CUDA (a developer's machine) the GPU stages are skipped: env runs, `pytest -m gpu` only
collects (its tests skip), and train runs its CPU plumbing: the same command line with trainer=cpu on
a tiny net for 2 steps, plus the exact GPU command line composed with Hydra's --cfg job.

Results land in --out (default $GPU_CHECK_OUT, else outputs/gpu-check/): gpu_check.json, rewritten
when each stage starts and ends (a run cut short still says how far it got), gpu_check.md, and one
log per stage (<stage>.log). Exit status 0 whatever a stage found (the JSON says what failed), 2 on a
usage error. `make gpu-check` runs this with the right Python (see the Makefile and gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
STAGES = ("env", "pytest", "train", "bench", "means")
DEFAULT_STAGES = ("env", "pytest", "train", "bench")  # means runs only when --stages names it
TITLES = {"env": "environment", "pytest": "pytest -m gpu", "train": "real run: ddpm_cifar10, trainer=gpu, bf16-mixed",
          "bench": "bench vs diffusers (CUDA)", "means": "each mean on / off (difflab, CUDA)"}
BUDGETS = {"env": 45.0, "pytest": 110.0, "train": 170.0, "bench": 130.0, "means": 330.0}
TOTAL_BUDGET = 450.0
LOG_LIMIT = 4 * 2**20  # bytes of each stage log kept in --out
MISSING_HINT = ("run `make gpu-wheels` on a machine with network and carry .whl/ here (device run: carry [\".whl\"]); "
                "`make gpu-check` installs them")


# --------------------------------------------------------------------------------------------- utilities


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_logged(cmd: list[str], *, log: Path, timeout: float, env: dict | None = None, cwd: Path = ROOT,
               prefix: str = "") -> tuple[int | None, float, str]:
    """Run cmd in its own process group, copying its output to `log` (capped) and to our stdout; kill the group
    at `timeout`. Returns (exit status or None on timeout, seconds, last 3000 characters of output)."""
    start = time.perf_counter()
    tail: list[str] = []
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        written = [fh.tell()]

        def pump() -> None:
            for line in proc.stdout:
                tail.append(line)
                del tail[:-200]
                if written[0] < LOG_LIMIT:
                    fh.write(line)
                    written[0] += len(line)
                    if written[0] >= LOG_LIMIT:
                        fh.write(f"[log cut at {LOG_LIMIT} bytes]\n")
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5)
        if rc is None:
            fh.write(f"[killed after {timeout:.0f} s: the stage's budget]\n")
    return rc, time.perf_counter() - start, "".join(tail)[-3000:]


def stage_env(extra_path: list[str] | None = None) -> dict:
    """The environment for stage subprocesses: src/ and benchmarks/ importable, unbuffered output."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(BENCH_DIR), *(extra_path or [])]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# ------------------------------------------------------------------------------------------ env probe


def probe_env() -> dict:
    """What stage env reports (run in a subprocess with the stage's Python; prints one JSON line)."""
    import importlib
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                  "cpus": os.cpu_count()}
    import torch

    cuda = torch.cuda.is_available()
    raw = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cudnn = f"{raw // 10000}.{raw // 100 % 100}.{raw % 100}" if raw and raw >= 90000 else raw  # 9.x: MMmmpp
    info.update(torch=torch.__version__, cuda_available=cuda, cuda=torch.version.cuda, cudnn=cudnn, cudnn_raw=raw)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    packages = {}
    for name in ("pytorch-lightning", "lightning", "torchmetrics", "torchvision", "hydra-core", "omegaconf",
                 "antlr4-python3-runtime", "torch-fidelity", "efficientnet-lite-pytorch", "diffusers",
                 "huggingface-hub", "safetensors", "numpy", "scipy", "triton", "pytest"):
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    try:
        importlib.import_module("difflab.cli.train")  # everything the train entry point imports at import time
        import hydra

        from difflab.cli.config import config_dir

        info["hydra_from"] = str(Path(hydra.__file__).parent.parent)
        info["config_dir"] = config_dir()
        info["config_ok"] = (Path(config_dir()) / "experiment" / "ddpm_cifar10.yaml").is_file()
        info["difflab_imports"] = True
    except ModuleNotFoundError as err:
        info["difflab_imports"] = False
        info["missing_module"] = err.name
    return info


# ---------------------------------------------------------------------------------------------- stages


class Check:
    """Runs the selected stages, keeping gpu_check.json / gpu_check.md in `out` current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="difflab-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.cuda = cuda_available(args.python)
        self.report: dict = {
            "schema": 1, "started": now_iso(), "finished": None, "mode": "gpu" if self.cuda else "cpu",
            "python": args.python, "out": str(self.out), "total_budget_s": args.total_budget,
            "stages": {s: {"title": TITLES[s], "status": "pending", "budget_s": args.budgets[s]} for s in STAGES
                       if s in DEFAULT_STAGES or s in args.stages},
        }
        self.write()

    # -- bookkeeping

    def remaining(self) -> float:
        return self.args.total_budget - (time.perf_counter() - self.start)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.report["summary"] = summarize(self.report["stages"])
        write_atomic(self.out / "gpu_check.json", json.dumps(self.report, indent=2, default=str))
        write_atomic(self.out / "gpu_check.md", markdown(self.report))

    def run(self) -> dict:
        for stage, rec in self.report["stages"].items():
            if stage not in self.args.stages:
                rec.update(status="skipped", reason="not selected (--stages)")
                self.write()
                continue
            budget = min(self.args.budgets[stage], self.remaining())
            if self.remaining() < 5:
                rec.update(status="skipped", reason=f"the total budget ({self.args.total_budget:.0f} s) is spent")
                self.write()
                continue
            rec.update(status="running", started=now_iso(), budget_s=round(budget, 1))
            self.write()
            print(f"== gpu-check: {stage} ({TITLES[stage]}), budget {budget:.0f} s", flush=True)
            t0 = time.perf_counter()
            try:
                getattr(self, f"stage_{stage}")(rec, budget)
            except Exception as err:  # a bug in the check itself: report it, go on with the next stage
                rec.update(status="failed", message=f"gpu_check.py: {type(err).__name__}: {err}")
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"== gpu-check: {stage} {rec['status']} in {rec['seconds']} s"
                  + (f": {rec['message']}" if rec.get("message") else ""), flush=True)
            self.write()
        self.report["finished"] = now_iso()
        self.write()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.report

    def _log(self, stage: str) -> Path:
        path = self.out / f"{stage}.log"
        path.write_text("")
        return path

    @staticmethod
    def _finish(rec: dict, rc: int | None, tail: str, log: Path, budget: float) -> bool:
        """Record a subprocess's outcome; True when it exited 0."""
        rec["log"] = log.name
        if rc is None:
            rec.update(status="timeout", message=f"killed at its budget of {budget:.0f} s", tail=tail[-1500:])
            return False
        rec["exit_status"] = rc
        if rc != 0:
            rec.update(status="failed", message=f"exit status {rc}", tail=tail[-1500:])
            return False
        return True

    # -- env

    def stage_env(self, rec: dict, budget: float) -> None:
        log = self._log("env")
        cmd = [self.args.python, str(Path(__file__).resolve()), "--probe-env"]
        rc, _, tail = run_logged(cmd, log=log, timeout=budget, env=stage_env(), prefix="[env] ")
        if not self._finish(rec, rc, tail, log, budget):
            return
        info = last_json(tail) or {}
        rec["results"] = info
        self.report["environment"] = {k: info.get(k) for k in ("gpu", "torch", "cuda", "cudnn", "python", "driver")}
        if not info.get("difflab_imports"):
            rec.update(status="failed", message=f"difflab does not import: no module {info.get('missing_module')!r}; "
                                                + MISSING_HINT)
        elif self.cuda and not info.get("cuda_available"):
            rec.update(status="failed", message="CUDA was seen by the Makefile's probe but not by this Python")
        else:
            rec["status"] = "passed"

    # -- pytest -m gpu

    def stage_pytest(self, rec: dict, budget: float) -> None:
        log = self._log("pytest")
        files = gpu_test_files()
        rec["files"] = [str(f.relative_to(ROOT)) for f in files]
        if not files:
            rec.update(status="failed", message="no test file marks tests with pytest.mark.gpu")
            return
        xml = self.work / "pytest.xml"
        cmd = [self.args.python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "--durations=8",
               f"--junitxml={xml}", *map(str, files)]
        rc, _, tail = run_logged(cmd, log=log, timeout=budget, env=stage_env(), prefix="[pytest] ")
        rec["log"] = log.name
        counts = junit_counts(xml) if xml.is_file() else None
        if counts is None:  # killed before pytest wrote its report: what -v printed so far
            counts = verbose_counts(log.read_text(encoding="utf-8", errors="replace"))
        rec["results"] = counts or {}
        if rc is None:
            rec.update(status="timeout", message=f"killed at its budget of {budget:.0f} s", tail=tail[-1500:])
            return
        rec["exit_status"] = rc
        if not self.cuda:
            ok = rc in (0, 5) and counts is not None and counts["failed"] == 0 and counts["errors"] == 0
            rec.update(status="skipped" if ok else "failed",
                       reason="no CUDA GPU: the gpu tests were collected and skipped" if ok else None)
            if not ok:
                rec.update(message=f"collecting the gpu tests failed (exit status {rc})", tail=tail[-1500:])
            return
        if rc == 0 and counts and counts["passed"] > 0:
            rec["status"] = "passed"
        else:
            rec.update(status="failed", message=f"exit status {rc}" + (f", failed: {counts['failed_tests']}"
                                                                      if counts and counts["failed_tests"] else ""),
                       tail=tail[-1500:])

    # -- the real run

    def train_overrides(self, data_root: Path, run_dir: Path, throughput: Path, *, gpu: bool) -> list[str]:
        a = self.args
        overrides = [
            "experiment=ddpm_cifar10", "trainer=gpu" if gpu else "trainer=cpu", "trainer.precision=bf16-mixed",
            "logger=csv", "callbacks.evaluation=null", "callbacks.sample_grid=null", "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50", f"data.root={data_root}",
            "data.download=false", f"hydra.run.dir={run_dir}",
            "+callbacks.gpu_check._target_=gpu_check_throughput.Throughput", f"+callbacks.gpu_check.path={throughput}",
        ]
        if gpu:
            s = int(a.train_seconds)
            overrides += [f"trainer.max_time=00:00:{s // 60:02d}:{s % 60:02d}", "trainer.max_steps=1000000"]
        else:  # the CPU plumbing: a tiny net for 2 steps, same command line otherwise
            overrides += ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "data.batch_size=8",
                          "trainer.max_steps=2", "trainer.max_time=null", "+callbacks.gpu_check.warmup_steps=1"]
        return overrides

    def stage_train(self, rec: dict, budget: float) -> None:
        log = self._log("train")
        deadline = time.perf_counter() + budget
        data_root = self.work / "data"
        per_batch = 10_000 if self.cuda else 40
        make_cifar10_batches(data_root, per_batch)
        rec["data"] = f"{5 * per_batch} random 32x32 RGB images in CIFAR-10's python-batch format (data=cifar10)"
        throughput = self.work / "throughput.json"
        run_dir = self.work / "train-run"
        overrides = self.train_overrides(data_root, run_dir, throughput, gpu=self.cuda)
        rec["command"] = "python -m difflab.cli.train " + " ".join(overrides)
        if not self.cuda:  # the exact GPU command line must compose, though it cannot run here
            gpu_overrides = self.train_overrides(data_root, run_dir, throughput, gpu=True)
            cmd = [self.args.python, "-m", "difflab.cli.train", *gpu_overrides, "--cfg", "job"]
            rc, _, tail = run_logged(cmd, log=log, timeout=deadline - time.perf_counter(), env=stage_env(),
                                     prefix="[train --cfg job] ")
            rec["gpu_command_composes"] = rc == 0
            rec["gpu_command"] = "python -m difflab.cli.train " + " ".join(gpu_overrides)
            if not self._finish(rec, rc, tail, log, budget):
                return
        cmd = [self.args.python, "-m", "difflab.cli.train", *overrides]
        env = stage_env()
        env.setdefault("DIFFLAB_CACHE_DIR", str(self.work / "cache"))
        rc, seconds, tail = run_logged(cmd, log=log, timeout=deadline - time.perf_counter(), env=env,
                                       prefix="[train] ")
        rec["run_seconds"] = round(seconds, 1)
        results = json.loads(throughput.read_text()) if throughput.is_file() else {}
        rec["results"] = results
        if not self._finish(rec, rc, tail, log, budget):
            return
        if self.cuda and not results.get("images_per_s"):
            rec.update(status="failed", message="the run ended without a throughput measurement", tail=tail[-1500:])
            return
        rec["status"] = "passed"
        if not self.cuda:
            rec["variant"] = "cpu-plumbing"
            rec["reason"] = "no CUDA GPU: 2 steps of a tiny net with trainer=cpu; the GPU command line composed"

    # -- bench

    def stage_bench(self, rec: dict, budget: float) -> None:
        self._bench_cuda(rec, budget, "bench", self.work / "bench.json", [*self.args.bench_args], margin=25.0)

    # -- means (only when selected)

    def stage_means(self, rec: dict, budget: float) -> None:
        # means.json is rewritten after each row: a run cut short keeps its rows
        self._bench_cuda(rec, budget, "means", self.out / "means.json", ["--means", *self.args.means_args], margin=30.0)

    def _bench_cuda(self, rec: dict, budget: float, name: str, out: Path, args: list[str], *, margin: float) -> None:
        """Run benchmarks/bench_cuda.py with `args` inside the stage's budget; its JSON becomes the results."""
        if not self.cuda:
            rec.update(status="skipped", reason="no CUDA GPU")
            return
        log = self._log(name)
        cmd = [self.args.python, str(BENCH_DIR / "bench_cuda.py"), "--json", str(out),
               "--budget", str(max(10.0, budget - margin)), *args]
        rc, _, tail = run_logged(cmd, log=log, timeout=budget, env=stage_env(), prefix=f"[{name}] ")
        rec["results"] = json.loads(out.read_text()) if out.is_file() else {}
        if self._finish(rec, rc, tail, log, budget):
            rec["status"] = "passed"


# ------------------------------------------------------------------------------------------- helpers


def cuda_available(python: str) -> bool:
    """Whether `python` sees a CUDA GPU (a subprocess: this process never imports torch)."""
    try:
        done = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def gpu_test_files() -> list[Path]:
    """Test files that mark tests `gpu` (pytest -m gpu then selects those tests)."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "pytest.mark.gpu" in text:
            found.append(path)
    return found


def junit_counts(xml: Path) -> dict | None:
    """passed / failed / errors / skipped and the failed test ids from a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return None
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [], "slowest": []}
    times = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        counts["tests"] += 1
        times.append((float(case.get("time") or 0.0), name))
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failed_tests"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["slowest"] = [f"{t:.1f}s {n}" for t, n in sorted(times, reverse=True)[:5]]
    return counts


def verbose_counts(text: str) -> dict:
    """The counts of junit_counts from `pytest -v` lines (a run killed at its budget writes no XML)."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [], "slowest": [],
              "from": "pytest -v output (no JUnit report: the run was cut short)"}
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M):
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}[m.group(2)]
        counts["tests"] += 1
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failed_tests"].append(m.group(1))
    return counts


def make_cifar10_batches(root: Path, per_batch: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/data_batch_1..5 of random images (what data=cifar10 reads; no download)."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        # smooth-ish random images: a random 8x8 image upsampled 4x plus fine noise, so the net has structure to learn
        coarse = rng.integers(0, 256, size=(per_batch, 3, 8, 8), dtype=np.uint8).repeat(4, axis=2).repeat(4, axis=3)
        fine = rng.integers(-16, 17, size=coarse.shape)
        data = np.clip(coarse.astype(np.int16) + fine, 0, 255).astype(np.uint8).reshape(per_batch, -1)
        entry = {"data": data, "labels": rng.integers(0, 10, size=per_batch).tolist(), "batch_label": f"fake {i}"}
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(entry, fh, protocol=4)
    return folder


def summarize(stages: dict) -> dict:
    by = {s: [k for k, v in stages.items() if v["status"] == s]
          for s in ("passed", "failed", "timeout", "skipped", "running", "pending")}
    by["ok"] = not by["failed"] and not by["timeout"]
    return by


def _fmt(v, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def key_numbers(stage: str, rec: dict) -> str:
    r = rec.get("results") or {}
    if rec["status"] in ("pending", "running"):
        return ""
    if stage == "env" and r:
        gpu = f"{r.get('gpu')} ({r.get('gpu_memory_gib')} GiB, sm {r.get('capability')}), bf16 {r.get('bf16_supported')}" \
            if r.get("cuda_available") else "no CUDA GPU"
        return (f"{gpu}; torch {r.get('torch')}, CUDA {r.get('cuda')}, cuDNN {r.get('cudnn')}, Python {r.get('python')}, "
                f"Lightning {(r.get('packages') or {}).get('pytorch-lightning')}, Hydra {(r.get('packages') or {}).get('hydra-core')}")
    if stage == "pytest" and r:
        return f"{r.get('passed')} passed, {r.get('failed')} failed, {r.get('errors')} errors, {r.get('skipped')} skipped"
    if stage == "train" and r:
        if r.get("images_per_s") and r.get("device") == "cpu":
            return f"{r['images_per_s']:.0f} img/s on the CPU, {r.get('steps')} steps, loss {_fmt(r.get('loss_last'), '.3f')}"
        if r.get("images_per_s"):
            return (f"{r['images_per_s']:.0f} img/s (median step {_fmt(r.get('median_step_images_per_s'), '.0f')}), "
                    f"peak {_fmt(r.get('peak_memory_allocated_gib'), '.1f')} GiB allocated, "
                    f"MFU {100 * r['mfu']:.1f} % of {r['peak_flops'] / 1e12:.0f} TFLOP/s ({r['peak_name']}), "
                    f"{r['train_flops_per_image'] / 1e9:.1f} GFLOP/img, {r.get('steps')} steps")
        return f"{r.get('steps')} steps" + (f", {r.get('note')}" if r.get("note") else "")
    if stage == "bench" and r.get("rows"):
        parts = [f"{row['what']} {row['precision']} {_fmt(row['ratio'], '.2f')}x" for row in r["rows"]
                 if row["what"] != "train peak GiB"]
        return "difflab / diffusers: " + ", ".join(parts)
    if stage == "means" and r.get("rows"):
        parts = [f"{row['name']} " + "/".join(_fmt(row.get(k), ".2f") + "x" if row.get(k) else "—"
                                                for k in ("train_vs_base", "ddim_vs_base"))
                 for row in r["rows"] if row.get("base")]
        return "train/DDIM img/s vs base: " + ", ".join(parts)
    return ""


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    lines = ["# difflab GPU check", "",
             f"{report['started']} · mode {report['mode']} · {env.get('gpu') or 'no GPU'} · torch {env.get('torch')} · "
             f"CUDA {env.get('cuda')} · cuDNN {env.get('cudnn')} · driver {env.get('driver')} · Python {env.get('python')} · "
             f"{report.get('elapsed_s')} s of {report['total_budget_s']:.0f} s"
             + ("" if report.get("finished") else " · **not finished**"), "",
             "| stage | status | seconds | budget s | key numbers |", "|---|---|---|---|---|"]
    for stage, rec in report["stages"].items():
        status = rec["status"] + (" (CPU plumbing)" if rec.get("variant") == "cpu-plumbing" else "")
        lines.append(f"| {rec['title']} | {status} | {_fmt(rec.get('seconds'), '.1f')} | {_fmt(rec.get('budget_s'), '.0f')} "
                     f"| {key_numbers(stage, rec)} |")
    bench = (report["stages"]["bench"].get("results") or {})
    if bench.get("rows"):
        lines += ["", "## bench (CUDA)", "", f"{bench['facts'].get('device')}, batch {bench['facts'].get('batch')}, "
                  f"torch {bench['facts'].get('torch')}, cudnn.benchmark {bench['facts'].get('cudnn_benchmark')}; "
                  f"MFU against {bench['facts'].get('peak_flops', 0) / 1e12:.0f} TFLOP/s ({bench['facts'].get('peak_name')}); "
                  f"lucidrains: {bench['facts'].get('lucidrains')}", "",
                  "| measure | precision | batch | difflab | diffusers | ratio (>1: difflab better) |",
                  "|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['what']} | {r['precision']} | {r['batch']} | {_fmt(r['difflab'])} | "
                         f"{_fmt(r['diffusers'])} | {_fmt(r['ratio'], '.2f')} |")
        if bench.get("errors"):
            lines += ["", "bench errors: " + "; ".join(f"{k}: {str(v).strip().splitlines()[-1]}"
                                                       for k, v in bench["errors"].items())]
    means = (report["stages"].get("means") or {}).get("results") or {}
    if means.get("table"):
        f = means["facts"]
        lines += ["", "## each mean on / off (difflab)", "", f"{f.get('device')}, batch {f.get('batch')}, torch "
                  f"{f.get('torch')}, {f.get('seconds')} s of a {f.get('budget_s'):.0f} s budget; {f.get('timing')}",
                  "", means["table"]]
    train = report["stages"]["train"]
    if train.get("command"):
        lines += ["", "## real run", "", f"`{train['command']}`", "", f"data: {train.get('data')}"]
    problems = [(s, r) for s, r in report["stages"].items() if r["status"] in ("failed", "timeout")]
    if problems:
        lines += ["", "## failures", ""]
        for stage, rec in problems:
            lines += [f"### {stage}: {rec['status']}", "", rec.get("message") or "", ""]
            failed = (rec.get("results") or {}).get("failed_tests") if stage == "pytest" else None
            if failed:
                lines += ["failed tests: " + ", ".join(failed), ""]
            if rec.get("tail"):
                lines += ["```", rec["tail"].rstrip()[-1500:], "```", ""]
    skipped = [(s, r) for s, r in report["stages"].items() if r["status"] == "skipped" and r.get("reason")]
    if skipped:
        lines += ["", "skipped: " + "; ".join(f"{s}: {r['reason']}" for s, r in skipped)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_budgets(text: str) -> dict[str, float]:
    budgets = dict(BUDGETS)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in BUDGETS:
            raise argparse.ArgumentTypeError(f"unknown stage {name!r} in --budgets; stages: {', '.join(STAGES)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--budgets {item!r}: give seconds, e.g. {name}=60") from None
        if budgets[name] <= 0:
            raise argparse.ArgumentTypeError(f"--budgets {item!r}: seconds must be > 0")
    return budgets


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"--stages {text!r}: choose from {', '.join(STAGES)} (comma-separated)")
    return stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "outputs" / "gpu-check"),
                   help="results folder (default $GPU_CHECK_OUT, else outputs/gpu-check/)")
    p.add_argument("--stages", type=parse_stages, default=list(DEFAULT_STAGES),
                   help=f"comma list of {', '.join(STAGES)} (default: all but means)")
    p.add_argument("--budgets", type=parse_budgets, default=dict(BUDGETS), help="per-stage seconds, e.g. train=200")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET, help="seconds for all stages together")
    p.add_argument("--train-seconds", type=int, default=90, help="training time of the real run (trainer.max_time)")
    p.add_argument("--python", default=sys.executable, help="the Python the stages run with (default: this one)")
    p.add_argument("--work-dir", default=None, help="scratch folder (data, run dir); default a temporary one")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (checkpoints, CSV logs)")
    p.add_argument("--bench-args", default="", help="extra arguments for bench_cuda.py, e.g. '--precisions bf16'")
    p.add_argument("--means-args", default="", help="extra arguments for bench_cuda.py --means, e.g. "
                   "'--means-rows base,compile_train'")
    p.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.total_budget <= 0 or args.train_seconds < 1:
        p.error("--total-budget and --train-seconds must be > 0")
    args.bench_args = args.bench_args.split()
    args.means_args = args.means_args.split()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_env:
        print(json.dumps(probe_env()))
        return 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        print(f"gpu-check: cannot write results to --out {args.out}: {err}", file=sys.stderr)
        return 2
    check = Check(args)
    if not check.cuda:
        print(f"gpu-check: no CUDA GPU for {args.python}: running the CPU-side plumbing; GPU stages are skipped",
              flush=True)
    report = check.run()
    print(markdown(report))
    print(f"gpu-check: results in {args.out}/gpu_check.json and gpu_check.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
