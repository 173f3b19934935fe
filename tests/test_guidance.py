"""Class conditioning and guidance: classifier-free (Ho & Salimans 2022), classifier gradients
(Dhariwal & Nichol 2021), dynamic thresholding (Imagen), min-SNR-gamma weighting, offset noise."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.objectives import SimpleLoss, min_snr_weight, offset_noise, snr
from difflab.diffusion.process import q_sample, x0_eps_from_output
from difflab.diffusion.schedules import NoiseSchedule, cosine_betas, extract
from difflab.lit import DiffusionModule
from difflab.nets import Conditioning, UNet
from difflab.nets.classifiers import NoisyImageClassifier
from difflab.diffusion.sde import VPSDE
from difflab.samplers.generate import Guidance
from difflab.samplers import (
    ALD, DDIM, DDPM, PC, PFODE, DPMSolverPP, Heun, classifier_free_guidance, classifier_grad, dynamic_threshold,
)


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_betas(cosine_betas(30))


def fake_net(x, t, cond):
    """A conditional 'net' whose output depends on the label (null label = 10) and has 2C channels."""
    c = cond.labels.float().reshape(-1, 1, 1, 1)
    return torch.cat([0.1 * x + 0.05 * c, 0.2 * torch.ones_like(x) * c / 10], dim=1)


def test_cfg_w0_is_unconditional_w1_conditional_and_w_guided():
    x, t = torch.randn(4, 1, 4, 4), torch.tensor([3, 5, 7, 9])
    y, null = Conditioning(labels=torch.tensor([1, 2, 3, 7])), Conditioning(labels=torch.full((4,), 10))
    kw = dict(mean_channels=1)
    torch.testing.assert_close(classifier_free_guidance(fake_net, y, null, guidance_scale=1.0, **kw)(x, t), fake_net(x, t, y))
    torch.testing.assert_close(classifier_free_guidance(fake_net, y, null, guidance_scale=0.0, **kw)(x, t), fake_net(x, t, null))
    got = classifier_free_guidance(fake_net, y, null, guidance_scale=3.0, **kw)(x, t)
    cond, uncond = fake_net(x, t, y), fake_net(x, t, null)
    torch.testing.assert_close(got[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(got[:, 1:], cond[:, 1:])  # the learned variance comes from the conditional call
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        Guidance(scale=-1)  # the one place guidance scales are checked
    with pytest.raises(ValueError, match="classifier_scale=-0.5"):
        Guidance(classifier_scale=-0.5)


def _cond_module(num_classes=3):
    torch.manual_seed(0)  # the net's own initialisation: the test does not depend on what ran before
    net = UNet(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, num_classes=num_classes)
    with torch.no_grad():  # as if trained: zero-initialised layers (conv_out, residual convs) become non-zero
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        net.class_embed.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))  # labels matter
    return DiffusionModule(net=net, betas=cosine_betas(20), optimizer=torch.optim.Adam)


def test_module_sample_w1_equals_conditional_sampler_and_w0_unconditional():
    m = _cond_module()
    sampler, seeds, y = DDIM(steps=5, clip_x0=False), [0, 1, 2], torch.tensor([0, 1, 2])
    x_T = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = sampler(lambda x, t: m.ema.module(x, t, Conditioning(labels=y)), x_T, m.schedule)
    uncond = sampler(lambda x, t: m.ema.module(x, t, None), x_T, m.schedule)
    torch.testing.assert_close(m.sample(sampler, seeds, labels=y, guidance_scale=1.0), cond)
    torch.testing.assert_close(m.sample(sampler, seeds, labels=y, guidance_scale=0.0), uncond)
    torch.testing.assert_close(m.sample(sampler, seeds), uncond)  # no labels: the null label
    assert not torch.allclose(m.sample(sampler, seeds, labels=y, guidance_scale=4.0), cond)
    with pytest.raises(ValueError, match="label 3 is outside 0..2"):
        m.sample(sampler, seeds, labels=[0, 1, 3])


def test_label_dropout_puts_in_the_null_label():
    m = _cond_module(num_classes=5)
    m.label_dropout = 0.3
    y = torch.zeros(20000, dtype=torch.long)
    out = m._train_labels(y, len(y), torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 5}
    assert (out == 5).float().mean().item() == pytest.approx(0.3, abs=0.015)


def two_class_logits(a: torch.Tensor):
    """logits [a.x, -a.x]: grad_x log p(y=0 | x) = 2 a sigmoid(-2 a.x) in closed form."""
    def classifier(x, t):
        s = (x * a).flatten(1).sum(1)
        return torch.stack([s, -s], dim=1)
    return classifier


def test_classifier_grad_matches_closed_form(gen):
    a = torch.randn(1, 1, 4, 4, generator=gen) * 0.3
    x = torch.randn(3, 1, 4, 4, generator=gen)
    with torch.inference_mode():  # samplers run under inference mode; the gradient must still work
        got = classifier_grad(two_class_logits(a), torch.zeros(3, dtype=torch.long), scale=2.5)(x, torch.zeros(3, dtype=torch.long))
    s = (x * a).flatten(1).sum(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got, 2.5 * 2 * a * torch.sigmoid(-2 * s))


def _gens(n=2):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def test_classifier_guidance_s0_is_unguided_and_shifts_are_exact(sched):
    model_fn = lambda x, t: 0.2 * x  # noqa: E731
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    zero = lambda x, t: 0.0 * x  # noqa: E731  (s = 0)
    c = torch.full((2, 1, 4, 4), 0.3)
    const = lambda x, t: c  # noqa: E731  (s grad = c)
    for sampler in (DDPM(), DDPM(steps=7), DDIM(steps=7), DDIM(steps=7, eta=1.0)):
        plain = sampler(model_fn, x_T, sched, generator=_gens())
        torch.testing.assert_close(sampler(model_fn, x_T, sched, generator=_gens(), cond_fn=zero), plain)
        assert not torch.allclose(sampler(model_fn, x_T, sched, generator=_gens(), cond_fn=const), plain)
    # one step straight to the data: DDPM adds Sigma * s grad with Sigma = beta' = 1 - alpha_bar_T ...
    ab = sched.alpha_bar[-1].item()
    one = DDPM(steps=1, spacing="trailing", clip_x0=False, variance="fixed_small")
    diff = one(model_fn, x_T, sched, cond_fn=const) - one(model_fn, x_T, sched)
    torch.testing.assert_close(diff, (1 - ab) * c, rtol=1e-3, atol=1e-4)  # x0_hat is large at t = T: float32 cancellation
    # ... and DDIM's eps correction moves x0 by (1 - alpha_bar) / sqrt(alpha_bar) * s grad
    one = DDIM(steps=1, spacing="trailing", clip_x0=False)
    diff = one(model_fn, x_T, sched, cond_fn=const) - one(model_fn, x_T, sched)
    torch.testing.assert_close(diff, (1 - ab) / math.sqrt(ab) * c, rtol=1e-4, atol=1e-5)


def test_dynamic_thresholding_keeps_x0_in_range(sched, gen):
    x0 = torch.randn(5, 3, 8, 8, generator=gen) * torch.tensor([0.3, 1.0, 2.0, 5.0, 50.0]).reshape(-1, 1, 1, 1)
    out = dynamic_threshold(x0, 0.995)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(out[0], x0[0].clamp(-1, 1))  # s = max(1, quantile) = 1: plain clipping
    s = torch.quantile(x0[4].abs().flatten(), 0.995)
    torch.testing.assert_close(out[4], x0[4].clamp(-s, s) / s)
    seen = []
    wild = lambda x, t: 40.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t[0])))  # noqa: E731
    for sampler in (DDPM(dynamic_percentile=0.995), DDIM(steps=6, dynamic_percentile=0.9)):
        sampler(wild, torch.randn(2, 1, 4, 4), sched, generator=_gens(), callback=lambda d: seen.append(d["x0"]))
    assert max(x.abs().max().item() for x in seen) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="dynamic_percentile=1.5"):
        DDIM(dynamic_percentile=1.5)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_gamma_weights_equal_clipped_snr_times_x0_error(sched, gen, parameterization):
    """Each target's weighted MSE equals min(SNR, gamma) ||x0 - x0_hat||^2 (Hang et al. 2023, Eq. 9)."""
    x0, eps = torch.randn(30, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(30, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.arange(30)
    out = torch.randn(30, 1, 4, 4, generator=gen, dtype=torch.float64)
    loss = SimpleLoss(parameterization=parameterization, min_snr_gamma=5.0)(lambda x, t_: out, x0, t, eps, sched)
    x_t = q_sample(x0, t, eps, sched)
    ab = extract(sched.alpha_bar, t, x0)
    x0_hat, _ = x0_eps_from_output(out, x_t, ab, parameterization)
    want = snr(ab.flatten()).clamp(max=5.0) * (x0 - x0_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-8)
    assert min_snr_weight(torch.tensor([0.5]), 5.0, "eps").item() == pytest.approx(1.0)  # SNR 1 < gamma: unweighted eps
    with pytest.raises(ValueError, match="min_snr_gamma=-1"):
        SimpleLoss(min_snr_gamma=-1)


def test_offset_noise_adds_one_offset_per_image_and_channel(gen):
    eps = torch.zeros(4000, 3, 4, 4)
    out = offset_noise(eps, 0.1, gen)
    assert torch.all(out == out[:, :, :1, :1])  # constant over H, W
    assert out[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
    assert offset_noise(eps, 0.0) is eps


def test_noisy_classifier_shapes_and_mismatched_T_is_refused(tmp_path):
    net = NoisyImageClassifier(image_size=8, in_channels=1, num_classes=10, ch=8)
    assert net(torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 9])).shape == (3, 10)


class RecordingModel:
    """Records the labels and guidance scale of every sample() call; returns grey images."""

    def __init__(self):
        self.calls = []

    def sample(self, sampler, seeds, *, use_ema=True, labels=None, guidance_scale=None):
        self.calls.append((list(seeds), labels, guidance_scale))
        return torch.zeros(len(seeds), 1, 8, 8)


class CountingMetrics:
    """Counts images; FID/IS are functions of w so the sweep's plot has distinct points."""

    class extractor:  # noqa: N801
        name = "counting"
        num_classes = None  # not the data's classifier: no class accuracy

    def reset(self):
        self.n = 0

    def update_fake(self, images, targets=None, prompts=None, prompt_ids=None):
        self.n += images.shape[0]

    def compute(self):
        return {"fid": float(self.n), "is_mean": 1.0 + len(self.__dict__)}


def test_guidance_sweep_labels_nfe_and_fid_vs_is_plot(tmp_path):
    from difflab.metrics.evaluation import evaluate_samplers
    from difflab.metrics.reports import write_results

    model, rows = RecordingModel(), []
    for rank in range(2):  # two shards: labels follow the global sample index, like seeds
        rows = evaluate_samplers(model, {"ddim": DDIM(steps=5)}, CountingMetrics(), T=20, num_samples=7, batch_size=3,
                                 seed=100, rank=rank, world_size=2, guidance_scales=[0.0, 1.0, 3.0], num_classes=3)
    assert [r["sampler"] for r in rows] == ["ddim-5-w0", "ddim-5-w1", "ddim-5-w3"]
    assert [r["nfe"] for r in rows] == [5, 5, 10]  # a guided step evaluates the net twice
    for seeds, labels, _ in model.calls:
        assert labels == [(s - 100) % 3 for s in seeds]
    assert {w for *_, w in model.calls} == {0.0, 1.0, 3.0}
    rows = [dict(r, is_mean=1.0 + r["guidance_scale"]) for r in rows]
    paths = write_results(rows, tmp_path, "metrics")
    assert paths["fid_vs_is"].is_file() and paths["fid_vs_is"].stat().st_size > 1000
    with pytest.raises(ValueError, match="model is unconditional"):
        evaluate_samplers(model, {"ddim": DDIM(steps=5)}, CountingMetrics(), T=20, num_samples=4, batch_size=2,
                          seed=0, guidance_scales=[3.0], num_classes=None)


@pytest.mark.parametrize("make", [
    lambda **k: DPMSolverPP(steps=4, **k), lambda **k: Heun(steps=3, **k), lambda **k: PFODE(rtol=1e-2, atol=1e-2, **k),
    lambda **k: PC(steps=25, corrector="none", **k), lambda **k: ALD(levels=3, n_steps_each=1, **k),
], ids=["dpmpp", "heun", "ode", "pc", "ald"])
def test_dynamic_thresholding_reaches_every_sampler_built_on_the_denoiser(sched, make):
    """The adapter thresholds every x0 it forms: samplers ending on a denoised x0 stay in [-1, 1], PC is tamed."""
    wild = lambda x, t: 40.0 * torch.sin(7.0 * x) + 30.0  # noqa: E731 - a net far outside the data range
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    family = VPSDE() if isinstance(make(), PC) else sched  # PC needs a continuous-time SDE
    free = make(clip_x0=False)(wild, x_T, family, generator=_gens(3))
    thresholded = make(clip_x0=False, dynamic_percentile=0.9)(wild, x_T, family, generator=_gens(3))
    assert not bool((free.abs() <= 1.0 + 1e-5).all())  # unthresholded: out of range (or diverged)
    if isinstance(make(), PC):  # PC ends on the predictor's noise-free mean, not on x0 itself
        assert torch.isfinite(thresholded).all() and thresholded.abs().max() < free.abs().max() / 5
    else:
        assert bool((thresholded.abs() <= 1.0 + 1e-5).all())
    with pytest.raises(ValueError, match="dynamic_percentile=0"):
        make(dynamic_percentile=0)


def test_reverse_diffusion_on_vp_with_too_few_steps_is_refused():
    """beta_max / N >= 1 would make sqrt(1 - beta_i) NaN in the DDPM discretisation (Song et al. 2021, App. E)."""
    with pytest.raises(ValueError, match="steps=4 is too few for predictor='reverse_diffusion' on the vp SDE"):
        PC(steps=4).check_model(VPSDE(), "fixed")
    PC(steps=4, predictor="euler_maruyama").check_model(VPSDE(), "fixed")  # no such limit
    PC(steps=21).check_model(VPSDE(), "fixed")
