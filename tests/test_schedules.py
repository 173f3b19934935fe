import math

import pytest
import torch

from difflab.diffusion.schedules import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    quadratic_betas,
    sigmoid_betas,
)

ALL = [linear_betas, quadratic_betas, cosine_betas, sigmoid_betas]


def test_linear_T1000_alpha_bar_end_closed_form():
    s = NoiseSchedule.from_betas(linear_betas(1000))
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # independent computation in plain Python
    prod = 1.0
    for i in range(1000):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert s.alpha_bar[-1].item() == pytest.approx(prod, rel=1e-10)


def test_quadratic_is_linear_in_sqrt_beta():
    b = quadratic_betas(100, 1e-4, 0.02, reference_T=None).sqrt()
    assert torch.allclose(b[1:] - b[:-1], (b[1] - b[0]).expand(99), atol=1e-12)
    assert b[0] ** 2 == pytest.approx(1e-4) and b[-1] ** 2 == pytest.approx(0.02)


def test_cosine_reproduces_alpha_bar_formula():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.from_betas(cosine_betas(T, s_))
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 500, 900):  # below the 0.999 clip
        assert s.alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999 + 1e-12


def test_sigmoid_alpha_bar_monotone_and_ends():
    s = NoiseSchedule.from_betas(sigmoid_betas(500))
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert s.alpha_bar[0] > 0.99 and s.alpha_bar[-1] < 1e-3


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("T", [1, 10, 50, 1000, 4000])
def test_any_T(fn, T):
    kwargs = {"reference_T": None} if fn in (linear_betas, quadratic_betas) and T < 50 else {}
    s = NoiseSchedule.from_betas(fn(T, **kwargs))
    assert s.T == T and s.betas.dtype == torch.float64
    assert ((s.betas > 0) & (s.betas < 1)).all()


@pytest.mark.parametrize("fn", [linear_betas, quadratic_betas])
@pytest.mark.parametrize("T", [50, 250, 4000])
def test_scaled_betas_end_near_noise_for_any_T(fn, T):
    ab_T = NoiseSchedule.from_betas(fn(T)).alpha_bar[-1].item()
    ab_ref = NoiseSchedule.from_betas(fn(1000)).alpha_bar[-1].item()
    assert abs(ab_T**0.5 - ab_ref**0.5) < 0.02  # the signal left at t = T barely depends on T
    assert fn(T)[0].item() == pytest.approx(1e-4 * 1000 / T)


def test_unscaled_betas_keep_endpoints():
    b = linear_betas(50, reference_T=None)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


def test_too_small_T_for_scaled_betas_is_refused():
    with pytest.raises(ValueError, match="reference_T=null"):
        linear_betas(10)


def test_posterior_table_closed_forms():
    s = NoiseSchedule.from_betas(linear_betas(50))
    ab, abp, b = s.alpha_bar, s.alpha_bar_prev, s.betas
    assert abp[0] == 1 and torch.allclose(abp[1:], ab[:-1])
    assert torch.allclose(s.posterior_variance, (1 - abp) / (1 - ab) * b)
    assert s.posterior_variance[0] == 0
    assert torch.allclose(s.posterior_log_variance_clipped[0], s.posterior_variance[1].log())
    assert torch.allclose(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())
    # coefficients of the x0 form sum to the eps form when x0 is expressed through eps
    assert torch.allclose(s.posterior_mean_coef_x0 / ab.sqrt() + s.posterior_mean_coef_xt, s.posterior_mean_eps_coef_xt)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_T_is_refused(bad):
    with pytest.raises(ValueError, match="T="):
        linear_betas(bad)


def test_bad_beta_range_is_refused():
    with pytest.raises(ValueError, match="beta_start=0.1, beta_end=0.01"):
        linear_betas(1000, beta_start=0.1, beta_end=0.01)


def test_schedule_to_device_is_cached_identity_on_same_device():
    s = NoiseSchedule.from_betas(linear_betas(100))
    assert s.to("cpu") is s
