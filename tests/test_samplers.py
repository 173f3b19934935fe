"""Samplers against an exact denoiser for Gaussian data, plus determinism and validation."""

import pytest
import torch

from difflab.diffusion.process import target_from_x0_eps
from difflab.diffusion.schedules import NoiseSchedule, extract, linear_betas
from difflab.samplers import DDIM, DDPM, ddim_sample, ddim_timesteps, ddpm_sample

MU, S = 0.3, 0.5  # data: x0 ~ N(MU, S^2) in every dimension (image-like spread)
N = 20_000


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_betas(linear_betas(1000))


def exact_model(sched, parameterization="eps"):
    """The Bayes-optimal network output for Gaussian data (closed-form E[x0|x_t])."""

    def model_fn(x_t, t):
        ab = extract(sched.alpha_bar, t, x_t)
        a, b2 = ab.sqrt(), 1 - ab
        x0 = MU + a * S**2 / (ab * S**2 + b2) * (x_t - a * MU)
        eps = (x_t - a * x0) / b2.sqrt()
        return target_from_x0_eps(x0, eps, ab, parameterization)

    return model_fn


def check_moments(x, n_sigma=5.0):
    check_mean(x, n_sigma)
    assert abs(x.var().item() / S**2 - 1) < n_sigma * (2 / x.numel()) ** 0.5, x.var().item()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_1000_reproduces_gaussian_moments(sched, variance):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 1, generator=g)
    x = ddpm_sample(exact_model(sched), x_T, sched, variance=variance, clip_x0=False, generator=g)
    check_moments(x)


def ddim_var_error(sched, steps, param="eps", spacing="linspace"):
    x_T = torch.randn(N, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = ddim_sample(exact_model(sched, param), x_T, sched, steps=steps, spacing=spacing,
                    parameterization=param, clip_x0=False)
    check_mean(x)
    return abs(x.var().item() / S**2 - 1)


def check_mean(x, n_sigma=5.0):
    assert abs(x.mean().item() - MU) < n_sigma * S / x.numel() ** 0.5, x.mean().item()


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_50_reproduces_gaussian_moments(sched, param, spacing):
    # DDIM is Euler on the probability-flow ODE in sigma = sqrt((1-ab)/ab) (Song et al. 2021, Eq. 14).
    # Its discretisation bias on the variance is larger than the sampling error at 50 steps: measured
    # 49% / 13% / 5.4% at 10 / 50 / 200 steps for data std 0.5 (linear schedule). The mean is exact.
    assert ddim_var_error(sched, 50, param, spacing) < 0.16


def test_ddim_error_falls_with_steps_and_vanishes_at_T(sched):
    errors = [ddim_var_error(sched, s) for s in (10, 50, 200, 1000)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[3] < 5 * (2 / N) ** 0.5, errors  # within sampling error at S = T


def test_ddim_eta1_full_steps_equals_ddpm_fixed_small(sched):
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    a = ddpm_sample(exact_model(sched), x_T, sched, clip_x0=False, generator=torch.Generator().manual_seed(4))
    b = ddim_sample(exact_model(sched), x_T, sched, steps=1000, eta=1.0, clip_x0=False,
                    generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta0_is_deterministic_given_x_T(sched):
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    a = ddim_sample(exact_model(sched), x_T, sched, steps=20, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(exact_model(sched), x_T, sched, steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", [DDPM(), DDPM(variance="fixed_large"), DDIM(steps=10, eta=0.5)])
def test_shapes_dtypes_and_determinism(sched, sampler):
    small = NoiseSchedule.from_betas(linear_betas(50))
    x_T = torch.randn(4, 1, 8, 8)
    run = lambda seed: sampler(exact_model(small), x_T, small, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == x_T.shape and a.dtype == x_T.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_x0_keeps_estimates_in_range():
    small = NoiseSchedule.from_betas(linear_betas(50))
    seen = []
    DDIM(steps=10, clip_x0=True)(lambda x, t: torch.zeros_like(x) + 5.0, torch.randn(4, 2), small,
                                 callback=lambda d: seen.append(d["x0"].abs().max().item()))
    assert len(seen) == 10 and max(seen) <= 1.0


def test_callback_sees_every_step(sched):
    steps = []
    DDIM(steps=7)(exact_model(sched), torch.randn(2, 2), sched, callback=lambda d: steps.append(d["t"]))
    assert steps == ddim_timesteps(1000, 7)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "quadratic"])
@pytest.mark.parametrize("S", [1, 10, 50, 999, 1000])
def test_timesteps_distinct_descending_in_range(spacing, S):
    ts = ddim_timesteps(1000, S, spacing)
    assert len(ts) == S and all(a > b for a, b in zip(ts, ts[1:]))
    assert 0 <= min(ts) and max(ts) <= 999


def test_known_spacings():
    assert ddim_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 10, "trailing") == list(range(999, 0, -100))
    assert ddim_timesteps(1000, 10, "linspace")[0] == 999 and ddim_timesteps(1000, 10, "linspace")[-1] == 0
    assert ddim_timesteps(1000, 1000, "linspace") == list(range(999, -1, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps=0"),
        ({"eta": 1.5}, "eta=1.5"),
        ({"eta": -0.1}, "eta=-0.1"),
        ({"spacing": "cubic"}, "spacing='cubic'.*linspace"),
    ],
)
def test_bad_ddim_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDIM(**kwargs)


def test_ddim_more_steps_than_T_is_refused():
    with pytest.raises(ValueError, match="steps=2000.*T=1000"):
        DDIM(steps=2000).validate(1000)
    with pytest.raises(ValueError, match="steps=11"):
        ddim_sample(lambda x, t: x, torch.zeros(1, 1), NoiseSchedule.from_betas(linear_betas(10, reference_T=None)), steps=11)


def test_bad_ddpm_variance_is_refused():
    with pytest.raises(ValueError, match="variance='learnt'.*fixed_small"):
        DDPM(variance="learnt")


def test_names_and_nfe():
    assert DDPM().name == "ddpm" and DDPM().nfe(1000) == 1000
    assert DDIM(steps=50).name == "ddim-50" and DDIM(steps=50).nfe(1000) == 50
