"""Score SDEs, the denoiser adapter and every continuous sampler against closed forms (Gaussian, mixtures)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.ode_solver import integrate, pf_ode_velocity
from difflab.diffusion.ode_likelihood import dequantized_bits_per_dim, pf_ode_log_likelihood
from difflab.diffusion.process import x0_from_eps
from difflab.diffusion.schedules import NoiseSchedule, linear_betas
from difflab.diffusion.score_objectives import DenoisingScoreMatching, sample_times
from difflab.diffusion.sde import DiscreteVP, SubVPSDE, VESDE, VPSDE, karras_sigmas
from difflab.samplers import ALD, DDIM, PC, PFODE, DPMSolverPP, Heun, annealed_langevin_sample
from difflab.samplers.families import check_sampler_fits
from difflab.samplers.solvers import dpmpp_2m_sample, edm_heun_sample
from difflab.samplers.specs import parse_spec
from score_closed_form import Mixture, edm_model, eps_model, gaussian

torch.set_num_threads(1)
DDPM_FAMILY = DiscreteVP(NoiseSchedule.from_betas(linear_betas(1000)))
FAMILIES = {"ddpm": DDPM_FAMILY, "vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0),
            "ncsn": VESDE(sigma_min=0.01, sigma_max=20.0, levels=10)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sigma_hat_round_trips_through_time(name):
    fam = FAMILIES[name]
    t = torch.linspace(fam.t_min, fam.t_max, 11, dtype=torch.float64)
    assert torch.allclose(fam.t_of_sigma_hat(fam.sigma_hat(t)), t, atol=1e-9)
    assert torch.allclose(fam.sigma_hat(t), fam.sigma(t) / fam.alpha(t))


def test_discrete_family_is_the_ddpm_table():
    sched = NoiseSchedule.from_betas(linear_betas(1000))
    t = torch.tensor([0, 1, 500, 999])
    ab = sched.alpha_bar[t]
    assert torch.allclose(DDPM_FAMILY.alpha(t.double()), ab.sqrt())
    assert torch.allclose(DDPM_FAMILY.sigma(t.double()), (1 - ab).sqrt())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_every_prediction_gives_back_x0(prediction):
    fam, g = VPSDE(), gen(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.6, 0.99], dtype=torch.float64)
    a, s = fam.alpha(t)[:, None], fam.sigma(t)[:, None]
    x_t = a * x0 + s * eps
    truth = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}[prediction]
    den = Denoiser(lambda x, c: truth, fam, prediction)
    assert torch.allclose(den.x0_at_t(x_t, t), x0, atol=1e-10)
    assert torch.allclose(den.score_t(x_t, t), -eps / s, atol=1e-8)
    assert torch.allclose(den(x_t / a, s / a), x0, atol=1e-10)  # D(x_hat; sigma_hat)


def test_denoiser_on_ddpm_model_equals_the_ddpm_formula():
    sched = NoiseSchedule.from_betas(linear_betas(1000))
    net = lambda x, t: torch.sin(x) * (1 + t[:, None] / 1000)  # any eps model  # noqa: E731
    x_t, t = torch.randn(3, 5, generator=gen(1), dtype=torch.float64), torch.tensor([3, 400, 999])
    ours = Denoiser(net, sched, "eps").x0_at_t(x_t, t.double())
    ref = x0_from_eps(x_t, net(x_t, t.double()), sched.alpha_bar[t][:, None])
    assert torch.allclose(ours, ref, atol=1e-10)


def test_v_prediction_refused_on_non_variance_preserving_family():
    with pytest.raises(ValueError, match="variance-preserving"):
        Denoiser(lambda x, c: x, VESDE(), "v")


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_forward_sde_marginals_match_perturbation_kernels(name):
    """Euler-Maruyama on dx = f dt + g dw from x0 = 1.5 matches N(alpha x0, sigma^2) at t = 0.5 and 1."""
    fam, n, steps = FAMILIES[name], 10000, 500
    g = gen(2)
    x = torch.full((n, 1), 1.5, dtype=torch.float64)
    if name == "ve":  # Song et al.'s VE marginal std is sigma(t): p_0 = data * N(0, sigma_min^2)
        x = x + fam.sigma_min * torch.randn(n, 1, generator=g, dtype=torch.float64)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.tensor(i * dt, dtype=torch.float64)
        f, gt = fam.drift_diffusion(x, t)
        x = x + f * dt + gt * math.sqrt(dt) * torch.randn(n, 1, generator=g, dtype=torch.float64)
        if i + 1 in (steps // 2, steps):
            tt = torch.tensor((i + 1) * dt, dtype=torch.float64)
            mean, std = float(fam.alpha(tt)) * 1.5, float(fam.sigma(tt))
            assert abs(x.mean().item() - mean) < 4 * std / math.sqrt(n) + 2e-3 * max(1, mean)
            assert abs(x.std().item() / std - 1) < 0.025


def _sample(sampler, fam, mix, n=1500, seed=0):
    x_T = torch.randn(n, mix.dim, generator=gen(seed), dtype=torch.float64)
    return sampler(eps_model(mix, fam), x_T, fam, parameterization="eps", generator=gen(seed + 1))


@pytest.mark.parametrize("sampler, family", [
    (Heun(steps=40, clip_x0=False), "ddpm"), (Heun(steps=40, clip_x0=False, s_churn=10.0), "vp"),
    (DPMSolverPP(steps=40, clip_x0=False), "ddpm"), (DPMSolverPP(steps=40, clip_x0=False, spacing="logsnr"), "subvp"),
    (PFODE(rtol=1e-4, atol=1e-4), "ve"), (PC(steps=300, snr_norm="batch"), "vp"),
    (PC(steps=300, predictor="ancestral", snr_norm="batch"), "ve"), (PC(steps=300, predictor="euler_maruyama", corrector="none"), "subvp"),
], ids=lambda v: getattr(v, "name", v))
def test_every_sampler_reproduces_gaussian_moments(sampler, family):
    mix = gaussian(0.3, 0.5, dim=2)
    x = _sample(sampler, FAMILIES[family], mix)
    assert (x.mean(0) - 0.3).abs().max() < 0.04, x.mean(0)
    assert (x.std(0) / 0.5 - 1).abs().max() < 0.06, x.std(0)


@pytest.mark.parametrize("solver", ["heun", "dpmpp", "ald"])
def test_moment_error_falls_as_steps_grow(solver):
    """Deterministic solvers: more steps; ALD (on NCSN levels 20 -> 0.01): more Langevin steps per level."""
    mix, fam = gaussian(0.3, 0.5, dim=2), FAMILIES["ncsn" if solver == "ald" else "vp"]
    errors = []
    for steps in (5, 25, 125):
        s = {"heun": Heun(steps=steps, clip_x0=False), "dpmpp": DPMSolverPP(steps=steps, clip_x0=False),
             "ald": ALD(n_steps_each=steps, step_lr=1e-4)}[solver]
        x = _sample(s, fam, mix, n=1000)
        assert (x.mean(0) - 0.3).abs().max() < 0.06
        errors.append(float((x.std(0) / 0.5 - 1).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_fast_solvers_converge_to_the_adaptive_ode_solution():
    """On a (non-Gaussian) 2D mixture, Heun and DPM-Solver++ approach RK45's solution as steps grow."""
    mix = Mixture([0.3, 0.7], [[-1.0, 0.5], [0.8, -0.4]], [0.3, 0.2])
    den = Denoiser(edm_model(mix), VESDE(sigma_min=0.01, sigma_max=40.0), "denoiser")
    x = torch.randn(200, 2, generator=gen(3), dtype=torch.float64) * 40.0
    ref, nfe = integrate(lambda y, u: pf_ode_velocity(den, y, u), x, math.log(40.0), math.log(0.01), rtol=1e-9, atol=1e-9)
    ref = den(ref, 0.01)
    assert nfe > 50
    for solver in (lambda s: edm_heun_sample(den, x, s), lambda s: dpmpp_2m_sample(den, x, s)):
        errs = [float((solver(karras_sigmas(n, 0.01, 40.0)) - ref).abs().max()) for n in (8, 16, 32, 64)]
        assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 0.02, errs


@pytest.mark.parametrize("family, data", [("ve", "gaussian"), ("ddpm", "gaussian"), ("ve", "mixture")])
def test_pf_ode_log_likelihood_is_exact(family, data):
    """With the exact score the PF-ODE log-likelihood is the closed form (zero-mean data: the N(0, prior) prior
    then differs from the true marginal only by O(var / sigma_max^2))."""
    fam = VESDE(sigma_max=80.0) if family == "ve" else FAMILIES[family]
    mix = gaussian(0.0, 0.5, dim=3) if data == "gaussian" else Mixture([0.5, 0.5], [[0.6, -0.3, 0.1], [-0.6, 0.3, -0.1]], [0.3, 0.4])
    x = mix.sample(4, gen(4))
    den = Denoiser(eps_model(mix, fam), fam, "eps")
    logp, _ = pf_ode_log_likelihood(den, x, sigma_min=fam.sigma_hat_min, sigma_max=fam.sigma_hat_max,
                                    prior_std=fam.x_hat_prior_std, divergence_kind="exact", rtol=1e-7, atol=1e-7)
    exact = mix.log_prob(x, fam.sigma_hat_min)
    assert torch.allclose(logp, exact, atol=2e-3), (logp, exact)


def test_hutchinson_estimate_is_unbiased():
    """Gaussian and Rademacher probes on a mixture (non-diagonal Jacobian): the mean over probes is the exact value."""
    mix, fam = Mixture([0.5, 0.5], [[0.6, -0.3], [-0.6, 0.3]], [0.3, 0.4]), VESDE(sigma_max=80.0)
    x = mix.sample(1, gen(5)).expand(200, 2).clone()
    den = Denoiser(edm_model(mix), fam, "denoiser")
    kw = dict(sigma_min=fam.sigma_hat_min, sigma_max=fam.sigma_hat_max, prior_std=fam.x_hat_prior_std, rtol=1e-5, atol=1e-5)
    exact, _ = pf_ode_log_likelihood(den, x[:1], divergence_kind="exact", **kw)
    for kind in ("hutchinson_gaussian", "hutchinson_rademacher"):
        logp, _ = pf_ode_log_likelihood(den, x, divergence_kind=kind, generator=[gen(100 + i) for i in range(200)], **kw)
        assert logp.std() > 1e-3  # the estimate is random, so this test could fail if it were biased
        assert abs(float(logp.mean() - exact)) < 4 * float(logp.std()) / math.sqrt(200) + 1e-3


def test_dequantised_bits_per_dim_offset():
    """The uniform density on [-1, 1]^D (log p = -D ln 2) is 8 bits/dim on 8-bit images."""
    D = 12
    assert float(dequantized_bits_per_dim(torch.tensor([-D * math.log(2)]), D)) == pytest.approx(8.0)


def test_ald_recovers_mixture_weights_where_plain_langevin_fails():
    """Song & Ermon 2019, Fig. 3: 1/5 N((-5,-5), I) + 4/5 N((5,5), I)."""
    mix = Mixture([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0])
    den = Denoiser(edm_model(mix), VESDE(sigma_min=1.0, sigma_max=20.0), "denoiser")
    x_init = torch.rand(1000, 2, generator=gen(6), dtype=torch.float64) * 16 - 8
    sigmas = torch.logspace(math.log10(20.0), 0.0, 10, dtype=torch.float64)
    x = annealed_langevin_sample(den, x_init, sigmas, n_steps_each=100, step_lr=0.1, final_denoise=False, generator=gen(7))
    share_ald = float((x.sum(1) > 0).double().mean())
    plain = annealed_langevin_sample(den, x_init, torch.tensor([1e-3], dtype=torch.float64), n_steps_each=300,
                                     step_lr=0.1, final_denoise=False, generator=gen(8))
    share_plain = float((plain.sum(1) > 0).double().mean())
    assert abs(share_ald - 0.8) < 0.05, share_ald
    assert abs(share_plain - 0.8) > 0.15, share_plain


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_dsm_loss_of_the_exact_model_is_the_irreducible_error(name):
    """x0 ~ N(0, s^2): E||E[eps|x_t] - eps||^2 = alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per dimension."""
    fam, s = FAMILIES[name], 0.5
    mix = gaussian(0.0, s, dim=1)
    t = torch.full((20000,), 0.3, dtype=torch.float64)
    x0 = s * torch.randn(20000, 1, generator=gen(9), dtype=torch.float64)
    loss = DenoisingScoreMatching()(eps_model(mix, fam), x0, t, torch.randn(20000, 1, generator=gen(10), dtype=torch.float64), fam)
    a2, s2 = float(fam.alpha(t[0])) ** 2, float(fam.sigma(t[0])) ** 2
    assert loss.mean().item() == pytest.approx(a2 * s**2 / (a2 * s**2 + s2), rel=0.03)


def test_ncsn_training_times_are_its_levels():
    fam = FAMILIES["ncsn"]
    t = sample_times(fam, 500, device=torch.device("cpu"), generator=gen(11))
    sig = fam.sigma(t)
    assert torch.isin(sig.round(decimals=9), fam.level_sigmas().round(decimals=9)).all()
    assert len(torch.unique(t)) == 10
    t = sample_times(FAMILIES["vp"], 500, device=torch.device("cpu"), generator=gen(11))
    assert t.min() >= 1e-3 and t.max() <= 1


def test_invalid_sampler_model_pairs_are_refused():
    with pytest.raises(ValueError, match="needs a continuous-time SDE"):
        PC(steps=5)(lambda x, t: x, torch.randn(2, 3), DDPM_FAMILY)
    with pytest.raises(ValueError, match="ancestral"):
        check_sampler_fits(PC(predictor="ancestral"), SubVPSDE())
    with pytest.raises(ValueError, match="needs a discrete-time DDPM model"):
        check_sampler_fits(DDIM(steps=5), VPSDE())
    check_sampler_fits(Heun(), DDPM_FAMILY)  # fast solvers run on DDPM models


@pytest.mark.parametrize("bad, message", [
    (lambda: Heun(steps=0), "steps=0"), (lambda: DPMSolverPP(spacing="cubic"), "spacing='cubic'"),
    (lambda: PFODE(rtol=0), "rtol=0"), (lambda: PFODE(method="Euler"), "method='Euler'"),
    (lambda: PC(predictor="leapfrog"), "predictor='leapfrog'"), (lambda: ALD(step_lr=-1), "step_lr=-1"),
    (lambda: parse_spec("heun-"), "heun-"), (lambda: VPSDE(beta_min=30), "beta_min=30"),
    (lambda: DenoisingScoreMatching(weighting="snr"), "weighting='snr'"),
])
def test_bad_settings_name_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_specs_parse():
    """Compact specs are (sampler config, options) pairs; tests/test_sampler_specs.py builds them."""
    assert parse_spec("heun-18") == ("heun", {"steps": 18})
    assert parse_spec("heun-18-churn40") == ("heun", {"steps": 18, "s_churn": 40.0})
    assert parse_spec("dpmpp-20") == ("dpmpp", {"steps": 20})
    assert parse_spec("pc-100-em") == ("pc", {"steps": 100, "predictor": "euler_maruyama"})
    assert parse_spec("ode-tol1e-3") == ("ode", {"rtol": 1e-3, "atol": 1e-3})
    assert parse_spec("ald-5") == ("ald", {"n_steps_each": 5})
