"""`make gpu-check` on a machine without a GPU: its JSON / Markdown, budgets, bad input (benchmarks/gpu_check.py).

The GPU stages themselves run on the GPU machine only; here: the CPU mode writes its summary with the GPU
stages skipped, a stage past its budget is reported as a timeout, usage errors exit 2, a GPU machine
without the carried wheels is told to run `make gpu-wheels`, the real run's GPU command line composes,
and the summary formats a GPU report (built by hand, with the fields the GPU stages write).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from difflab.cli.config import config_dir
from difflab.data.cifar_batches import read_cifar10_train

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU mode (this machine has CUDA)")


def run_check(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@no_gpu_here
def test_cpu_mode_writes_json_and_markdown_with_the_gpu_stages_skipped(tmp_path):
    done = run_check("--out", str(tmp_path), "--stages", "env,bench")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert report["mode"] == "cpu" and report["finished"]
    assert stages["env"]["status"] == "passed", stages["env"]
    assert stages["env"]["results"]["difflab_imports"] and stages["env"]["results"]["config_ok"]
    assert stages["bench"]["status"] == "skipped" and stages["bench"]["reason"] == "no CUDA GPU"
    assert stages["pytest"]["status"] == stages["train"]["status"] == "skipped"
    assert report["summary"]["ok"] and report["summary"]["skipped"] == ["pytest", "train", "bench"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| environment | passed |" in md and "| bench vs diffusers (CUDA) | skipped |" in md
    assert (tmp_path / "env.log").is_file()


@no_gpu_here
def test_a_stage_past_its_budget_is_a_timeout_and_the_report_is_still_written(tmp_path):
    done = run_check("--out", str(tmp_path), "--stages", "env", "--budgets", "env=0.2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["env"]["status"] == "timeout"
    assert report["summary"]["timeout"] == ["env"] and not report["summary"]["ok"]
    assert "## failures" in (tmp_path / "gpu_check.md").read_text()
    assert "killed after" in (tmp_path / "env.log").read_text()


@pytest.mark.parametrize("args,message", [
    (["--stages", "env,gpu"], "choose from env, pytest, train, bench"),
    (["--budgets", "train=soon"], "give seconds"),
    (["--budgets", "warp=3"], "unknown stage 'warp'"),
    (["--total-budget", "0"], "must be > 0"),
])
def test_usage_errors_exit_2_naming_the_value(tmp_path, args, message):
    done = run_check("--out", str(tmp_path), *args, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_gpu_machine_without_wheels_is_told_to_run_make_gpu_wheels(tmp_path):
    # a python3 that "sees a GPU" and has none of hydra / omegaconf / torch-fidelity, and no wheels carried
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\ncase "$2" in *cuda*) exit 0;; *) exit 1;; esac\n')
    fake.chmod(0o755)
    env = dict(os.environ, GPU_WHEELS=str(tmp_path / "no-wheels"))
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={fake}",
                           f"GPU_CHECK_OUT={tmp_path / 'out'}"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=60)
    assert done.returncode != 0
    assert "make gpu-wheels" in done.stderr and "no wheels in" in done.stderr, done.stderr


def test_the_real_runs_gpu_command_line_composes_with_the_throughput_callback(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    check = object.__new__(gpu_check.Check)  # only train_overrides: no stage runs
    check.args = args
    overrides = check.train_overrides(tmp_path / "data", tmp_path / "run", tmp_path / "t.json", gpu=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    GlobalHydra.instance().clear()
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.ch == 128 and cfg.data.batch_size == 128 and cfg.data.download is False
    assert cfg.trainer.max_time == "00:00:01:30" and cfg.callbacks.evaluation is None
    assert "wandb" not in cfg.get("logger", {})
    callback = instantiate(cfg.callbacks.gpu_check)
    assert type(callback).__name__ == "Throughput" and callback.peak_flops == 989e12


def test_generated_cifar10_batches_are_what_data_cifar10_reads(tmp_path):
    folder = gpu_check.make_cifar10_batches(tmp_path, 6)
    images, labels = read_cifar10_train(folder)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (30,)
    assert images.float().std() > 20  # not constant


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="a" time="1.5"/>'
                   '<testcase classname="t" name="b" time="0.1"><failure message="x"/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase>'
                   '<testcase classname="t" name="d"><error/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == \
        {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert counts["failed_tests"] == ["t::b", "t::d"] and counts["slowest"][0] == "1.5s t::a"


def test_counts_from_verbose_output_when_pytest_was_killed():
    text = ("tests/test_gpu.py::test_a[x] PASSED    [ 10%]\ntests/test_gpu.py::test_b FAILED  [ 20%]\n"
            "tests/test_gpu.py::test_c SKIPPED (needs a CUDA GPU)  [ 30%]\nsome other line\n")
    counts = gpu_check.verbose_counts(text)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed_tests"] == ["tests/test_gpu.py::test_b"]


def test_the_summary_of_a_gpu_report():
    stages = {s: {"title": gpu_check.TITLES[s], "status": "passed", "budget_s": gpu_check.BUDGETS[s], "seconds": 9.0}
              for s in gpu_check.STAGES}
    stages["env"]["results"] = {"cuda_available": True, "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8,
                                "capability": "9.0", "bf16_supported": True, "torch": "2.11.0+cu130",
                                "packages": {"pytorch-lightning": "2.6.6"}}
    stages["pytest"].update(status="failed", message="exit status 1",
                            results={"passed": 14, "failed": 1, "errors": 0, "skipped": 0,
                                     "failed_tests": ["tests.test_gpu::test_x"]})
    stages["train"]["results"] = {"device": "NVIDIA H200", "images_per_s": 5000.0, "median_step_images_per_s": 5200.0,
                                  "peak_memory_allocated_gib": 11.5, "mfu": 0.1836, "peak_flops": 989e12,
                                  "peak_name": "H200 SXM dense bf16 (datasheet)", "train_flops_per_image": 36.3e9,
                                  "steps": 4000}
    stages["bench"]["results"] = {"facts": {"device": "NVIDIA H200", "batch": 128, "peak_flops": 989e12},
                                  "rows": [{"what": "train img/s", "precision": "bf16", "batch": 128, "difflab": 5000.0,
                                            "diffusers": 4000.0, "ratio": 1.25},
                                           {"what": "train peak GiB", "precision": "bf16", "batch": 128,
                                            "difflab": 10.0, "diffusers": 12.0, "ratio": 1.2}], "errors": {}}
    report = {"started": "2026-12-04T00:00:00Z", "finished": None, "mode": "gpu", "total_budget_s": 450.0,
              "elapsed_s": 36.0, "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}, "stages": stages}
    report["summary"] = gpu_check.summarize(stages)
    md = gpu_check.markdown(report)
    assert "5000 img/s" in md and "MFU 18.4 % of 989 TFLOP/s" in md and "36.3 GFLOP/img" in md
    assert "NVIDIA H200 (139.8 GiB, sm 9.0), bf16 True" in md and "**not finished**" in md
    assert "| train img/s | bf16 | 128 | 5e+03 | 4e+03 | 1.25 |" in md
    assert "failed tests: tests.test_gpu::test_x" in md
    assert report["summary"]["failed"] == ["pytest"] and not report["summary"]["ok"]


def test_means_runs_on_the_cpu_with_tiny_settings_and_writes_its_rows(tmp_path):
    """bench_cuda.py --means plumbing in process: the selected rows measured, compared with their base rows,
    the compile row compiled once without graph breaks (backend eager: no inductor build here), flags restored."""
    import bench_cuda

    out = tmp_path / "means.json"
    matmul = torch.get_float32_matmul_precision()
    rc = bench_cuda.main(["--means", "--device", "cpu", "--ch", "8", "--batch", "2", "--warmup", "1",
                          "--train-steps", "1", "--repeats", "1", "--ddim-steps", "2", "--ddim-repeats", "1",
                          "--compile-backend", "eager", "--means-rows", "base,foreach_adam,fp32_high,compile_sampling",
                          "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result["errors"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["base", "foreach_adam", "compile_sampling", "fp32_high"]  # MEANS' order
    assert all(r["status"] == "measured" for r in rows.values()), [r["status"] for r in rows.values()]
    base, foreach, compiled, high = (rows[k]["measured"] for k in rows)
    assert base["train_images_per_s"] > 0 and base["ddim_images_per_s"] > 0 and base["channels_last"]
    assert foreach["optimizer"] == {"fused": False, "foreach": True} and "ddim_images_per_s" not in foreach
    assert rows["foreach_adam"]["train_vs_base"] > 0 and rows["foreach_adam"]["ddim_vs_base"] is None
    assert high["flags"]["matmul_precision"] == "high" and rows["fp32_high"]["train_vs_base"] is None  # base not run
    assert "train_images_per_s" not in compiled and compiled["ddim_compile_s"] >= 0
    assert compiled["dynamo_graphs"] == 1 and compiled["graph_breaks"] == 0
    assert torch.get_float32_matmul_precision() == matmul and not torch.backends.cudnn.benchmark
    assert "| compile_sampling | bf16 |" in result["table"]
    # gpu_check's means stage reports that JSON
    report = {"started": "x", "finished": "y", "mode": "gpu", "total_budget_s": 450.0, "elapsed_s": 1.0,
              "stages": {"bench": {"title": "b", "status": "skipped"}, "train": {"title": "t", "status": "skipped"},
                         "means": {"title": gpu_check.TITLES["means"], "status": "passed", "results": result}}}
    md = gpu_check.markdown(report)
    assert "## each mean on / off (difflab)" in md and "| foreach_adam | bf16 |" in md
    assert "train/DDIM img/s vs base: foreach_adam " in md
