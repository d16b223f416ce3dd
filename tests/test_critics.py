"""Critics: ``pairwise`` scores every pair, ``aligned`` the matched ones, and they agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.objective.critics import ConcatCritic, DotCritic, per_location

N, A, B, H, W = 5, 6, 4, 2, 3  # batch, image-side width, code width, local map size

CRITICS = {
    "dot": lambda local: DotCritic(A, B, dim=8, hidden=16, local=local),
    "dot-linear": lambda local: DotCritic(A, B, dim=8, hidden=0, local=local),
    "dot-cosine": lambda local: DotCritic(A, B, dim=8, hidden=16, local=local, temperature=0.1),
    "concat": lambda local: ConcatCritic(A, B, hidden=16, local=local),
}


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_aligned_is_the_diagonal_of_pairwise(kind, local):
    """pairwise[i, j] = T(a_j, b_i) and aligned[i] = T(a_i, b_i). Catches: a transposed
    pairwise (the diagonal alone would not), a local map scored at the wrong locations,
    aligned and pairwise computing different functions (a scale or bias in one only)."""
    torch.manual_seed(0)
    critic = CRITICS[kind](local)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(N, A, H, W, generator=g) if local else torch.randn(N, A, generator=g)
    b = torch.randn(N, B, generator=g)
    ea, eb = critic.embed_a(a), critic.embed_b(b)
    pairwise, aligned = critic.pairwise(ea, eb), critic.aligned(ea, eb)
    assert pairwise.shape == ((N, N, H * W) if local else (N, N))
    assert aligned.shape == ((N, H * W) if local else (N,))
    torch.testing.assert_close(torch.diagonal(pairwise).movedim(-1, 0), aligned)
    assert aligned.std() > 1e-3  # scores that differ, so a mix-up cannot hide
    for i in range(N):  # row i: code b_i against every image a_j, one aligned call each
        for j in range(N):
            one = critic.aligned(critic.embed_a(a[j : j + 1]), critic.embed_b(b[i : i + 1]))
            torch.testing.assert_close(pairwise[i, j], one[0])
    if local:  # location k of the map is (row k // W, column k % W): the map's own order
        for k in range(H * W):
            alone = torch.zeros_like(a)
            alone[:, :, k // W, k % W] = a[:, :, k // W, k % W]
            moved = critic.aligned(critic.embed_a(alone), eb)
            torch.testing.assert_close(moved[:, k], aligned[:, k])


def test_per_location_is_the_linear_layer_at_every_location():
    """A map's embedding is the Linear applied to each location's vector, in either memory
    layout. Catches: a transposed weight, a lost bias, locations mixed up."""
    torch.manual_seed(0)
    linear = nn.Linear(A, 7)
    a = torch.randn(N, A, H, W)
    out = per_location(linear, a)
    assert out.shape == (N, 7, H, W)
    for y in range(H):
        for x in range(W):
            torch.testing.assert_close(out[:, :, y, x], linear(a[:, :, y, x]))
    nhwc = per_location(linear, a.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, out)
    torch.testing.assert_close(per_location(linear, a[:, :, 0, 0]), linear(a[:, :, 0, 0]))


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
def test_cosine_dot_critic_is_cosine_over_temperature(local):
    """With a temperature the score is cos(f(a), g(b)) / t, computed here from the raw
    embeddings by torch's own cosine_similarity: catches a missing normalisation, one on
    the wrong axis of a local map, or the temperature applied twice or not at all."""
    torch.manual_seed(0)
    critic = DotCritic(A, B, dim=8, hidden=16, local=local, temperature=0.25)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(N, A, H, W, generator=g) if local else torch.randn(N, A, generator=g)
    b = torch.randn(N, B, generator=g)
    fa, gb = critic.f(a), critic.g(b)  # (N, 8[, H, W]), (N, 8)
    if local:
        fa = fa.flatten(2)
        want = torch.cosine_similarity(fa[None], gb[:, None, :, None], dim=2) / 0.25
    else:
        want = torch.cosine_similarity(fa[None], gb[:, None], dim=2) / 0.25
    got = critic.pairwise(critic.embed_a(a), critic.embed_b(b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.abs().max() <= 1 / 0.25 + 1e-5
