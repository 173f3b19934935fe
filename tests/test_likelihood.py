"""The DDPM variational bound in bits/dim: closed forms, normalization, exact models, parameterizations."""

import math
import re

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from difflab.diffusion.likelihood import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    vlb_terms_bpd,
)
from difflab.diffusion.process import (
    eps_from_x0,
    fixed_log_variance,
    target_from_x0_eps,
)
from difflab.diffusion.schedules import NoiseSchedule, extract, linear_betas

torch.set_num_threads(1)

T = 100
SHAPE = (2, 3, 4, 4)
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_betas(linear_betas(T))  # betas scaled by 1000 / T


def grid_x0(gen: torch.Generator, shape=SHAPE) -> torch.Tensor:
    """Random 8-bit images in [-1, 1], float64."""
    return torch.randint(0, 256, shape, generator=gen).double() / 127.5 - 1.0


def model_from_x0_guess(x0_guess, sched: NoiseSchedule, parameterization: str):
    """model_fn(x_t, t) that outputs eps, x0 or v consistent with the denoiser x0_guess(x_t, t)."""

    def model_fn(x_t, t):
        ab = extract(sched.alpha_bar, t, x_t)
        x0 = x0_guess(x_t, t)
        return target_from_x0_eps(x0, eps_from_x0(x_t, x0, ab), ab, parameterization)

    return model_fn


# normal_kl ------------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions(gen):
    m1, m2 = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    lv1, lv2 = 2 * torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-12)


def test_normal_kl_of_identical_gaussians_is_zero_and_broadcasts(gen):
    m = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    lv = torch.randn(3, 1, 1, 1, generator=gen, dtype=torch.float64)
    kl = normal_kl(m, lv, m, lv)
    assert kl.shape == m.shape and kl.abs().max() < 1e-15


# discretized decoder --------------------------------------------------------------------------

BINS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # every 8-bit value


@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.2, 0.0, 0.77, 1.0])
@pytest.mark.parametrize("scale", [1e-3, 1e-2, 0.3, 2.0])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, scale):
    logp = discretized_gaussian_log_likelihood(
        BINS, mean=torch.tensor(mean, dtype=torch.float64), log_scale=torch.tensor(math.log(scale), dtype=torch.float64)
    )
    assert logp.shape == (256,) and bool((logp <= 0).all()) and bool(torch.isfinite(logp).all())
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("scale", [5e-3, 0.1, 1.0])
def test_discretized_likelihood_is_a_cdf_difference(gen, scale):
    x0 = grid_x0(gen, (4, 3, 8, 8))
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # make sure both edge bins appear
    mean = x0 + 0.05 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    dist = Normal(mean, scale)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), dist.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), dist.cdf(x0 - 1 / 255))
    logp = discretized_gaussian_log_likelihood(x0, mean=mean, log_scale=torch.full_like(x0, math.log(scale)))
    assert torch.allclose(logp.exp(), upper - lower, atol=1e-12)


def test_discretized_likelihood_is_finite_far_in_the_tails_with_finite_gradients():
    # naive CDF differences underflow to 0 here (log = -inf); the log-space form does not
    mid = 128 / 127.5 - 1  # 0 itself is not an 8-bit value: the bins are centred on k / 127.5 - 1
    x0 = torch.tensor([-1.0, -1.0, mid, mid, 1.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([1.0, -1.0, 0.9, -0.9, -1.0, 1.0], dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((6,), math.log(1e-2), dtype=torch.float64, requires_grad=True)
    logp = discretized_gaussian_log_likelihood(x0, mean=mean, log_scale=log_scale)
    assert bool(torch.isfinite(logp).all())
    # the edge bin x0 = -1 with mean 1: log Phi((-1 + 1/255 - 1) / 0.01)
    assert logp[0].item() == pytest.approx(torch.special.log_ndtr(torch.tensor((-2 + 1 / 255) / 1e-2, dtype=torch.float64)).item(), rel=1e-12)
    logp.sum().backward()
    assert bool(torch.isfinite(mean.grad).all()) and bool(torch.isfinite(log_scale.grad).all())


@pytest.mark.parametrize("bad", [1.5, -1.01, 0.0, 0.25])
def test_discretized_likelihood_rejects_data_off_the_8bit_grid(bad):
    x0 = torch.tensor([-1.0, bad], dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        discretized_gaussian_log_likelihood(x0, mean=torch.zeros(2), log_scale=torch.zeros(2))


# prior ----------------------------------------------------------------------------------------


def test_prior_bpd_closed_form_and_tiny_for_linear_T1000(gen):
    sched = NoiseSchedule.from_betas(linear_betas(1000))
    x0 = grid_x0(gen)
    ab = sched.alpha_bar[-1]
    expected = kl_divergence(Normal(ab.sqrt() * x0, (1 - ab).sqrt()), Normal(0.0, 1.0)).flatten(1).mean(1) / LN2
    got = prior_bpd(x0, sched)
    assert got.shape == (2,) and torch.allclose(got, expected, rtol=1e-9, atol=0)
    assert bool((got > 0).all()) and got.max().item() < 1e-4  # ~ alpha_bar_T E[x0^2] / (2 ln 2) ~ 1e-5
    assert prior_bpd(torch.ones(1, 1, 1, 1, dtype=torch.float64), sched).item() == pytest.approx(
        0.5 * (-math.log1p(-ab.item()) - ab.item() + ab.item()) / LN2, rel=1e-9
    )


# exact and wrong models on point-mass data ----------------------------------------------------


def point_mass(value: float) -> torch.Tensor:
    return torch.full(SHAPE, value, dtype=torch.float64)


@pytest.mark.parametrize("value", [-1.0, 10 / 127.5 - 1, 1.0])
def test_exact_model_has_zero_kl_terms_and_closed_form_decoder(sched, value):
    x0 = point_mass(value)
    out = bits_per_dim(
        model_from_x0_guess(lambda x_t, t: x0, sched, "eps"), x0, sched,
        parameterization="eps", log_variance=fixed_log_variance(sched, "fixed_small"),
        generator=torch.Generator().manual_seed(1),
    )
    assert out["vb"].shape == (2, T) and out["mse"].shape == (2, T) and out["x0_mse"].shape == (2, T)
    assert out["vb"][:, 1:].abs().max().item() < 1e-9  # p(x_{t-1}|x_t) = q(x_{t-1}|x_t,x0) for t >= 2
    assert out["mse"].max().item() < 1e-12 and out["x0_mse"].max().item() < 1e-12
    # decoder: N(x0, beta_tilde_2) (clipped log variance at t = 1) over x0's bin
    z = (1 / 255) / sched.posterior_variance[1].sqrt().item()
    p = 0.5 * (1 + math.erf(z / math.sqrt(2)))  # Phi(z); an edge bin has mass Phi(z), an interior one 2 Phi(z) - 1
    decoder = -math.log(p if abs(value) == 1.0 else 2 * p - 1) / LN2
    assert torch.allclose(out["vb"][:, 0], torch.full((2,), decoder, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(out["prior_bpd"], prior_bpd(x0, sched))
    assert torch.allclose(out["total_bpd"], out["prior_bpd"] + decoder, rtol=1e-9)


def test_exact_model_with_fixed_large_variance_has_closed_form_kl(sched):
    x0 = point_mass(150 / 127.5 - 1)
    vb = bits_per_dim(
        model_from_x0_guess(lambda x_t, t: x0, sched, "x0"), x0, sched,
        parameterization="x0", log_variance=fixed_log_variance(sched, "fixed_large"),
        generator=torch.Generator().manual_seed(2),
    )["vb"]
    ratio = sched.posterior_variance[1:] / sched.betas[1:]  # beta_tilde_t / beta_t, t >= 2
    expected = 0.5 * (ratio - 1 - ratio.log()) / LN2  # KL(N(m, beta_tilde) || N(m, beta))
    assert torch.allclose(vb[:, 1:], expected.expand(2, -1), rtol=1e-9, atol=1e-13)


def test_wrong_model_raises_every_term_and_the_bound(sched):
    x0 = point_mass(200 / 127.5 - 1)
    log_var = fixed_log_variance(sched, "fixed_small")
    results = [
        bits_per_dim(
            model_from_x0_guess(guess, sched, "eps"), x0, sched, parameterization="eps",
            log_variance=log_var, generator=torch.Generator().manual_seed(3),
        )
        for guess in (lambda x_t, t: x0, lambda x_t, t: 0.9 * x0)
    ]
    exact, wrong = results
    assert bool((wrong["vb"] > exact["vb"]).all())
    assert bool((wrong["total_bpd"] > exact["total_bpd"] + 1e-3).all())
    assert torch.equal(wrong["prior_bpd"], exact["prior_bpd"])


# sanity on random data ------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
def test_zero_output_model_gives_a_finite_nonnegative_bound(sched, gen, parameterization):
    x0 = grid_x0(gen).float()
    out = bits_per_dim(
        lambda x_t, t: torch.zeros_like(x_t), x0, sched, parameterization=parameterization,
        log_variance=fixed_log_variance(sched, "fixed_large"), generator=torch.Generator().manual_seed(4),
    )
    assert out["total_bpd"].shape == (2,) and out["total_bpd"].dtype == torch.float32
    assert bool(torch.isfinite(out["vb"]).all()) and bool((out["vb"] >= 0).all())
    assert torch.allclose(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))
    assert bool((out["total_bpd"] > 0).all())


# parameterizations, noise, batching, learned variance -----------------------------------------


def wrong_guess(x_t, t):
    return 0.1 * torch.tanh(x_t) + 0.3 * (t.double() / T).reshape(-1, 1, 1, 1)


def test_eps_x0_and_v_parameterizations_give_the_same_bound(sched, gen):
    x0 = grid_x0(gen)
    totals = {}
    for param in ("eps", "x0", "v"):
        for name, guess in (("exact", lambda x_t, t: x0), ("wrong", wrong_guess)):
            totals[param, name] = bits_per_dim(
                model_from_x0_guess(guess, sched, param), x0, sched, parameterization=param,
                log_variance=fixed_log_variance(sched, "fixed_small"), generator=torch.Generator().manual_seed(5),
            )["vb"]
    for name in ("exact", "wrong"):
        for param in ("x0", "v"):
            assert torch.allclose(totals[param, name], totals["eps", name], rtol=1e-6, atol=1e-8)


def test_vlb_terms_match_the_loop_and_mix_timesteps(sched, gen):
    x0 = grid_x0(gen)
    model, log_var = model_from_x0_guess(wrong_guess, sched, "v"), fixed_log_variance(sched, "fixed_small")
    g = torch.Generator().manual_seed(6)
    vb = bits_per_dim(model, x0, sched, parameterization="v", log_variance=log_var, generator=g.manual_seed(6))["vb"]
    g.manual_seed(6)
    eps = {i: torch.randn(SHAPE, generator=g, dtype=torch.float64) for i in reversed(range(T))}
    for i in (T - 1, 37, 1, 0):
        t = torch.full((2,), i)
        got = vlb_terms_bpd(model, x0, t, sched, eps=eps[i], parameterization="v", log_variance=log_var)
        assert torch.allclose(got, vb[:, i], rtol=1e-12)
    mixed = vlb_terms_bpd(model, x0, torch.tensor([0, 37]), sched, eps=torch.stack([eps[0][0], eps[37][1]]),
                          parameterization="v", log_variance=log_var)
    assert torch.allclose(mixed, torch.stack([vb[0, 0], vb[1, 37]]), rtol=1e-12)


def test_per_sample_generators_make_the_bound_batch_size_independent(sched, gen):
    x0 = grid_x0(gen)
    model, log_var = model_from_x0_guess(wrong_guess, sched, "eps"), fixed_log_variance(sched, "fixed_small")

    def run(xs, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return bits_per_dim(model, xs, sched, log_variance=log_var, generator=gens)["total_bpd"]

    both = run(x0, [10, 11])
    assert torch.allclose(both[1:], run(x0[1:], [11]), rtol=1e-12)


def test_a_variance_head_plugs_in_for_learned_variance(sched, gen):
    """A network with 2C output channels (Nichol & Dhariwal 2021, Sec. 3.1) through a VarianceHead."""
    x0, C = grid_x0(gen), SHAPE[1]
    table = fixed_log_variance(sched, "fixed_small")
    mean_model = model_from_x0_guess(wrong_guess, sched, "eps")
    v_param = torch.zeros(SHAPE, dtype=torch.float64, requires_grad=True)

    def net(x_t, t):  # (B, 2C, H, W): eps prediction, then an unconstrained variance output
        return torch.cat([mean_model(x_t, t), v_param.expand_as(x_t)], dim=1)

    def head_fixed(output, t):
        return output[:, :C], extract(table, t, output) + 0 * output[:, C:]

    def head_learned(output, t):  # log-variance interpolation between log beta_tilde and log beta
        frac = (output[:, C:] + 1) / 2
        return output[:, :C], frac * extract(sched.betas.log(), t, output) + (1 - frac) * extract(table, t, output)

    t, eps = torch.tensor([0, 50]), torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    kw = dict(eps=eps, parameterization="eps")
    from_table = vlb_terms_bpd(mean_model, x0, t, sched, log_variance=table, **kw)
    assert torch.allclose(vlb_terms_bpd(net, x0, t, sched, log_variance=head_fixed, **kw), from_table, rtol=1e-12)
    learned = vlb_terms_bpd(net, x0, t, sched, log_variance=head_learned, **kw)
    learned.sum().backward()
    assert bool(torch.isfinite(learned).all()) and bool(torch.isfinite(v_param.grad).all())
    assert v_param.grad.abs().sum() > 0


def test_bad_arguments_name_the_bad_value(sched, gen):
    x0, eps = grid_x0(gen), torch.zeros(SHAPE, dtype=torch.float64)
    model, log_var = model_from_x0_guess(wrong_guess, sched, "eps"), fixed_log_variance(sched, "fixed_small")
    with pytest.raises(ValueError, match=r"\(7,\)"):
        vlb_terms_bpd(model, x0, torch.tensor([0, 1]), sched, eps=eps, log_variance=log_var[:7])
    with pytest.raises(ValueError, match="100"):
        vlb_terms_bpd(model, x0, torch.tensor([0, 100]), sched, eps=eps, log_variance=log_var)
    with pytest.raises(ValueError, match="float"):
        vlb_terms_bpd(model, x0, torch.tensor([0.0, 1.0]), sched, eps=eps, log_variance=log_var)
    with pytest.raises(ValueError, match="'score'"):
        bits_per_dim(model, x0, sched, parameterization="score", log_variance=log_var)
    with pytest.raises(ValueError, match="eps has shape"):
        vlb_terms_bpd(model, x0, torch.tensor([0, 1]), sched, eps=eps[:1], log_variance=log_var)
