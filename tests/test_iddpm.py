"""Improved DDPM: learned variance, hybrid loss, respacing, importance timesteps (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.vlb_objectives import HybridLoss, VLBLoss
from difflab.diffusion.likelihood import bits_per_dim, vlb_terms_bpd
from difflab.diffusion.timesteps import UniformTimesteps
from difflab.diffusion.process import fixed_log_variance, q_sample
from difflab.diffusion.schedules import NoiseSchedule, cosine_betas
from difflab.diffusion.timesteps import ImportanceTimesteps
from difflab.diffusion.variance import LearnedVariance, learned_log_variance, respace
from difflab.lit import DiffusionModule
from difflab.nets import UNet
from difflab.samplers import DDIM, DDPM, ddim_timesteps


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_betas(cosine_betas(40))


def test_learned_range_stays_between_beta_tilde_and_beta(sched):
    t = torch.arange(sched.T).repeat_interleave(21)
    v = torch.linspace(-1, 1, 21).repeat(sched.T).reshape(-1, 1)
    var = learned_log_variance(v, t, sched, "learned_range").exp().flatten().double()
    lo, hi = sched.posterior_log_variance_clipped.exp()[t], sched.betas[t]
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)  # at t = 1 the clipped beta_tilde is beta_tilde_2
    assert torch.all(var >= lo * (1 - 1e-5)) and torch.all(var <= hi * (1 + 1e-5))
    ends = learned_log_variance(torch.tensor([[-1.0], [1.0]]), torch.tensor([7, 7]), sched, "learned_range").flatten()
    torch.testing.assert_close(ends.double(), torch.stack([lo[7 * 21], hi[7 * 21]]).log(), rtol=1e-6, atol=1e-6)
    assert learned_log_variance(torch.tensor([[0.3]]), torch.tensor([3]), sched, "learned").item() == pytest.approx(0.3)


def test_respace_keeps_alpha_bar_and_full_sequence_is_identity(sched):
    tau = ddim_timesteps(sched.T, 7, "linspace")
    sub = respace(sched, tau)
    torch.testing.assert_close(sub.alpha_bar, sched.alpha_bar[sorted(tau)])
    torch.testing.assert_close(respace(sched, list(range(sched.T))).betas, sched.betas)
    # the respaced posterior variance is DDIM's sigma^2 at eta = 1 (Song et al. 2021, Eq. 16)
    a, ap = sub.alpha_bar[1:], sub.alpha_bar[:-1]
    torch.testing.assert_close(sub.posterior_variance[1:], (1 - ap) / (1 - a) * (1 - a / ap))


def _quantised_gaussian(n: int, s: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    x = (torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64) * s).clamp(-1, 1)
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    return x.float(), float(x.var())


def test_vlb_at_optimum_equals_closed_form_on_gaussian_data(sched, gen):
    """x0 ~ N(0, s^2): the optimal Gaussian reverse step has mean E[mu_tilde | x_t] and variance
    beta_tilde + c0^2 Var(x0 | x_t), and its expected KL is 0.5 log(1 + c0^2 Var(x0|x_t) / beta_tilde)."""
    x0, s2 = _quantised_gaussian(20000, 0.25, gen)
    for i in (1, 5, 20, 39):
        ab, c0, bt = sched.alpha_bar[i].item(), sched.posterior_mean_coef_x0[i].item(), sched.posterior_variance[i].item()
        post_var = s2 * (1 - ab) / (ab * s2 + 1 - ab)  # Var(x0 | x_t)
        k = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)  # E[x0 | x_t] = k x_t
        log_var = math.log(bt + c0**2 * post_var)

        def optimum(x_t, t):
            eps = (x_t - math.sqrt(ab) * k * x_t) / math.sqrt(1 - ab)
            return torch.cat([eps, torch.full_like(x_t, log_var)], dim=1)

        t = torch.full((x0.shape[0],), i)
        eps = torch.randn(x0.shape, generator=gen)
        got = vlb_terms_bpd(optimum, x0, t, sched, eps=eps, log_variance=LearnedVariance(sched, "learned")).mean()
        want = 0.5 * math.log1p(c0**2 * post_var / bt) / math.log(2)
        assert got.item() == pytest.approx(want, rel=0.03, abs=2e-4), (i, got.item(), want)
        fixed = vlb_terms_bpd(lambda x_t, t_: optimum(x_t, t_)[:, :1], x0, t, sched, eps=eps,
                              log_variance=fixed_log_variance(sched, "fixed_small")).mean()
        assert fixed.item() > got.item()  # the fixed beta_tilde is not the optimum


class TwoHeads(torch.nn.Module):
    """Mean channels from `a`, variance channels from `b`: a test net whose two outputs have separate parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        return torch.cat([self.a * x, self.b * torch.ones_like(x)], dim=1)


def test_vlb_term_gradients_do_not_reach_the_mean(sched, gen):
    net, loss = TwoHeads(), HybridLoss(variance="learned_range")
    x0, _ = _quantised_gaussian(16, 0.3, gen)
    t = torch.randint(0, sched.T, (16,), generator=gen)
    t[0] = 0  # the decoder term too
    terms = loss.terms(net, x0, t, torch.randn(x0.shape, generator=gen), sched)
    terms["vlb"].sum().backward()
    assert net.a.grad is None or net.a.grad.abs().item() == 0.0
    assert net.b.grad.abs().item() > 0
    net.zero_grad()
    terms = loss.terms(net, x0, t, torch.randn(x0.shape, generator=gen), sched)
    (terms["mse"] + loss.lambda_vlb * sched.T * terms["vlb"]).sum().backward()
    assert net.a.grad.abs().item() > 0
    # the VLB loss alone trains both heads
    net.zero_grad()
    VLBLoss()(net, x0, t, torch.randn(x0.shape, generator=gen), sched).sum().backward()
    assert net.a.grad.abs().item() > 0 and net.b.grad.abs().item() > 0


def test_hybrid_loss_is_mse_plus_lambda_T_vlb(sched, gen):
    net = TwoHeads()
    x0, _ = _quantised_gaussian(8, 0.3, gen)
    t, eps = torch.randint(0, sched.T, (8,), generator=gen), torch.randn(x0.shape, generator=gen)
    loss = HybridLoss(lambda_vlb=0.001)
    x_t = q_sample(x0, t, eps, sched)
    mse = (0.5 * x_t - eps).pow(2).flatten(1).mean(1)
    vlb = vlb_terms_bpd(net, x0, t, sched, eps=eps, log_variance=LearnedVariance(sched))
    torch.testing.assert_close(loss(net, x0, t, eps, sched), mse + 0.001 * sched.T * vlb)


def test_importance_sampler_warmup_history_and_unbiased_weights(gen):
    T, K = 6, 3
    s = ImportanceTimesteps(history_per_term=K, uniform_prob=0.1)
    t, w = s.sample(5, T=T, device=torch.device("cpu"), generator=gen)
    assert torch.all(w == 1.0) and not s.warmed_up
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    for rep in range(K + 1):  # one more round than the history holds: the oldest entry rolls out
        s.update(torch.arange(T), losses * (rep + 1))
    assert s.warmed_up and torch.equal(s.counts, torch.full((T,), K))
    torch.testing.assert_close(s.history[2], torch.tensor([6.0, 9.0, 12.0], dtype=torch.float64))
    p = s.probabilities(T)
    rms = (losses.double()[:, None] * torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)).pow(2).mean(1).sqrt()
    torch.testing.assert_close(p, 0.9 * rms / rms.sum() + 0.1 / T)
    # exact unbiasedness: sum_t p_t * L_t / (T p_t) = mean_t L_t, and a Monte Carlo check of the estimator
    L = torch.tensor([0.5, 3.0, 1.0, 7.0, 2.0, 0.1], dtype=torch.float64)
    assert (p * L / (T * p)).sum().item() == pytest.approx(L.mean().item())
    t, w = s.sample(200_000, T=T, device=torch.device("cpu"), generator=gen)
    assert (w.double() * L[t]).mean().item() == pytest.approx(L.mean().item(), rel=0.01)
    counts = torch.bincount(t, minlength=T).double() / len(t)
    torch.testing.assert_close(counts, p, atol=5e-3, rtol=0)
    u_t, u_w = UniformTimesteps().sample(10, T=T, device=torch.device("cpu"), generator=gen)
    assert torch.all(u_w == 1)


def _tiny_module(objective, timestep_sampler=None, out_channels=2, num_classes=None):
    net = UNet(image_size=8, in_channels=1, out_channels=out_channels, ch=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0, num_classes=num_classes)
    return DiffusionModule(net=net, betas=cosine_betas(20), optimizer=torch.optim.Adam, objective=objective,
                           timestep_sampler=timestep_sampler)


def test_importance_state_survives_checkpoint(gen):
    a = _tiny_module(VLBLoss(), ImportanceTimesteps(history_per_term=2))
    a.timestep_sampler.sample(4, T=20, device=torch.device("cpu"))
    a.timestep_sampler.update(torch.arange(20).repeat(2), torch.rand(40, generator=gen))
    ckpt: dict = {}
    a.on_save_checkpoint(ckpt)
    ckpt = {"difflab": dict(ckpt["difflab"]), "state_dict": a.state_dict()}  # what Lightning passes on load
    b = _tiny_module(VLBLoss(), ImportanceTimesteps(history_per_term=2))
    b.on_load_checkpoint(ckpt)
    assert b.timestep_sampler.warmed_up
    torch.testing.assert_close(b.timestep_sampler.probabilities(20), a.timestep_sampler.probabilities(20))


def test_incompatible_variance_settings_are_refused():
    with pytest.raises(ValueError, match="variance='learned_range' needs a net with out_channels=2"):
        _tiny_module(HybridLoss(), out_channels=1)
    fixed = _tiny_module(None, out_channels=1)
    with pytest.raises(ValueError, match="sampler variance='learned' but this model has a fixed variance"):
        fixed.sample(DDPM(variance="learned"), [0])
    with pytest.raises(ValueError, match="variance='fixed'.*learned"):
        HybridLoss(variance="fixed")


def _eps_and_v(v_value: float):
    def model_fn(x, t):
        eps = 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(x, v_value)], dim=1)
    return model_fn


def _gens(n=3, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_respaced_samplers_use_recomputed_and_learned_variances(sched):
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    fixed_fn = lambda x, t: _eps_and_v(0.0)(x, t)[:, :1]  # noqa: E731
    # DDPM on a respaced sub-sequence with beta_tilde' is DDIM with eta = 1 on the same sub-sequence
    ddpm = DDPM(variance="fixed_small", steps=8)(fixed_fn, x_T, sched, generator=_gens())
    ddim = DDIM(steps=8, eta=1.0)(fixed_fn, x_T, sched, generator=_gens())
    torch.testing.assert_close(ddpm, ddim, rtol=1e-5, atol=1e-5)
    # learned_range with v = -1 is beta_tilde' of the sub-sequence: the same samples, in DDPM and DDIM
    learned = DDPM(steps=8)(_eps_and_v(-1.0), x_T, sched, generator=_gens(), model_variance="learned_range")
    torch.testing.assert_close(learned, ddpm, rtol=1e-5, atol=1e-5)
    learned = DDIM(steps=8, eta=1.0)(_eps_and_v(-1.0), x_T, sched, generator=_gens(), model_variance="learned_range")
    torch.testing.assert_close(learned, ddim, rtol=1e-4, atol=1e-4)  # float32 log-variance path vs float64 sigma
    # v = +1 (beta') is a different, larger variance; the full-T DDPM with v = -1 is fixed_small
    wide = DDPM(steps=8)(_eps_and_v(1.0), x_T, sched, generator=_gens(), model_variance="learned_range")
    assert not torch.allclose(wide, ddpm)
    full = DDPM()(_eps_and_v(-1.0), x_T, sched, generator=_gens(), model_variance="learned_range")
    torch.testing.assert_close(full, DDPM(variance="fixed_small")(fixed_fn, x_T, sched, generator=_gens()))


def test_bits_per_dim_with_learned_variance(sched, gen):
    x0, _ = _quantised_gaussian(4, 0.3, gen)
    fixed_fn = lambda x, t: _eps_and_v(0.0)(x, t)[:, :1]  # noqa: E731
    a = bits_per_dim(_eps_and_v(-1.0), x0, sched, log_variance=LearnedVariance(sched), generator=_gens(4))
    b = bits_per_dim(fixed_fn, x0, sched, log_variance=fixed_log_variance(sched, "fixed_small"), generator=_gens(4))
    torch.testing.assert_close(a["total_bpd"], b["total_bpd"])
    module = _tiny_module(HybridLoss())
    assert isinstance(module.log_variance(), LearnedVariance)
