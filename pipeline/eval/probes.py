"""The probes: classifiers fit on frozen features (pure torch).

``PROBES`` names each (linear, MLP, weighted k-NN); ``run_probes`` fits the named ones
on train features and scores them on test features. The offline evaluation
(``pipeline.evaluate``, every model and view) and the online probe during pretraining
(``pipeline.eval.online``) both call it, so they report the same quantity. No data loading,
no model, no logging here: tensors in, accuracies out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "L2_GRID",
    "MLP_INPUT_DROPOUT",
    "PROBES",
    "LinearProbeResult",
    "MLPProbeResult",
    "ProbeScore",
    "ProbeSettings",
    "accuracy",
    "fit_linear",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "mlp_probe",
    "run_probes",
    "standardize",
]

L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of correct predictions, in [0, 1]."""
    return float((pred == target).float().mean()) if target.numel() else 0.0


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in labels if y.numel())) + 1


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (DINO-style): each of the k nearest bank items
    votes for its class with weight exp(sim / temperature); the heaviest class wins.

    Queries are processed in chunks so memory stays O(chunk * len(bank)).
    """
    num_classes = num_classes or _num_classes(bank_labels)
    k = min(k, bank.shape[0])
    bank_n = F.normalize(bank.float(), dim=1)
    preds = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank_n.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else bank_labels.new_empty(0)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int,
    temperature: float,
) -> float:
    """Accuracy of ``knn_predict`` on labelled queries (defaults: ``ProbeSettings``)."""
    n = _num_classes(bank_labels, query_labels)
    pred = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=n)
    return accuracy(pred, query_labels)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature, with statistics from ``train`` only
    (constant features stay at zero instead of blowing up)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(1e-6)
    return [(t.float() - mean) / std for t in (train, *others)]


def fit_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float, max_iter: int = 200
) -> torch.nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS, L2 penalty on the weights.

    Full batch keeps the fit deterministic and free of learning-rate tuning; the
    objective is mean cross-entropy + l2 * ||W||^2 (the bias is not penalised).
    """
    x = x.float()
    layer = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


@dataclass
class LinearProbeResult:
    accuracy: float  # on the test features
    l2: float  # the regularisation chosen on the validation split
    val_accuracy: float  # its validation accuracy


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> LinearProbeResult:
    """Linear probe accuracy on standardised features.

    A seeded ``val_fraction`` of the training features picks the L2 strength from
    ``l2_grid`` (ties go to the stronger penalty); the probe is then refit on all
    training features with that strength and scored once on the test features.
    """
    n = train_x.shape[0]
    num_classes = _num_classes(train_y, test_y)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(train_x.device)
    n_val = round(n * val_fraction) if len(l2_grid) > 1 else 0
    n_val = min(max(n_val, 1), n - 1) if len(l2_grid) > 1 and n > 1 else 0
    best_l2, best_val = float(l2_grid[-1]), float("nan")
    if n_val:
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fx, vx = standardize(train_x[fit_idx], train_x[val_idx])
        best_val = -1.0
        for l2 in sorted(l2_grid):
            layer = fit_linear(fx, train_y[fit_idx], num_classes, l2=l2, max_iter=max_iter)
            acc = accuracy(layer(vx).argmax(dim=1), train_y[val_idx])
            if acc >= best_val:
                best_l2, best_val = float(l2), acc
    tx, sx = standardize(train_x, test_x)
    layer = fit_linear(tx, train_y, num_classes, l2=best_l2, max_iter=max_iter)
    return LinearProbeResult(accuracy(layer(sx).argmax(dim=1), test_y), best_l2, best_val)


@dataclass
class MLPProbeResult:
    accuracy: float  # on the test features, with the weights of the best epoch
    epoch: int  # the epoch chosen on the validation split
    val_accuracy: float
    input_dropout: float = 0.0  # the input dropout chosen on the validation split


# Input dropout is the MLP's L2 grid: on 4,096 conv features and 9,000 images the
# unregularised MLP overfits in a few epochs and lands under the linear probe, while on
# a 64-dim code dropping half the inputs costs accuracy (docs/evaluation.md).
MLP_INPUT_DROPOUT: tuple[float, ...] = (0.0, 0.5)


def _fit_mlp(
    fx: torch.Tensor,
    fy: torch.Tensor,
    vx: torch.Tensor,
    vy: torch.Tensor,
    num_classes: int,
    *,
    input_dropout: float,
    hidden: int,
    dropout: float,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[float, int, torch.nn.Module]:
    """One MLP, trained for ``epochs``; returns (best validation accuracy, its epoch, the
    network with that epoch's weights)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Dropout(input_dropout),
        torch.nn.Linear(fx.shape[1], hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, num_classes),
    ).to(fx.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best = (-1.0, 0, None)
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(len(fy), generator=gen).to(fx.device)
            for start in range(0, len(fy) - 1, batch_size):  # BN needs >= 2 per batch
                idx = order[start : start + batch_size]
                if idx.numel() < 2:
                    continue
                loss = F.cross_entropy(net(fx[idx]), fy[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val = accuracy(net(vx).argmax(dim=1), vy)
            if val > best[0]:
                best = (val, epoch, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    return best[0], best[1], net.eval()


def mlp_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    hidden: int = 200,
    dropout: float = 0.1,
    input_dropout: Sequence[float] = MLP_INPUT_DROPOUT,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> MLPProbeResult:
    """The DIM paper's non-linear probe: Linear-BN-ReLU-Dropout-Linear, trained with Adam,
    behind a dropout on its input features.

    Features are standardised with training statistics. A seeded ``val_fraction`` of
    the training features is held out to pick the input dropout from ``input_dropout``
    and the epoch (early stopping; ties go to the stronger dropout); the test set is
    scored once, with the weights of that epoch. Seeded, and the global RNG is left
    untouched, so calling it mid-training changes nothing else.
    """
    n = train_x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    fx, vx, sx = standardize(train_x[fit_idx], train_x[val_idx], test_x)
    fy, vy = train_y[fit_idx], train_y[val_idx]
    num_classes = _num_classes(train_y, test_y)
    best = None
    with torch.random.fork_rng(devices=[]):
        for p in sorted(input_dropout):
            val, epoch, net = _fit_mlp(
                fx, fy, vx, vy, num_classes, input_dropout=p, hidden=hidden, dropout=dropout,
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
            )  # fmt: skip
            if best is None or val >= best[0]:
                best = (val, epoch, net, p)
        val, epoch, net, p = best
        with torch.no_grad():
            test = accuracy(net(sx).argmax(dim=1), test_y)
    return MLPProbeResult(test, epoch, val, float(p))


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes run; the defaults are the offline evaluation's."""

    k: int = 20  # k-NN: neighbours that vote
    temperature: float = 0.07  # k-NN: a vote weighs exp(cosine similarity / temperature)
    l2_grid: tuple[float, ...] = L2_GRID  # linear: strengths, one picked on a validation split
    max_iter: int = 200  # linear: L-BFGS iterations per fit
    seed: int = 0  # validation splits and the MLP's initialisation


class ProbeScore(NamedTuple):
    accuracy: float  # on the test features, in [0, 1]
    chosen: str  # what the probe picked on its validation split, for the log ("" if nothing)


Features = torch.Tensor


def _linear(x: Features, y: Features, tx: Features, ty: Features, s: ProbeSettings) -> ProbeScore:
    fit = linear_probe(x, y, tx, ty, l2_grid=s.l2_grid, seed=s.seed, max_iter=s.max_iter)
    return ProbeScore(fit.accuracy, f"l2={fit.l2:g}")


def _mlp(x: Features, y: Features, tx: Features, ty: Features, s: ProbeSettings) -> ProbeScore:
    fit = mlp_probe(x, y, tx, ty, seed=s.seed)
    return ProbeScore(fit.accuracy, f"mlp epoch={fit.epoch} input dropout={fit.input_dropout:g}")


def _knn(x: Features, y: Features, tx: Features, ty: Features, s: ProbeSettings) -> ProbeScore:
    return ProbeScore(knn_accuracy(x, y, tx, ty, k=s.k, temperature=s.temperature), "")


PROBES: dict[str, Callable[..., ProbeScore]] = {"linear": _linear, "mlp": _mlp, "knn": _knn}


def run_probes(
    names: Iterable[str],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    settings: ProbeSettings = ProbeSettings(),
) -> dict[str, ProbeScore]:
    """Each named probe of ``PROBES``, fit on the train features, scored on the test ones."""
    return {name: PROBES[name](train_x, train_y, test_x, test_y, settings) for name in names}
