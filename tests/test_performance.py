"""Performance means that must not change results, the benchmark plumbing, and streaming evaluation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from difflab.metrics.evaluation import evaluate_sampler
from difflab.diffusion import linear_betas
from difflab.lit import DiffusionModule
from difflab.nets import UNet
from difflab.samplers import DDIM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
import peer_systems  # noqa: E402


def tiny_module(**kwargs) -> DiffusionModule:
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    return DiffusionModule(net=net, betas=linear_betas(50), optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                           **kwargs)


def test_compile_flag_keeps_checkpoint_keys():
    # torch.compile wraps the net in place (compiled lazily at the first call): no duplicate _orig_mod keys
    assert tiny_module(compile=True).state_dict().keys() == tiny_module().state_dict().keys()
    # so a checkpoint of a compiled run resumes without compile, and the reverse (what Lightning's resume calls)
    for source, target in ((tiny_module(compile=True), tiny_module()), (tiny_module(), tiny_module(compile=True))):
        torch.manual_seed(1)
        with torch.no_grad():
            for param in source.net.parameters():
                param.add_(torch.randn_like(param))
        checkpoint = {"state_dict": source.state_dict()}
        source.on_save_checkpoint(checkpoint)
        target.on_load_checkpoint(checkpoint)  # difflab's architecture check
        target.load_state_dict(checkpoint["state_dict"])  # strict
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_non_finite_loss_raises_on_cpu():
    m = tiny_module()
    m.check_finite(torch.tensor(1.0), batch_idx=0)
    with pytest.raises(FloatingPointError, match="non-finite training loss at global step 0, batch 3 .*loss nan"):
        m.check_finite(torch.tensor(float("nan")), batch_idx=3)


class _FakeModel:
    """Counts live sampled batches: evaluation must let go of each one before drawing the next."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.max_alive = 0

    def sample(self, sampler, seeds, *, use_ema=True):  # reference counting frees a dropped batch at once
        self.max_alive = max(self.max_alive, 1 + sum(r() is not None for r in self.refs))
        x = torch.zeros(len(seeds), 1, 4, 4)
        self.refs.append(weakref.ref(x))
        return x


class _FakeMetrics:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def reset(self) -> None:
        self.sizes.clear()

    def update_fake(self, images: torch.Tensor, targets: torch.Tensor | None = None,
                    prompts: list[str] | None = None, prompt_ids: torch.Tensor | None = None) -> None:
        assert images.dtype == torch.uint8 and targets is None and prompts is None
        self.sizes.append(images.shape[0])

    def compute(self) -> dict[str, float]:
        return {"n": float(sum(self.sizes))}


def test_evaluation_streams_one_batch_at_a_time():
    model, metrics = _FakeModel(), _FakeMetrics()
    out = evaluate_sampler(model, DDIM(steps=2), metrics, num_samples=10, batch_size=3, seed=0)
    assert out == {"n": 10.0} and metrics.sizes == [3, 3, 3, 1]
    assert model.max_alive == 1  # never more than the batch being drawn


def test_bench_compare_takes_median_of_same_run_ratios():
    class Fake:
        def __init__(self, kind: str, times: list[float]) -> None:
            self.kind, self.times, self.calls = kind, list(times), []

        def ask(self, cmd: str, n: int = 1, size: int = 0) -> float:
            self.calls.append(cmd)
            return self.times.pop(0)

    ours, peer = Fake("a", [9.0, 1.0, 2.0, 1.0]), Fake("b", [9.0, 2.0, 6.0, 1.0])
    res = bench.compare(ours, peer, "train", repeats=3, n=1, size=1, warmup=1)
    assert res["ratios"] == [2.0, 3.0, 1.0] and res["ratio"] == 2.0  # median of ratios, not ratio of medians
    row = bench._row("p", "train img/s", "fp32", 4, res, per_call=4)
    table = bench.format_table({"rows": [row], "facts": {"cpu": "x", "threads": 1, "load_avg_start": (0.0,),
                                                          "load_avg_end": (0.0,)}})
    assert "| p | train img/s | fp32 | 4 | 4 | 2 | 2.00x |" in table


def test_difflab_bench_system_trains_and_samples():
    torch.manual_seed(0)
    s = peer_systems.Difflab(overrides=["model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1"], batch=4, ddim_steps=2)
    before = [p.detach().clone() for p in s.net.parameters()]
    s.train_step("fp32")
    assert any(not torch.equal(a, p) for a, p in zip(before, s.net.parameters()))
    ema = s.module.ema
    assert int(ema.n_averaged) == 0
    s.ema_update()
    assert int(ema.n_averaged) == 1 and all(torch.equal(e, p) for e, p in zip(ema.module.parameters(), s.net.parameters()))
    s.forward(3, "fp32")
    s.sampler_forward(3, "fp32")
    assert s._sampling_nets["fp32"] is not s.module.ema.module  # prepared once, a copy
    s.ddim(2, "fp32")
    assert s.optimizer.defaults.get("fused") is True  # conf/optimizer/adamw.yaml


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="the bench extra is not installed")
def test_diffusers_peer_is_the_ddpm_cifar10_architecture():
    peer = peer_systems.diffusers_unet()
    assert sum(p.numel() for p in peer.parameters()) == peer_systems.DDPM_CIFAR10_PARAMS == UNet().num_parameters


@pytest.mark.parametrize("native, batch, repeats", [(True, 8, 5), (False, 1, 1)])
def test_bench_bf16_sizes_follow_the_hardware(monkeypatch, native, batch, repeats):
    for name in ("BENCH_BF16_BATCH", "BENCH_BF16_REPEATS", "BENCH_BF16_DDIM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bench, "bf16_hardware", lambda: native)
    args = bench.parse_args([])
    assert (args.bf16_batch, args.bf16_repeats, args.bf16_ddim) == (batch, repeats, native)


def test_bench_detects_bf16_units_as_a_bool():
    assert isinstance(bench.bf16_hardware(), bool)


def test_digit_judge_is_accurate_and_tells_digits_from_noise():
    """benchmarks/judge_digits.py, the independent judge behind the README's sample-quality figures."""
    import judge_digits
    import numpy as np
    from sklearn.datasets import load_digits

    clf, acc = judge_digits.fit_judge()
    assert acc > 0.97
    real = (load_digits().images[:300, :, :, None] / 16.0 * 255).round().astype("uint8")
    real_score = judge_digits.judge(real, clf)
    assert real_score["confident_share"] > 0.95 and real_score["classes_present"] == 10
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 8, 8, 1), dtype=np.uint8)
    assert judge_digits.judge(noise, clf)["mean_top_probability"] < real_score["mean_top_probability"] - 0.2


_FAULTS = """
import resource, sys, torch
import difflab.cli.config  # as in every entry point, Hydra is loaded before setup_process (see the test)
from difflab.cli.process_setup import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
for _ in range(2):
    torch.empty(16 << 20).fill_(1.0)  # 64 MB: the first uses fault their pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)  # freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    # glibc's default unmaps each freed 64 MB block, so every new one faults its 16k pages in again
    default = _faults("default")[1]
    assert default > 10 * 15000
    # reused: mostly none (seen 0-2 blocks' worth); the best of three, since a busy machine (the other
    # test worker, the kernel reclaiming pages) can fault some pages back in during one run. With only
    # torch imported (no Hydra, unlike every entry point) glibc still gave back 4-7 of 10 blocks here
    # (2026-12-04, AMD EPYC): the mallopt settings alone do not pin the heap in every process layout
    runs = [_faults("keep") for _ in range(3)]
    flag, faults = runs[0][0], min(f for _, f in runs)
    assert flag == "True" and faults < default / 3, runs
    assert _faults("keep", {"DIFFLAB_MALLOC": "default"})[0] == "False"


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of tensor values into Python (`.item()`, `bool(t)`, `float(t)`): a GPU would sync at each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_host_read_counter_sees_item_and_bool():
    with _HostReads() as reads:
        torch.tensor(1.5).item(), bool(torch.tensor(True))
    assert reads.count == 2


@pytest.mark.parametrize("sampler", ["DDPM", "DDIM", "DPMSolverPP", "Heun"])
def test_sampler_loops_read_no_tensor_values(sampler):
    """No host synchronisation in sampling: `DiffusionModule.sample` reads no tensor value into Python at any
    step (on a GPU each read would stall the stream and break CUDA-graph capture of the step)."""
    import difflab.samplers as samplers

    module = tiny_module()
    for steps in (4, 8):
        with _HostReads() as reads:
            module.sample(getattr(samplers, sampler)(**({} if sampler == "DDPM" else {"steps": steps})), seeds=range(2))
        assert reads.count == 0, f"{sampler} with {steps} steps read {reads.count} tensor values on the host"


def test_training_loss_reads_no_tensor_values():
    """The loss, backward and optimizer step of a training step read no tensor values on the host."""
    module = tiny_module()
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4, fused=True)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    with _HostReads() as reads:
        module.loss(x0).mean().backward()
        opt.step()
    assert reads.count == 0
