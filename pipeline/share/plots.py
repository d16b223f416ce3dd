"""``metrics.jsonl`` -> one PNG of the training curves, for readers without W&B.

Panels (each drawn only when its keys were logged): MI estimates (``mi/*``), KL
(``kl``), loss terms (``loss`` and ``loss/*``) and probe accuracy (``probe/*``),
all against ``step``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.share.tracking import ONLINE_PROBE, read_metrics

__all__ = ["PANELS", "plot_metrics"]

# (title, y label, predicate on a key)
PANELS = (
    ("MI estimates", "nats", lambda k: k.startswith("mi/")),
    ("KL(q(z|x) || N(0, I))", "nats", lambda k: k == "kl"),
    ("loss terms", "loss", lambda k: k == "loss" or k.startswith("loss/")),
    ("probe accuracy", "accuracy", lambda k: k.startswith(ONLINE_PROBE)),
)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [
        (r["step"], r[key])
        for r in rows
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Write the curves to ``out_png`` (created even when there is nothing to plot,
    with a note saying so) and return its path."""
    import matplotlib  # on use: 0.8 s that a run pays once, at its end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl_path) if Path(metrics_jsonl_path).is_file() else []
    keys = sorted({k for r in rows for k in r})
    panels = [(t, unit, [k for k in keys if pick(k)]) for t, unit, pick in PANELS]
    panels = [p for p in panels if p[2]]
    fig, axes = plt.subplots(
        max(1, len(panels)), 1, figsize=(8, 2.6 * max(1, len(panels))), sharex=True, squeeze=False
    )
    for ax, (title, unit, panel_keys) in zip(axes[: len(panels), 0], panels, strict=True):
        for key in panel_keys:
            x, y = _series(rows, key)
            ax.plot(x, y, label=key, marker="." if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if not panels:
        axes[0, 0].text(0.5, 0.5, f"no metrics in {metrics_jsonl_path}", ha="center", va="center")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
