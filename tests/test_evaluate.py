"""Evaluation: probe maths, feature views, the evaluate CLI on tiny shards, online probe, plots."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.schema import ModelConfig
from pipeline.data.loaders import eval_loader
from pipeline.eval.features import extract_features
from pipeline.eval.probes import knn_accuracy, knn_predict, linear_probe
from pipeline.models.encoder import DIMEncoder
from pipeline.share.export import export_encoder

TINY = {
    "backbone": "test_resnet",
    "code_dim": 8,
    "fc_dim": 32,
    "local_layer": 1,
    "img_size": 16,
    "in_chans": 3,
    "backbone_kwargs": {},
}


def blobs(n: int, classes: int = 4, dim: int = 16, seed: int = 0, spread: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


# ------------------------------------------------------------------ probe maths


def test_probes_separable_near_perfect():
    x, y = blobs(400)
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]).accuracy >= 0.98
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], k=10, temperature=0.07) >= 0.98


def test_probes_random_labels_near_chance():
    x, _ = blobs(1000, classes=4)
    y = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(1))
    lin = linear_probe(x[:700], y[:700], x[700:], y[700:]).accuracy
    knn = knn_accuracy(x[:700], y[:700], x[700:], y[700:], k=20, temperature=0.07)
    # chance is 0.25; 300 test samples: a 3-sigma band is about +-0.075
    assert abs(lin - 0.25) < 0.1 and abs(knn - 0.25) < 0.1


def test_linear_probe_keeps_the_l2_with_the_best_validation_score():
    """Catches: the last (or first) grid value kept whatever the validation says, a
    comparison that keeps the worst score, a tie that goes to the weaker penalty."""
    # Two separable classes, 70/30: a huge L2 leaves only the (unpenalised) bias, which
    # answers the majority class (~0.7 on validation); a small L2 separates them (~1.0).
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(300, generator=g) < 0.3).long()
    x = torch.randn(300, 8, generator=g) + 6.0 * y[:, None]
    for grid in ((1e-4, 1e3), (1e3, 1e-4)):  # the grid's order does not matter
        a = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=grid)
        assert a.l2 == 1e-4 and a.val_accuracy == 1.0 and a.accuracy == 1.0, a
    heavy = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(1e3,))
    assert heavy.accuracy == pytest.approx(float((y[200:] == 0).float().mean()))  # majority
    # Every small L2 separates the classes: a tie, which goes to the stronger penalty.
    tie = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(1e-3, 1e-5, 1e-4))
    assert tie.l2 == 1e-3 and tie.val_accuracy == 1.0
    again = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=(1e-3, 1e-5, 1e-4))
    assert again == tie  # seeded split, deterministic fit


def brute_force_knn(bank, bank_y, queries, k, t, classes):
    preds = []
    for q in queries:
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in order:
            votes[int(bank_y[i])] += math.exp(sims[i] / t)
        preds.append(max(range(classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(1, 0.07), (3, 0.1), (5, 1.0)])
def test_knn_matches_brute_force(k, t):
    g = torch.Generator().manual_seed(k)
    bank, bank_y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    queries = torch.randn(7, 5, generator=g)
    got = knn_predict(bank, bank_y, queries, k=k, temperature=t, num_classes=3, chunk=3)
    assert torch.equal(got, brute_force_knn(bank, bank_y, queries, k, t, 3))


def test_knn_weights_votes_by_similarity():
    # two far neighbours of class 1 lose to one very close neighbour of class 0 at low T
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    pred = knn_predict(
        bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05]]), k=3, temperature=0.05
    )
    assert pred.tolist() == [0]


# ------------------------------------------------------------------ features


def test_extract_features_views_shapes_limit_and_mode_restored():
    torch.manual_seed(0)
    enc = DIMEncoder(ModelConfig(**TINY)).train()
    x, y = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    batches = [{"image": x[i : i + 4], "label": y[i : i + 4]} for i in range(0, 10, 4)]
    feats, labels = extract_features({"dim": enc}, batches, pixels=True, limit=7)
    assert enc.training  # restored
    assert labels.tolist() == y[:7].tolist()
    assert set(feats) == {"dim", "pixels"}
    assert {v: t.shape for v, t in feats["dim"].items()} == {
        "conv": (7, enc.backbone.num_features),
        "fc": (7, 32),
        "y": (7, 8),
    }
    assert feats["pixels"]["pixels"].shape == (7, 3 * 16 * 16)
    enc.eval()
    assert torch.allclose(feats["dim"]["y"], enc(x[:7]).mu, atol=1e-5)  # eval mode: z = mu
    local, _ = extract_features({"dim": enc}, batches, conv_source="local")
    assert local["dim"]["conv"].shape == (10, enc.local_channels)


# ------------------------------------------------------------------ CLI end to end


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def write_tiny_shards(folder, name: str, n: int, seed: int, bright: int = 230) -> str:
    """Three classes of 16x16 RGB images: a bright square in one of three corners (on a
    background of 0-59: at ``bright=50`` the square is hard to see)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    pattern = str(folder / f"{name}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max(1, n // 2), verbose=0) as sink:
        for i in range(n):
            label = i % 3
            img = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
            r, c = [(0, 0), (0, 9), (9, 0)][label]
            img[r : r + 7, c : c + 7] = np.maximum(img[r : r + 7, c : c + 7], bright)
            sink.write({"__key__": f"{name}{i:05d}", "png": _png(img), "cls": str(label).encode()})
    return str(folder / f"{name}-{{000000..000001}}.tar")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    train = write_tiny_shards(folder, "train", 60, seed=0)
    test = write_tiny_shards(folder, "test", 30, seed=1)
    torch.manual_seed(3)
    run = folder / "run"
    export_encoder(DIMEncoder(ModelConfig(**TINY)), run, dict(TINY))
    return run, train, test


def check_structure(results: dict, queries: int) -> None:
    """Every (model, view) has every probe, and each accuracy is a count of the queries."""
    assert set(results) == {"dim", "random_init", "pixels"}
    assert set(results["dim"]) == set(results["random_init"]) == {"conv", "fc", "y"}
    assert set(results["pixels"]) == {"pixels"}
    for views in results.values():
        for probes in views.values():
            assert set(probes) == {"linear", "mlp", "knn"}
            for a in probes.values():
                assert isinstance(a, float) and 0.0 <= a <= 1.0, probes
                assert abs(queries * a - round(queries * a)) < 1e-6, (a, queries)


def test_evaluate_cli_end_to_end(tiny_run, tmp_path, capsys):
    from pipeline.evaluate import main

    run, train, test = tiny_run
    out = tmp_path / "res" / "eval.json"
    # the exported file path and the run folder are both accepted
    assert (
        main(
            [
                "--checkpoint",
                str(run / "model.safetensors"),
                "--train-shards",
                train,
                "--test-shards",
                test,
                "--json",
                str(out),
                "--batch-size",
                "16",
                "--knn-k",
                "5",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    check_structure(results, queries=30)
    assert results["pixels"]["pixels"]["linear"] >= 0.9  # the corner squares are easy
    table = capsys.readouterr().out
    assert "random_init" in table and "pixels" in table and "%" in table
    # same data, same seed: same numbers from the run folder
    again = tmp_path / "again.json"
    assert (
        main(
            [
                "--checkpoint",
                str(run),
                "--train-shards",
                train,
                "--test-shards",
                test,
                "--json",
                str(again),
                "--batch-size",
                "16",
                "--knn-k",
                "5",
            ]
        )
        == 0
    )
    assert json.loads(again.read_text()) == results


def test_evaluate_reports_the_code_prior_of_the_test_images(tiny_run, tmp_path, capsys):
    """The line under the table and --prior-json are pipeline.eval.prior on the dim
    encoder's (mu, logvar) of the first --limit-test test images, recomputed here from
    the exported encoder. Catches: the train images (or the random-init twin) measured,
    logvar taken from another model or missing, --limit-test ignored, the line or the
    file not written, the logvar leaking into the probed views or the --json table."""
    from pipeline.eval.prior import prior_fit
    from pipeline.evaluate import main
    from pipeline.share.export import load_encoder

    run, train, test = tiny_run
    out, prior = tmp_path / "eval.json", tmp_path / "p" / "prior.json"
    args = ["--checkpoint", str(run), "--train-shards", train, "--test-shards", test]
    args += ["--json", str(out), "--prior-json", str(prior), "--limit-test", "20"]
    assert main([*args, "--probes", "knn", "--knn-k", "5", "--batch-size", "8"]) == 0
    stdout = capsys.readouterr().out
    written = json.loads(prior.read_text())
    assert set(json.loads(out.read_text())["dim"]) == {"conv", "fc", "y"}

    encoder = load_encoder(run).eval()
    mus, logvars = [], []
    with torch.no_grad():
        for batch in eval_loader(test, batch_size=16, img_size=16, in_chans=3):
            code = encoder(batch["image"].float())
            mus.append(code.mu)
            logvars.append(code.logvar)
    mu, logvar = torch.cat(mus)[:20], torch.cat(logvars)[:20]
    by_hand = prior_fit(mu, logvar)
    assert written == pytest.approx(by_hand.as_dict(), rel=1e-4)
    assert written["images"] == 20 and written["dims"] == TINY["code_dim"]
    assert written["kl_nats"] > 0 and written["aggregate_kl_nats"] > 0
    assert prior_fit(torch.cat(mus)[20:], torch.cat(logvars)[20:]).kl_nats != pytest.approx(
        written["kl_nats"], rel=1e-3
    )  # the other test images give another figure: the limit is honoured
    [line] = [row for row in stdout.splitlines() if row.startswith("code prior")]
    assert f"E[KL] {by_hand.kl_nats:.2f} nats" in line and "D=8" in line and "N=20" in line
    assert f"{by_hand.aggregate_kl_nats:.2f} nats" in line


def test_evaluate_cli_missing_checkpoint_is_one_clear_error(tmp_path, capsys):
    from pipeline.evaluate import main

    assert main(["--checkpoint", str(tmp_path), "--train-shards", "x", "--test-shards", "y"]) == 2
    assert "no exported encoder" in capsys.readouterr().err


def test_online_probe_reports_the_offline_maths(tiny_run, tmp_path):
    """Catches: another view or k than asked, bank and queries mixed up, labels out of
    step with the images (then near chance on the easy squares)."""
    from pipeline.config import load_config
    from pipeline.eval.online import ONLINE, online_probe

    _run, train, test = tiny_run
    cfg = load_config(
        None,
        [
            f"data.train_shards={train}",
            f"data.val_shards={test}",
            "model.img_size=16",
            "model.backbone=test_resnet",
        ],
    )
    torch.manual_seed(0)
    enc = DIMEncoder(ModelConfig(**TINY)).train()
    out = online_probe(enc, cfg, "cpu", settings=replace(ONLINE, k=5))
    assert set(out) == {"probe/knn", "probe/linear"} and enc.training
    # The corner of the bright square shows through even random conv features.
    assert out["probe/knn"] > 0.9 and out["probe/linear"] > 0.9, out
    # On faint squares (accuracies 0.4-0.8, depending on view and k), the online figure
    # is the offline maths on the same images: the number evaluate reports.
    train = write_tiny_shards(tmp_path, "faint_train", 60, seed=0, bright=50)
    test = write_tiny_shards(tmp_path, "faint_test", 30, seed=1, bright=50)
    cfg.data.train_shards, cfg.data.val_shards = train, test
    out = online_probe(enc, cfg, "cpu", settings=replace(ONLINE, k=5))
    views = {}
    for name, spec in (("bank", train), ("query", test)):
        loader = eval_loader(spec, batch_size=16, img_size=16, in_chans=3)
        feats, labels = extract_features({"m": enc}, loader)
        views[name] = feats["m"]["conv"], labels
    (bank, bank_y), (query, query_y) = views["bank"], views["query"]
    assert (
        out["probe/knn"]
        == knn_accuracy(bank, bank_y, query, query_y, k=5, temperature=ONLINE.temperature)
        < 0.9
    )
    assert all(abs(30 * v - round(30 * v)) < 1e-6 for v in out.values())
    cfg.data.val_shards = ""
    assert online_probe(enc, cfg, "cpu") == {}


# ------------------------------------------------------------------ plots


def test_plot_metrics_writes_png(tmp_path):
    """One 260 px band per metric group logged (MI, KL, loss terms, probe: 800 x 1040 at
    100 dpi), each group's curves in its own band in matplotlib's colour cycle (two in MI
    and loss, one in KL and probe), and the KL band alone changes when only kl does; the
    empty plot is one band with a note and no curve. Catches: a group dropped or merged,
    keys sorted into the wrong panel, a curve drawn from another key, a blank figure."""
    from pipeline.share.plots import plot_metrics

    def rows(kl):
        return [
            {
                "step": s,
                "loss": -s / 10,
                "loss/local": -s / 20,
                "kl": kl(s),
                "mi/global/infonce": s / 5,
                "mi/local/infonce": s / 7,
                **({"probe/knn": 0.1 * s} if s % 2 == 0 else {}),
            }
            for s in range(1, 8)
        ]

    def render(name, lines):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn": ')
        out = plot_metrics(path, tmp_path / "plots" / f"{name}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return np.asarray(Image.open(out).convert("RGB"))

    def curves(band):  # pixels of the first and the second colour of the cycle
        return tuple(int((band == rgb).all(-1).sum()) for rgb in ((31, 119, 180), (255, 127, 14)))

    image = render("rising", rows(lambda s: 1.0 + s))
    assert image.shape == (4 * 260, 800, 3)
    bands = [curves(image[i * 260 : (i + 1) * 260]) for i in range(4)]
    assert [(first > 200, second > 200) for first, second in bands] == [
        (True, True),  # mi/global, mi/local
        (True, False),  # kl
        (True, True),  # loss, loss/local
        (True, False),  # probe/knn
    ], bands
    falling = render("falling", rows(lambda s: 9.0 - s))  # the same range, kl reversed
    changed = np.nonzero((falling != image).any(-1).any(-1))[0]
    assert changed.size and changed.min() >= 260 and changed.max() < 520, changed
    empty = np.asarray(Image.open(plot_metrics(tmp_path / "missing.jsonl", tmp_path / "e.png")))
    assert empty.shape[:2] == (260, 800) and curves(empty[..., :3]) == (0, 0)
    assert (empty[..., :3] < 64).all(-1).sum() > 100  # the note's text


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        self.finished = True


class FakeWandb:
    """Stands in for the ``wandb`` module: records ``init`` arguments and the run's calls."""

    def __init__(self, run=None):
        self.run, self.inits = run, []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.run = FakeRun()
        return self.run

    @staticmethod
    def Table(columns, data):  # wandb's spelling
        return {"columns": columns, "data": data}


RESULTS = {"dim": {"y": {"linear": 0.5, "knn": 0.25}}, "pixels": {"pixels": {"linear": 0.75}}}
FLAT = {"eval/dim/y/linear": 0.5, "eval/dim/y/knn": 0.25, "eval/pixels/pixels/linear": 0.75}


def test_wandb_logging_joins_the_training_run(tmp_path, monkeypatch):
    """Catches: a new run instead of the training run's id, a lost project, cells missing
    from the summary or the table, the run left open (or an active run closed)."""
    from pipeline.evaluate import _training_run, log_to_wandb

    (tmp_path / "wandb_id.txt").write_text("abc123\n")
    (tmp_path / "config.yaml").write_text("wandb:\n  project: myproj\n  entity: ''\n")
    assert _training_run(tmp_path / "nowhere") == {}
    monkeypatch.setenv("WANDB_MODE", "offline")
    fake = FakeWandb()
    monkeypatch.setattr("pipeline.evaluate.wandb", fake)
    log_to_wandb(RESULTS, run_dir=tmp_path)  # no active run and no --wandb: nothing
    assert fake.inits == [] and fake.run is None

    log_to_wandb(RESULTS, start=True, run_dir=tmp_path)
    assert fake.inits == [
        {
            "mode": "offline",
            "project": "myproj",
            "job_type": "eval",
            "id": "abc123",
            "resume": "allow",
            "dir": str(tmp_path),
        }
    ]
    run = fake.run
    [row] = run.logged
    assert {k: v for k, v in row.items() if k != "eval/table"} == FLAT
    assert row["eval/table"]["columns"] == ["model", "view", "probe", "accuracy"]
    assert sorted(row["eval/table"]["data"]) == [
        ["dim", "y", "knn", 0.25],
        ["dim", "y", "linear", 0.5],
        ["pixels", "pixels", "linear", 0.75],
    ]
    assert run.summary == FLAT and run.finished

    active = FakeRun()  # inside a training run: log there, leave it open
    fake = FakeWandb(run=active)
    monkeypatch.setattr("pipeline.evaluate.wandb", fake)
    log_to_wandb(RESULTS)
    assert fake.inits == [] and active.summary == FLAT and not active.finished
    assert len(active.logged) == 1

    from pipeline.eval.prior import prior_fit

    fit = prior_fit(torch.ones(2, 3), torch.zeros(2, 3))  # with the prior measures
    active = FakeRun()
    monkeypatch.setattr("pipeline.evaluate.wandb", FakeWandb(run=active))
    log_to_wandb(RESULTS, prior=fit)
    measures = {f"eval/prior/{k}": v for k, v in fit.as_dict().items()}
    assert active.summary == FLAT | measures and measures["eval/prior/kl_nats"] == 1.5
    assert len(active.logged[0]["eval/table"]["data"]) == 3  # the table keeps the cells alone


# ------------------------------------------ fair random-init baseline, MLP probe, conv grid view


def test_mlp_probe_solves_what_a_linear_probe_cannot():
    from pipeline.eval.probes import mlp_probe

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1200, 2, generator=g) * 2 - 1
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR of the signs: not linearly separable
    lin = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:]).accuracy
    mlp = mlp_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=40)
    assert lin < 0.7 and mlp.accuracy > 0.9, (lin, mlp)
    again = mlp_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=40)
    assert again.accuracy == mlp.accuracy  # seeded


def test_mlp_probe_picks_the_input_dropout_its_validation_split_prefers():
    """The grid's result is the single-value fit with the best validation accuracy,
    scored the same. Catches a choice made on the test set, the grid ignored, or fits
    that share state (the second differing from a fit on its own). XOR of two inputs,
    5 epochs: dropping half of the inputs slows the fit, so validation prefers 0."""
    from pipeline.eval.probes import mlp_probe

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1200, 2, generator=g) * 2 - 1
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    args = (x[:1000], y[:1000], x[1000:], y[1000:])
    grid = mlp_probe(*args, input_dropout=(0.0, 0.5), epochs=5)
    alone = {p: mlp_probe(*args, input_dropout=(p,), epochs=5) for p in (0.0, 0.5)}
    assert alone[0.0].val_accuracy > alone[0.5].val_accuracy, alone
    assert grid.input_dropout == 0.0
    assert (grid.accuracy, grid.epoch, grid.val_accuracy) == (
        alone[0.0].accuracy,
        alone[0.0].epoch,
        alone[0.0].val_accuracy,
    )


def test_random_init_batchnorm_statistics_come_from_the_data():
    from pipeline.eval.features import recalibrate_batchnorm

    torch.manual_seed(0)
    enc = DIMEncoder(ModelConfig(**TINY))
    images = torch.rand(64, 3, 16, 16) * 3 + 2  # far from N(0, 1): initial stats are wrong
    first = enc.backbone.bn1
    assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
    batches = [{"image": images[i : i + 16]} for i in range(0, 64, 16)]
    assert recalibrate_batchnorm(enc, batches) == 64
    with torch.no_grad():
        pre = enc.backbone.conv1(images)
    assert torch.allclose(first.running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-2, rtol=1e-2)
    assert torch.allclose(first.running_var, pre.var(dim=(0, 2, 3)), rtol=1e-2)
    assert not enc.training
    # Recalibrated, the first BatchNorm output is normalised; with the initial statistics
    # (mean 0, variance 1) it would be off by the raw activation means.
    with torch.no_grad():
        out = first(pre)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-2
    assert pre.mean(dim=(0, 2, 3)).abs().max() > 0.1


def test_conv_view_keeps_a_small_grid():
    from pipeline.eval.features import conv_grid

    assert conv_grid(torch.randn(2, 256, 4, 4)).shape == (2, 4096)  # the paper's conv view
    assert conv_grid(torch.randn(2, 512, 1, 1)).shape == (2, 512)
    assert conv_grid(torch.randn(2, 2048, 7, 7)).shape == (2, 2 * 2 * 2048)
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(conv_grid(fmap), fmap.flatten(1))  # 4x4 is kept as is, not averaged


def test_run_probes_dispatches_each_name_to_its_probe():
    """The table behind evaluate and the online probe: a name wired to the wrong probe,
    or settings not passed through, changes these numbers."""
    from pipeline.eval.probes import ProbeSettings, mlp_probe, run_probes

    x, y = blobs(240, spread=0.8)
    s = ProbeSettings(k=3, temperature=0.5, l2_grid=(1e-1,), max_iter=50, seed=2)
    got = run_probes(["knn", "linear", "mlp"], x[:160], y[:160], x[160:], y[160:], s)
    assert list(got) == ["knn", "linear", "mlp"]
    assert got["knn"].accuracy == knn_accuracy(
        x[:160], y[:160], x[160:], y[160:], k=3, temperature=0.5
    )
    lin = linear_probe(x[:160], y[:160], x[160:], y[160:], l2_grid=(1e-1,), max_iter=50, seed=2)
    assert got["linear"] == (lin.accuracy, "l2=0.1")
    assert got["mlp"].accuracy == mlp_probe(x[:160], y[:160], x[160:], y[160:], seed=2).accuracy


# ------------------------------------------------------------------ mistakes, before any work


def _unlabelled_shards(folder) -> str:
    import webdataset as wds

    with wds.TarWriter(str(folder / "nolabel.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"u{i}", "png": _png(np.zeros((16, 16, 3), np.uint8))})
    return str(folder / "nolabel.tar")


@pytest.mark.parametrize(
    "change, says",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--knn-k", "0"], "--knn-k must be >= 1"),
        (["--knn-temperature", "0"], "--knn-temperature must be > 0"),
        (["--limit-train", "0"], "--limit-train must be >= 1"),
        (["--device", "cuda"], "no CUDA device"),
        (["--device", "tpu9"], "is not a torch device"),
        (["--json", "/proc/sys/x/eval.json"], "--json"),
        (["--json", "DIR"], "is a folder"),
        (["--prior-json", "DIR"], "--prior-json"),
        (["--test-shards", "NOLABEL"], "have no label"),
        (["--train-shards", "MISSING"], "--train-shards"),
    ],
)
def test_evaluate_mistakes_are_one_line_in_seconds(tiny_run, tmp_path, capsys, change, says):
    """Bugs caught: options unchecked; shards without labels crashed after every feature
    was extracted (index -1 is out of bounds); an unwritable --json found after the probes;
    --device cuda on a CPU machine a traceback. Each is now one line, exit 2, in seconds,
    with nothing written."""
    import time

    from pipeline.evaluate import main

    if change == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run, train, test = tiny_run
    swap = {"DIR": str(tmp_path), "NOLABEL": _unlabelled_shards(tmp_path)}
    swap["MISSING"] = str(tmp_path / "nothing-*.tar")
    change = [swap.get(c, c) for c in change]
    args = {"--checkpoint": str(run), "--train-shards": train, "--test-shards": test}
    for key, value in zip(change[::2], change[1::2], strict=True):
        args[key] = value
    before = sorted(p.name for p in run.iterdir())
    start = time.perf_counter()
    assert main([x for kv in args.items() for x in kv]) == 2
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dim-evaluate: error: ") and says in err[0], err
    assert took < 10, took  # before any feature: the full evaluation takes far longer
    assert sorted(p.name for p in run.iterdir()) == before


def test_an_ad_hoc_evaluation_leaves_the_card_alone(tiny_run, tmp_path, capsys):
    """Bug caught: every evaluation, even k-NN only on unrelated shards, overwrote the
    model card's table. It is written for the run's own held-out data (data.val_shards in
    the run's config.yaml) or with --update-card."""
    from pipeline.evaluate import main
    from pipeline.share.card import get_block

    run, train, test = tiny_run
    card = run / "README.md"
    card.write_text("# card\n")
    common = ["--checkpoint", str(run), "--train-shards", train, "--probes", "knn"]
    common += ["--no-baselines", "--no-neighbours"]
    assert main([*common, "--test-shards", test]) == 0
    assert card.read_text() == "# card\n" and "left alone" in capsys.readouterr().err
    (run.parent / "config.yaml").write_text(f"data:\n  val_shards: '{test}'\n")
    try:
        assert main([*common, "--test-shards", test]) == 0
        assert get_block(card.read_text(), "evaluation")
    finally:
        (run.parent / "config.yaml").unlink()
    card.write_text("# card\n")
    assert main([*common, "--test-shards", test, "--update-card"]) == 0
    assert get_block(card.read_text(), "evaluation")
