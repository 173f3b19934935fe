import pytest
import torch

from difflab.diffusion.process import (
    check_parameterization,
    eps_from_x0,
    fixed_log_variance,
    posterior_mean,
    posterior_mean_from_eps,
    q_sample,
    randn_like,
    target_from_x0_eps,
    x0_eps_from_output,
    x0_from_eps,
)
from difflab.diffusion.schedules import NoiseSchedule, cosine_betas, extract, linear_betas


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_betas(linear_betas(1000))


def test_q_sample_marginal_moments_by_monte_carlo(sched, gen):
    n, x0_val = 200_000, 0.7
    for t_idx in (0, 100, 500, 999):
        x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
        t = torch.full((n,), t_idx)
        x_t = q_sample(x0, t, torch.randn(n, 1, generator=gen, dtype=torch.float64), sched)
        ab = sched.alpha_bar[t_idx].item()
        se = (1 - ab) ** 0.5 / n**0.5
        assert abs(x_t.mean().item() - ab**0.5 * x0_val) < 5 * se
        assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)


def test_posterior_mean_x0_form_equals_eps_form(sched, gen):
    x0 = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=gen)
    x_t = q_sample(x0, t, eps, sched)
    assert torch.allclose(posterior_mean(x0, x_t, t, sched), posterior_mean_from_eps(eps, x_t, t, sched), atol=1e-9)


def test_posterior_mean_matches_bayes_rule_closed_form(sched):
    # q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1})
    t_idx, x0, x_t = 300, torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[-0.2]], dtype=torch.float64)
    a, b, abp = sched.alphas[t_idx], sched.betas[t_idx], sched.alpha_bar_prev[t_idx]
    prec = a / b + 1 / (1 - abp)
    mean = (a.sqrt() * x_t / b + abp.sqrt() * x0 / (1 - abp)) / prec
    t = torch.tensor([t_idx])
    assert torch.allclose(posterior_mean(x0, x_t, t, sched), mean)
    assert sched.posterior_variance[t_idx].item() == pytest.approx((1 / prec).item())


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_parameterizations_round_trip(sched, gen, param):
    x0 = torch.randn(32, 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(32, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (32,), generator=gen)
    ab = extract(sched.alpha_bar, t, x0)
    x_t = q_sample(x0, t, eps, sched)
    out = target_from_x0_eps(x0, eps, ab, param)  # a perfect network's output
    x0_hat, eps_hat = x0_eps_from_output(out, x_t, ab, param)
    assert torch.allclose(x0_hat, x0, atol=1e-6 if param == "eps" else 1e-9)
    assert torch.allclose(eps_hat, eps, atol=1e-9)


def test_v_definition(sched):
    ab = torch.tensor(0.36, dtype=torch.float64)
    v = target_from_x0_eps(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), ab, "v")
    assert v.item() == pytest.approx(0.6 * 2 - 0.8 * 1)


def test_x0_eps_inverse_pair(gen):
    x_t, eps = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    ab = torch.tensor(0.3)
    assert torch.allclose(eps_from_x0(x_t, x0_from_eps(x_t, eps, ab), ab), eps, atol=1e-5)


def test_unknown_parameterization_names_allowed():
    with pytest.raises(ValueError, match=r"'score'.*eps.*x0.*v"):
        check_parameterization("score")


def test_fixed_log_variances(sched):
    small, large = fixed_log_variance(sched, "fixed_small"), fixed_log_variance(sched, "fixed_large")
    assert torch.allclose(large[1:], sched.betas[1:].log())
    assert (small[1:] <= large[1:] + 1e-12).all()
    with pytest.raises(ValueError, match="learned"):
        fixed_log_variance(sched, "learned")


def test_per_sample_generators_are_batch_independent():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    full = randn_like(torch.empty(3, 2, 2), gens())
    single = randn_like(torch.empty(1, 2, 2), [torch.Generator().manual_seed(6)])
    assert torch.equal(full[1:2], single)
    with pytest.raises(ValueError, match="one per sample"):
        randn_like(torch.empty(2, 1), gens())


def test_cosine_table_is_float64():
    assert NoiseSchedule.from_betas(cosine_betas(10)).alpha_bar.dtype == torch.float64
