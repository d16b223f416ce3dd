"""How close the code is to the prior N(0, I) that the KL term (weight ``loss.gamma``)
pulls it towards, measured on a set of images' codes (mu, logvar).

Two different questions:

- ``kl_nats``, the mean over images of KL(N(mu(x), sigma^2(x)) || N(0, I)): the very
  term the loss weighs by gamma. Each image's posterior is compared with the prior, so
  it is large whenever codes are confident (small sigma) or far from 0, even when the
  codes of all images together look like N(0, I).
- ``aggregate_kl_nats``: the codes of all images together, the mixture
  q(z) = mean_x N(mu(x), sigma^2(x)), fitted by the Gaussian with its mean
  m = mean_x mu(x) and covariance S = Cov_x(mu) + diag(mean_x sigma^2(x)), then
  KL(N(m, S) || N(0, I)) = (tr S + m.m - D - log det S) / 2. That is the KL of the
  fitted Gaussian, not of q(z) itself: since log N(0, I) is quadratic, KL(q || N(0, I))
  = KL(q || N(m, S)) + KL(N(m, S) || N(0, I)), so the figure is a lower bound on q's KL,
  short by how far q is from Gaussian. It is 0 exactly when the codes have mean 0 and
  covariance I, which is what "the code is N(0, I)-like" can mean for a set of images.

Per-dimension summaries say where a large aggregate KL comes from: a shifted mean
(``mean_abs_mu``), a scale off 1 (``std_z``, the aggregate std sqrt(S_dd) including
sigma) or correlations (neither). ``active_dims`` counts dimensions with Var_x(mu_d)
> 0.01, Burda et al.'s "active units" for VAEs: a dimension whose mean does not move
with the image carries nothing about it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pipeline.objective.estimators import gaussian_kl

__all__ = ["ACTIVE_VARIANCE", "PriorFit", "gaussian_fit_kl", "prior_fit"]

ACTIVE_VARIANCE = 0.01  # Var_x(mu_d) above this: an active dimension (Burda et al., 2016)


@dataclass(frozen=True)
class PriorFit:
    """The prior measures of N images' D-dimensional codes (nats, code units)."""

    images: int
    dims: int
    kl_nats: float  # mean over images of KL(N(mu, sigma^2) || N(0, I))
    aggregate_kl_nats: float  # KL(N(m, S) || N(0, I)), N(m, S) the aggregate's Gaussian fit
    mean_abs_mu: float  # mean over dims of |mean_x mu_d|
    std_z_mean: float  # mean over dims of the aggregate std sqrt(Var_x(mu_d) + E_x sigma_d^2)
    std_z_min: float
    std_z_max: float
    active_dims: int  # dims with Var_x(mu_d) > ACTIVE_VARIANCE

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def line(self) -> str:
        """One line for a log or a table's foot."""
        return (
            f"code prior (N={self.images} test images, D={self.dims}): "
            f"E[KL] {self.kl_nats:.2f} nats, KL of the aggregate's Gaussian fit "
            f"{self.aggregate_kl_nats:.2f} nats, |mean mu| {self.mean_abs_mu:.3f}, std z "
            f"{self.std_z_mean:.3f} ({self.std_z_min:.3f}-{self.std_z_max:.3f}), "
            f"active dims {self.active_dims}/{self.dims}"
        )


def gaussian_fit_kl(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, cov) || N(0, I)) = (tr cov + mean.mean - D - log det cov) / 2, float64."""
    mean, cov = mean.double(), cov.double()
    sign, logdet = torch.linalg.slogdet(cov)
    if sign <= 0:  # a singular fit (sigma underflowed to 0 with N <= D): infinitely far
        return torch.tensor(float("inf"), dtype=torch.float64)
    return 0.5 * (cov.trace() + mean.dot(mean) - mean.numel() - logdet)


def prior_fit(mu: torch.Tensor, logvar: torch.Tensor) -> PriorFit:
    """The prior measures of codes ``mu``, ``logvar`` of shape (N, D), one row per image.

    Moments are the mixture's own (divided by N), so a code drawn exactly from N(0, I)
    gives a covariance whose only error is sampling noise."""
    if mu.ndim != 2 or mu.shape != logvar.shape or mu.shape[0] < 1:
        raise ValueError(
            f"mu and logvar must both be (N, D) with N >= 1; got {tuple(mu.shape)} and "
            f"{tuple(logvar.shape)}"
        )
    mu, logvar = mu.double(), logvar.double()
    m = mu.mean(0)
    centred = mu - m
    cov_mu = centred.T @ centred / mu.shape[0]
    cov = cov_mu + torch.diag(logvar.exp().mean(0))
    std_z = cov.diagonal().sqrt()
    return PriorFit(
        images=mu.shape[0],
        dims=mu.shape[1],
        kl_nats=gaussian_kl(mu, logvar).mean().item(),
        aggregate_kl_nats=gaussian_fit_kl(m, cov).item(),
        mean_abs_mu=m.abs().mean().item(),
        std_z_mean=std_z.mean().item(),
        std_z_min=std_z.min().item(),
        std_z_max=std_z.max().item(),
        active_dims=int((cov_mu.diagonal() > ACTIVE_VARIANCE).sum()),
    )
