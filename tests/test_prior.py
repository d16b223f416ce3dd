"""The prior measures (pipeline.eval.prior) against closed forms and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pipeline.eval.prior import gaussian_fit_kl, prior_fit


def test_aggregate_kl_is_the_kl_of_the_moment_matched_gaussian():
    """On correlated, shifted codes with per-image variances: the mixture's mean and
    covariance (1/N moments, Cov(mu) + mean sigma^2 on the diagonal), then torch's own
    Gaussian KL. Catches: sigma^2 left out of S, the N-1 covariance, a dropped mean term,
    the covariance's off-diagonal ignored (a diagonal-only logdet)."""
    g = torch.Generator().manual_seed(0)
    n, d = 50, 6
    mix = torch.randn(d, d, generator=g) / 2
    mu = torch.randn(n, d, generator=g) @ mix + torch.linspace(-1, 1, d)
    logvar = torch.randn(n, d, generator=g) / 2 - 1
    m = mu.double().mean(0)
    cov = torch.cov(mu.double().T, correction=0) + torch.diag(logvar.double().exp().mean(0))
    want = kl_divergence(
        MultivariateNormal(m, cov),
        MultivariateNormal(torch.zeros(d).double(), torch.eye(d).double()),
    )
    fit = prior_fit(mu, logvar)
    assert fit.aggregate_kl_nats == pytest.approx(want.item(), rel=1e-9)
    assert gaussian_fit_kl(m, cov).item() == pytest.approx(want.item(), rel=1e-9)
    # the mean KL per image is the loss's term, summed over dims
    per_image = kl_divergence(
        torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp()),
        torch.distributions.Normal(0.0, 1.0),
    ).sum(1)
    assert fit.kl_nats == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert (fit.images, fit.dims) == (n, d)
    assert fit.std_z_max == pytest.approx(cov.diagonal().sqrt().max().item(), rel=1e-9)


def test_the_prior_itself_gives_zero():
    """Every image's posterior exactly N(0, I): both KLs 0, std 1, no active dimension."""
    fit = prior_fit(torch.zeros(10, 4), torch.zeros(10, 4))
    assert fit.kl_nats == 0 and fit.aggregate_kl_nats == pytest.approx(0, abs=1e-12)
    assert fit.mean_abs_mu == 0 and fit.std_z_min == fit.std_z_max == 1
    assert fit.active_dims == 0


def test_codes_drawn_from_the_prior_fit_it_but_pay_per_image():
    """mu ~ N(0, 0.75 I) with sigma^2 = 0.25: the aggregate is N(0, I) (KL only sampling
    noise, about D^2 / 4N), yet each image pays E[KL] = D/2 (0.75 + 0.25 - log 0.25 - 1)
    = D log 2 nats: the two measures answer different questions."""
    g = torch.Generator().manual_seed(1)
    n, d = 20_000, 8
    mu = torch.randn(n, d, generator=g) * math.sqrt(0.75)
    fit = prior_fit(mu, torch.full((n, d), math.log(0.25)))
    assert fit.aggregate_kl_nats < 0.01
    assert fit.kl_nats == pytest.approx(d * math.log(2), rel=0.01)
    assert 0.98 < fit.std_z_min <= fit.std_z_max < 1.02 and fit.mean_abs_mu < 0.02
    assert fit.active_dims == d


def test_a_shifted_scaled_code_gives_the_closed_form():
    """Four images whose mu has mean c = (1, -2), variance s^2 = 1.5 and no correlation
    exactly, sigma^2 = 0.5: S = 2 I, so KL = (2 D + |c|^2 - D - D log 2) / 2 = 3.5 - log 2."""
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]).double()
    mu = torch.tensor([1.0, -2.0]).double() + math.sqrt(1.5) * signs
    logvar = torch.full((4, 2), math.log(0.5)).double()
    fit = prior_fit(mu, logvar)
    assert fit.aggregate_kl_nats == pytest.approx(3.5 - math.log(2), rel=1e-9)
    assert fit.mean_abs_mu == pytest.approx(1.5)
    assert fit.std_z_min == pytest.approx(math.sqrt(2)) and fit.std_z_max == pytest.approx(
        math.sqrt(2)
    )
    per_image = 0.5 * (mu.pow(2) + 0.5 - math.log(0.5) - 1).sum(1)
    assert fit.kl_nats == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_active_dims_count_the_variance_of_mu_over_images():
    """Var(mu_d) 0.005 (inactive), 0.02 (active), 0 (inactive, whatever sigma is)."""
    signs = torch.tensor([[1.0], [-1.0]])
    mu = torch.cat([math.sqrt(0.005) * signs, math.sqrt(0.02) * signs, torch.zeros(2, 1)], 1)
    fit = prior_fit(mu, torch.zeros(2, 3))
    assert fit.active_dims == 1


def test_a_collapsed_variance_is_infinitely_far_and_bad_shapes_are_named():
    fit = prior_fit(torch.zeros(3, 2), torch.full((3, 2), -1000.0))  # sigma^2 underflows to 0
    assert fit.aggregate_kl_nats == math.inf
    with pytest.raises(ValueError, match="mu and logvar must both be"):
        prior_fit(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="mu and logvar must both be"):
        prior_fit(torch.zeros(0, 2), torch.zeros(0, 2))
