"""The model card says what the run optimised: the terms that were on, their weights,
the prior only when gamma > 0, and what was measured."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.core.schema import Config
from pipeline.share.card import card_link, objective_text, render_card


def card(tmp_path, **loss) -> str:
    cfg = Config()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    cfg.train.output_dir = str(tmp_path / "run")
    return render_card(cfg.to_dict(), step=5, samples_seen=40, world_size=1, location="here")


def objective(text: str) -> str:
    """The card's Objective item, with its sub-list."""
    return re.search(r"- \*\*Objective:\*\*(.*?)\n- \*\*", text, re.DOTALL).group(1)


def formula(text: str) -> str:
    return re.search(r"`L = (.*?)`", text).group(1)


def test_no_prior_is_claimed_when_gamma_is_zero(tmp_path):
    """Catches the card of issue 19: 'with a KL prior on the code' on a gamma-0 run."""
    text = card(tmp_path, gamma=0.0)
    assert "prior" not in text.split("## Model details")[0].replace("no prior", "")
    assert "with no prior on the code" in text
    assert "KL" not in formula(text) and "gamma 0" in objective(text)
    assert "no prior on the code (gamma 0)" in objective(text)


@pytest.mark.parametrize(
    "asked, used, words",
    [
        ("auto", "bf16", "precision\n  bf16 (train.mixed_precision auto)"),
        ("auto", "no", "precision\n  fp32 (train.mixed_precision auto)"),
        ("no", "no", "precision\n  fp32\n"),
        ("bf16", None, "precision\n  bf16\n"),
    ],
)
def test_the_card_states_the_precision_the_run_computed_in(tmp_path, asked, used, words):
    """Catches a card that said "precision auto": what auto resolved to is the fact."""
    cfg = Config()
    cfg.train.mixed_precision, cfg.train.output_dir = asked, str(tmp_path / "run")
    text = render_card(
        cfg.to_dict(), step=5, samples_seen=40, world_size=1, location="here", precision=used
    )
    assert words in text


def test_a_prior_is_stated_with_its_weight(tmp_path):
    text = card(tmp_path, gamma=0.01)
    assert "with a KL prior pulling the code towards N(0, I) (gamma 0.01)" in text
    assert "+ 0.01 * E_x KL(N(mu, sigma^2) || N(0, I))" in formula(text)
    assert "weight gamma 0.01" in objective(text) and "no prior" not in text


@pytest.mark.parametrize(
    "loss, on, off",
    [
        ({"global_critic": "none", "beta": 1.0}, ["- 1.0 * mean_ij I_local"], ["I_global"]),
        (
            {"local_critic": "none", "global_critic": "dot", "alpha": 0.5},
            ["- 0.5 * I_global"],
            ["I_local"],
        ),
        (
            {"alpha": 0.25, "beta": 2.0, "global_critic": "concat", "local_critic": "dot"},
            ["- 0.25 * I_global", "- 2.0 * mean_ij I_local"],
            [],
        ),
        ({"alpha": 0.0, "global_critic": "dot"}, ["mean_ij I_local"], ["I_global"]),
    ],
)
def test_the_mi_terms_follow_the_critics_and_weights(tmp_path, loss, on, off):
    """Catches: a term claimed whose critic is none (or whose weight is 0), a weight
    from the other term, the estimator or critic names not the config's."""
    text = card(tmp_path, estimator="jsd", gamma=0.0, **loss)
    for term in on:
        assert term in formula(text)
    for term in off:
        assert term not in formula(text)
    scopes = {"I_global": "global", "I_local": "local"}
    for symbol, scope in scopes.items():
        has = symbol in formula(text)
        assert (f"no {scope} term" in objective(text)) is not has
    assert "jsd estimator" in objective(text)


def test_the_dim_name_counts_the_terms_that_train():
    base = dict(Config().to_dict()["loss"], gamma=0.0)
    assert objective_text(dict(base, global_critic="none")).startswith("DIM(L), infonce")
    only_global = dict(base, local_critic="none", global_critic="dot", alpha=0.5)
    assert objective_text(only_global).startswith("DIM(G), infonce")
    assert objective_text(dict(base, global_critic="dot", alpha=0.5)).startswith("DIM(G+L)")
    assert "critic `concat` on `mu`" in objective_text(
        dict(base, global_critic="concat", global_input="mu", alpha=0.5)
    )


def test_the_card_states_the_measured_kl_and_mi(tmp_path):
    """The last logged KL and MI estimates (what the code became), and nothing when the
    run logged none."""
    assert "Measured" not in card(tmp_path)
    (tmp_path / "run").mkdir()
    rows = [
        {"step": 10, "kl": 12.0, "mi/local/infonce": 0.5},
        {"step": 20, "kl": 408.07, "mi/local/infonce": 0.875, "mi/global/infonce": 1.25},
        {"step": 20, "lr": 0.1},
    ]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = card(tmp_path)
    assert (
        "- **Measured:** logged at step 20 (`metrics.jsonl`, nats): kl 408, "
        "mi/global/infonce 1.25, mi/local/infonce 0.875"
    ) in text


def test_the_picture_is_linked_relative_to_the_card_when_it_travels_with_it(tmp_path):
    model = tmp_path / "run" / "export"
    model.mkdir(parents=True)
    for path in (model / "nb.png", tmp_path / "run" / "nb.png", tmp_path / "nb.png"):
        path.write_bytes(b"png")
    assert card_link(model, model / "nb.png") == "nb.png"
    assert card_link(model, tmp_path / "run" / "nb.png") == "../nb.png"
    assert card_link(model, tmp_path / "nb.png") is None  # outside the run folder
    assert card_link(model, model / "missing.png") is None
    assert card_link(model, None) is None
