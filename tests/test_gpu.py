"""CUDA: samplers agree with the CPU, mixed-precision training, checkpoints, compile, channels_last, kernels.

Every test here is marked `gpu` and skips without a CUDA GPU; `make gpu-check` runs them with
`pytest -m gpu` on the GPU machine (docs/performance.md, "GPU check"). Later GPU features add their
`gpu` tests to this file (or mark them `gpu` elsewhere). Kept small: tiny nets, few steps, well under a
minute on an H200 including the one torch.compile.

Stated tolerances (float32, TF32 off on both sides, x_T drawn on the CPU and moved):
- fixed-step deterministic samplers (DDIM eta=0, Heun without churn, DPM-Solver++): max |CUDA - CPU|
  <= 1e-3 on images in [-1, 1]. For scale: perturbing every network output by a relative 1e-5 moves
  them by at most 2.2e-4 here (fp32 CUDA and CPU kernels differ by ~1e-6 relative);
- PF-ODE (RK45, rtol = atol = 1e-4, unclipped): max |CUDA - CPU| <= 1e-3 max |CPU| (a relative 1e-4
  output perturbation moves it by 2.4e-5 of its range);
- stochastic samplers (DDPM respaced, PC, ALD) draw their noise from per-sample generators on the
  net's device, and CUDA and CPU generators differ: finite, shaped, and the same twice for the same seeds.

DIFFLAB_GPU_TEST_DEVICE=cpu runs the "CUDA" side on the CPU (a dry run of the test code itself; the
CUDA-only checks skip).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from difflab.diffusion.schedules import NoiseSchedule, linear_betas
from difflab.diffusion.sde import VPSDE
from difflab.lit import DiffusionModule
from difflab.lit.checkpoint_io import safe_load
from difflab.lit.mixed_precision import BF16MixedPrecision
from difflab.lit.optim import Adam
from difflab.nets import group_norm
from difflab.nets.unet import UNet
from difflab.samplers import ALD, DDIM, DDPM, PC, PFODE, DPMSolverPP, Heun
from difflab.samplers.generate import generate

DEVICE = os.environ.get("DIFFLAB_GPU_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="checks CUDA itself (DIFFLAB_GPU_TEST_DEVICE=cpu dry run)")

FIXED_STEP_ATOL = 1e-3
PF_ODE_RTOL = 1e-3


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32: TF32 off for matmuls and convolutions (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_net(*, channels_last: bool = False, seed: int = 0) -> UNet:
    """A 2-level U-Net on 8x8 images with attention, its weights perturbed so every output is non-trivial."""
    torch.manual_seed(seed)
    net = UNet(image_size=8, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               dropout=0.0, channels_last=channels_last)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return net


def tiny_module(**kw) -> DiffusionModule:
    kw.setdefault("optimizer", functools.partial(Adam, lr=2e-3, fused=True))
    return DiffusionModule(net=kw.pop("net", None) or tiny_net(), betas=linear_betas(1000), lr_warmup_steps=0,
                           ema_decay=0.9, **kw)


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1]: a 2x2 random pattern upsampled to 8x8 (structure a tiny net can learn)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 2, 2, generator=g) * 2 - 1).repeat_interleave(4, 2).repeat_interleave(4, 3)


def x_T(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_betas(linear_betas(1000))


# ------------------------------------------------------------------------------------ (i) samplers


@pytest.mark.parametrize("sampler", [DDIM(steps=10, eta=0.0), Heun(steps=6, s_churn=0.0), DPMSolverPP(steps=10)],
                         ids=lambda s: s.name)
def test_deterministic_sampler_on_cuda_agrees_with_cpu(sampler):
    net = tiny_net().eval()
    with torch.inference_mode():
        cpu = sampler(net, x_T(), schedule(), parameterization="eps")
        dev = sampler(copy.deepcopy(net).to(DEVICE), x_T().to(DEVICE), schedule().to(DEVICE), parameterization="eps")
    assert dev.device.type == DEVICE and dev.shape == cpu.shape and torch.isfinite(dev).all()
    err = (dev.cpu() - cpu).abs().max().item()
    assert err <= FIXED_STEP_ATOL, f"{sampler.name}: max |CUDA - CPU| = {err:.2e} > {FIXED_STEP_ATOL}"


def test_pf_ode_on_cuda_agrees_with_cpu():
    net = tiny_net().eval()
    sampler = PFODE(rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        cpu = sampler(net, x_T(), schedule(), parameterization="eps")
        dev = sampler(copy.deepcopy(net).to(DEVICE), x_T().to(DEVICE), schedule().to(DEVICE), parameterization="eps")
    assert dev.device.type == DEVICE and torch.isfinite(dev).all()
    err, scale = (dev.cpu() - cpu).abs().max().item(), cpu.abs().max().item()
    assert err <= PF_ODE_RTOL * scale, f"PF-ODE: max |CUDA - CPU| = {err:.3g} > {PF_ODE_RTOL} x {scale:.3g}"


@pytest.mark.parametrize("family,sampler", [
    ("ddpm", DDPM(steps=10)),
    ("ddpm", DDIM(steps=10, eta=1.0)),
    ("vp", PC(steps=25, snr=0.01)),
    ("vp", ALD(levels=4, n_steps_each=2)),
], ids=["ddpm-respaced-10", "ddim-eta1-10", "pc-25", "ald-4x2"])
def test_stochastic_sampler_runs_on_cuda(family, sampler):
    net = tiny_net().to(DEVICE).eval()
    fam = schedule().to(DEVICE) if family == "ddpm" else VPSDE()
    run = lambda: generate(net, fam, sampler, seeds=[3, 4, 5], parameterization="eps")  # noqa: E731
    a, b = run(), run()
    assert a.shape == (3, 3, 8, 8) and a.device.type == DEVICE and torch.isfinite(a).all()
    assert torch.equal(a, b), "the same seeds gave different samples on the same device"


def test_bf16_sampling_on_cuda_is_finite_and_close_to_float32():
    net = tiny_net().to(DEVICE).eval()
    full = generate(net, schedule().to(DEVICE), DDIM(steps=10), seeds=range(4), parameterization="eps")
    low = generate(net, schedule().to(DEVICE), DDIM(steps=10), seeds=range(4), parameterization="eps",
                   precision="bf16-mixed")
    assert torch.isfinite(low).all()
    assert (low.float() - full).abs().mean().item() < 0.05  # bf16 has 8 bits of mantissa: close, not equal


# ------------------------------------------------------------------------- (ii) mixed-precision training


def fit(module: DiffusionModule, *, steps: int, precision: str, callbacks=(), clip: float | None = 1.0) -> pl.Trainer:
    """`steps` optimizer steps of `module` on one fixed batch of 16, through Lightning as difflab-train runs it."""
    x0 = images(16)
    data = TensorDataset(x0.repeat(steps, 1, 1, 1), torch.zeros(16 * steps, dtype=torch.long))
    kw: dict = {"precision": precision}
    if precision == "bf16-mixed":  # what cli/trainer_setup.build_trainer does (fused optimizer + clipping)
        kw = {"plugins": [BF16MixedPrecision(device="cuda" if ON_CUDA else "cpu")]}
    trainer = pl.Trainer(accelerator="gpu" if ON_CUDA else "cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=clip, callbacks=list(callbacks), num_sanity_val_steps=0,
                         limit_val_batches=0, **kw)
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=False))
    return trainer


def fixed_loss(module: DiffusionModule) -> float:
    """The float32 loss on the fixed batch with fixed timesteps and noise (on the CPU, where fit leaves it)."""
    module = module.cpu()
    with torch.no_grad():
        return module.loss(images(16), generator=torch.Generator().manual_seed(7)).mean().item()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_on_cuda_is_finite_and_lowers_the_loss(precision):
    if precision == "16-mixed" and not ON_CUDA:
        pytest.skip("16-mixed is a CUDA precision")
    optimizer = functools.partial(Adam, lr=2e-3, fused=precision != "16-mixed")  # 16-mixed + clip: unfused
    module = tiny_module(optimizer=optimizer)
    before = fixed_loss(module)
    ema_before = [p.detach().clone() for p in module.ema.module.parameters()]
    trainer = fit(module, steps=30, precision=precision)
    after = fixed_loss(module)
    assert trainer.global_step == 30
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert after < 0.5 * before, f"{precision}: loss {before:.4f} -> {after:.4f} after 30 steps"
    moved = sum(not torch.equal(a, b) for a, b in zip(ema_before, module.ema.module.parameters()))
    assert moved > 0, "the EMA copy did not move"


# --------------------------------------------------------------------------- (iii) CUDA checkpoint -> CPU


class SaveOnDevice(pl.Callback):
    """At the end of training, before Lightning moves the module back to the CPU: a checkpoint and a sample."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        assert pl_module.device.type == DEVICE
        trainer.save_checkpoint(self.path)
        self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        with torch.inference_mode():
            net = pl_module.ema.module.eval()
            self.sample = DDIM(steps=10)(net, x_T().to(DEVICE), pl_module.schedule, parameterization="eps").cpu()


def test_checkpoint_saved_on_cuda_loads_on_cpu_and_samples_the_same(tmp_path):
    path = tmp_path / "cuda.ckpt"
    saver = SaveOnDevice(path)
    fit(tiny_module(), steps=3, precision="bf16-mixed", callbacks=[saver])
    locations: set[str] = set()
    torch.load(path, map_location=lambda storage, loc: locations.add(loc) or storage, weights_only=False)
    if ON_CUDA:
        assert any(loc.startswith("cuda") for loc in locations), locations

    stored = safe_load(path, map_location="cpu")
    cpu_module = tiny_module(net=tiny_net(seed=5))  # other weights: the checkpoint must replace them all
    cpu_module.on_load_checkpoint(stored)  # difflab's architecture check
    cpu_module.load_state_dict(stored["state_dict"])
    state = cpu_module.state_dict()
    assert state.keys() == saver.state.keys()
    different = [k for k in state if not torch.equal(state[k], saver.state[k])]
    assert not different, f"state_dict entries differ after the CUDA -> CPU round trip: {different[:5]}"
    with torch.inference_mode():
        cpu = DDIM(steps=10)(cpu_module.ema.module.eval(), x_T(), cpu_module.schedule, parameterization="eps")
    err = (cpu - saver.sample).abs().max().item()
    assert err <= FIXED_STEP_ATOL, f"DDIM-10 of the EMA net: max |CUDA - CPU| = {err:.2e}"


# ------------------------------------------------------------------------------------ (v) channels_last


def test_channels_last_on_cuda_matches_nchw():
    nchw = tiny_net(channels_last=False).to(DEVICE).eval()
    nhwc = tiny_net(channels_last=True).to(DEVICE).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x, t = x_T(8).to(DEVICE), torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    a, b = nchw(x, t), nhwc(x, t)
    assert b.shape == a.shape
    torch.testing.assert_close(b.contiguous(), a, atol=1e-5, rtol=1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=lambda m: f"grad of {name}: {m}")


# ----------------------------------------------------------------------- (vi) CPU-only kernels stay off


@cuda_only
def test_cpu_only_kernels_are_never_used_on_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("difflab's CPU NHWC GroupNorm kernel was called on CUDA tensors")

    monkeypatch.setattr(group_norm._GroupNormNHWC, "apply", refuse)
    monkeypatch.setattr(group_norm, "_forward", refuse)
    net = tiny_net(channels_last=True).to("cuda").train()
    x = x_T(4).to("cuda").contiguous(memory_format=torch.channels_last)
    t = torch.full((4,), 500, device="cuda")
    h = x.new_zeros(4, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not group_norm.uses_kernel(h, torch.ones(32, device="cuda"))
    net(x, t).square().mean().backward()  # float32, channels_last: torch's ops only
    with torch.autocast("cuda", dtype=torch.bfloat16):
        net(x, t).float().square().mean().backward()
    # the sampling rewrite prepacks oneDNN convolutions on the CPU only
    from difflab.nets.inference import PrepackedConv2d, sampling_net

    fast = sampling_net(net.eval(), torch.bfloat16)
    packed = [m for m in fast.modules() if isinstance(m, PrepackedConv2d) and m.prepack]
    assert not packed, f"{len(packed)} convolutions prepacked for oneDNN on CUDA"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(fast(x, t)).all()


# ---------------------------------------------------------------- (iv) torch.compile (last: the slowest)


def test_compiled_training_step_runs_on_cuda_with_the_eager_keys():
    eager = tiny_module()
    compiled = tiny_module(compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints move between the two
    losses, grads = {}, {}
    for name, module in (("eager", eager), ("compiled", compiled)):
        module.to(DEVICE).train()
        optimizer = module.configure_optimizers()["optimizer"]
        loss = module.loss(images(16).to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(0)).mean()
        loss.backward()
        losses[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in module.net.parameters()])
        optimizer.step()  # the fused step on the compiled net's parameters
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in compiled.parameters())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3), losses
    rel = ((grads["compiled"] - grads["eager"]).norm() / grads["eager"].norm()).item()
    assert rel < 1e-3, f"compiled vs eager gradients differ by {rel:.2e} (relative L2)"


# ------------------------------------------------------------------------------ (vii) exact resume on CUDA


def train_digits(run_dir, *, steps: int, ckpt_path=None) -> DiffusionModule:
    """`steps` steps on digits (epochs of 4, flips, dropout) with a checkpoint after every step, as
    difflab-train runs it (seeded, atomic checkpoints, the DataModule's resumable loader)."""
    from difflab.callbacks import PeriodicCheckpoint
    from difflab.data import DigitsDataModule
    from difflab.lit.checkpoint_io import AtomicCheckpointIO

    pl.seed_everything(0, workers=True)
    data = DigitsDataModule(image_size=8, channels=1, batch_size=16, num_workers=0, val_fraction=0.1, seed=0,
                            hflip=True)
    net = UNet(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
    module = DiffusionModule(net=net, betas=linear_betas(1000), lr_warmup_steps=2, ema_decay=0.9,
                             optimizer=functools.partial(Adam, lr=1e-3, fused=True))
    trainer = pl.Trainer(accelerator="gpu" if ON_CUDA else "cpu", devices=1, max_steps=steps, logger=False,
                         callbacks=[PeriodicCheckpoint(dirpath=str(run_dir), every_n_train_steps=1, keep=-1)],
                         plugins=[AtomicCheckpointIO()], limit_train_batches=4, limit_val_batches=0,
                         num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                         deterministic="warn", gradient_clip_val=1.0)  # warn: an op without a
    try:                                                # deterministic CUDA kernel shows as a difference
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:  # Lightning set it process-wide
        torch.use_deterministic_algorithms(False)
    return module


def test_resume_on_cuda_from_mid_epoch_equals_straight_training(tmp_path):
    """Checkpoint at step 3 (the last batch of epoch 1 is 4): weights, EMA and optimizer state of the
    resumed run equal the straight run's bit for bit (deterministic algorithms where CUDA has them)."""
    straight = train_digits(tmp_path / "straight", steps=6)
    resumed = train_digits(tmp_path / "resumed", steps=6, ckpt_path=tmp_path / "straight" / "step-0000003.ckpt")
    a, b = safe_load(tmp_path / "straight" / "step-0000006.ckpt"), safe_load(tmp_path / "resumed" / "step-0000006.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k}: max |diff| {(v.float() - b['state_dict'][k].float()).abs().max()}"
    for i, state in a["optimizer_states"][0]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer_states"][0]["state"][i][k]), f"optimizer state {i}.{k}"
    assert int(straight.ema.n_averaged) == int(resumed.ema.n_averaged) == 6


# ---------------------------------------------------------------------- (viii) evaluation on CUDA vs CPU


def test_fid_on_cuda_equals_fid_on_cpu_for_the_same_images():
    """The metrics engine (features, moments, FID/KID/precision-recall) on CUDA, against itself on the CPU."""
    from sklearn.datasets import load_digits

    from difflab.metrics import GenerativeMetrics
    from difflab.metrics.extractors.classifier import ClassifierExtractor
    from difflab.metrics.reference import ReferenceStats
    from difflab.nets.classifiers import ImageClassifier

    digits = torch.from_numpy(load_digits().images).float().mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    real, fake = digits[:600], digits[600:1000].flip(-1)  # "generated": other digits, mirrored
    scores = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        extractor = ClassifierExtractor(net=ImageClassifier(image_size=8, in_channels=1, num_classes=10, ch=8,
                                                            feature_dim=16, dropout=0.0), name="tiny").to(device)
        reference = ReferenceStats.from_batches(real.to(device).split(100), extractor, num_images=len(real))
        gm = GenerativeMetrics(extractor=extractor, metrics=("fid", "kid", "precision_recall"), kid_subsets=10).to(device)
        gm.set_reference(reference)
        for batch in fake.to(device).split(100):
            gm.update_fake(batch)
        scores[device] = gm.compute()
    cpu, dev = scores["cpu"], scores[DEVICE]
    assert cpu.keys() == dev.keys() and cpu["fid"] > 0
    for k in cpu:
        assert dev[k] == pytest.approx(cpu[k], rel=1e-4, abs=1e-6), (k, cpu[k], dev[k])
