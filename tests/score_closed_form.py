"""Closed-form denoisers of Gaussian and isotropic Gaussian-mixture data (test oracles, no learning).

For x_hat = x0 + sigma eps and x0 ~ sum_k pi_k N(mu_k, s_k^2 I):
    p(x_hat; sigma) = sum_k pi_k N(x_hat; mu_k, (s_k^2 + sigma^2) I)
    D(x_hat; sigma) = sum_k w_k(x_hat) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x_hat - mu_k)],  w_k = posterior of k
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Mixture:
    def __init__(self, weights, means, stds):
        self.pi = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, d)
        self.s = torch.as_tensor(stds, dtype=torch.float64)  # (K,)

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p(x; sigma) for x (B, d); sigma scalar or (B,)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # (B or 1, 1)
        var = self.s[None, :] ** 2 + sigma**2  # (B, K)
        d2 = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)  # (B, K)
        comp = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(comp + self.pi.log()[None], dim=1)

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """E[x0 | x_hat = x] at noise sigma; x (B, ...) flattened to (B, d)."""
        shape = x.shape
        x = x.reshape(shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = self.s[None, :] ** 2 + sigma**2  # (B, K)
        d2 = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)
        logw = -0.5 * d2 / var - 0.5 * self.dim * var.log() + self.pi.log()[None]
        w = torch.softmax(logw, dim=1)  # (B, K)
        shrink = self.s[None, :] ** 2 / var  # (B, K)
        comp = self.mu[None] + shrink[..., None] * (x[:, None, :] - self.mu[None])  # (B, K, d)
        return (w[..., None] * comp).sum(1).reshape(shape)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


def gaussian(mean: float, std: float, dim: int = 1) -> Mixture:
    return Mixture([1.0], [[mean] * dim], [std])


def edm_model(mix: Mixture):
    """model_fn(x_hat, sigma_hat) -> D: the exact EDM denoiser (prediction='denoiser')."""
    return lambda x, sigma: mix.denoise(x, sigma).to(x.dtype)


def eps_model(mix: Mixture, family):
    """model_fn(x_t, c_noise) -> exact eps for a family whose c_noise is t (ddpm) or 999 t."""

    def fn(x_t: Tensor, c: Tensor) -> Tensor:
        t = c.to(torch.float64) if family.name == "ddpm" else c.to(torch.float64) / 999.0
        a = family.alpha(t).reshape(-1, *[1] * (x_t.ndim - 1))
        s = family.sigma(t).reshape(-1, *[1] * (x_t.ndim - 1))
        x0 = mix.denoise(x_t / a, s / a)
        return ((x_t - a * x0) / s).to(x_t.dtype)

    return fn
