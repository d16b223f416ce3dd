"""The full DIM objective on timm backbones, on real images, and with bad configuration."""

import math

import pytest
import torch
from train_helpers import TINY, metrics, write_shards

from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.schema import ModelConfig
from pipeline.models.encoder import DIMEncoder
from pipeline.objective.model import build_model
from pipeline.train.loop import train

BACKBONES = [  # (name, local_layer, backbone_kwargs): a ResNet, a ConvNeXt, an EfficientNet, ViTs
    ("test_resnet", 1, {}),
    ("test_convnext", 1, {}),
    ("test_efficientnet", 2, {}),
    ("test_vit", -1, {}),
    ("vit_tiny_patch16_224", 3, {"patch_size": 8, "depth": 4}),
]


@pytest.mark.parametrize("backbone,local_layer,kwargs", BACKBONES)
@pytest.mark.parametrize(
    "estimator,global_input,global_critic,local_critic",
    [
        ("infonce", "pooled", "dot", "dot"),
        ("jsd", "mu", "concat", "concat"),
        ("dv", "pooled", "concat", "dot"),
    ],
)
def test_loss_finite_and_gradient_reaches_every_parameter(
    backbone, local_layer, kwargs, estimator, global_input, global_critic, local_critic
):
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            f"model.backbone={backbone}",
            f"model.local_layer={local_layer}",
            f"loss.estimator={estimator}",
            f"loss.global_input={global_input}",
            f"loss.global_critic={global_critic}",
            f"loss.local_critic={local_critic}",
            "model.fc_dim=64",
        ],
    )
    cfg.model.backbone_kwargs = kwargs
    model = build_model(cfg)
    loss, terms = model(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)
    assert {f"mi/global/{estimator}", f"mi/local/{estimator}", "kl", "loss"} <= set(terms)
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no finite gradient for {missing[:5]}"
    touched = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert any(n.startswith("encoder.backbone.") for n in touched)
    assert any(n.startswith("objective.local_critic.") for n in touched)


@pytest.mark.parametrize(
    "backbone,size,local_layer",
    [("test_resnet", 224, 2), ("test_vit", 224, -1), ("test_convnext", 32, 0)],
)
def test_encoder_shapes(backbone, size, local_layer):
    enc = DIMEncoder(
        ModelConfig(backbone, code_dim=16, fc_dim=32, local_layer=local_layer, img_size=size)
    ).train()
    out = enc(torch.randn(2, 3, size, size))
    n, c, h, w = out.local.shape
    assert (n, c) == (2, enc.local_channels) and h > 1 and w > 1
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 16)
    assert not torch.equal(out.z, out.mu)  # reparameterised sample in training
    enc.eval()
    out = enc(torch.randn(2, 3, size, size))
    assert torch.equal(out.z, out.mu)


def test_the_second_views_local_map_enters_the_loss():
    """Fails if the second view were ignored (each code scored against its own view's
    map only): then changing the second view's local map alone would change nothing."""
    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.backbone=test_resnet", "model.fc_dim=32"]))
    model.eval()
    with torch.no_grad():
        for p in model.objective.local_critic.parameters():  # scores of order 1, not ~0
            p.mul_(4.0)
        first, second = (
            model.encoder(torch.randn(4, 3, 32, 32)),
            model.encoder(torch.randn(4, 3, 32, 32)),
        )
        loss, terms = model.objective(first, second)
        moved = second._replace(local=second.local + torch.randn_like(second.local))
        loss_moved, terms_moved = model.objective(first, moved)
        alone, _ = model.objective(first)
    assert torch.isfinite(loss) and torch.isfinite(loss_moved)
    assert (terms_moved["mi/local/infonce"] - terms["mi/local/infonce"]).abs() > 1e-3
    assert (loss - alone).abs() > 1e-3  # two views are not the first view alone


def test_three_views_score_every_code_against_every_other_views_features():
    """With V views the local term is the mean of the V (V - 1) ordered pairs (code of
    view c, features of view i != c), each pair the two-sample estimate ``mi_estimate``
    gives; the KL is the mean over views. Fails if a pair were dropped or doubled, or a
    code met its own view's map."""
    from pipeline.objective.estimators import gaussian_kl
    from pipeline.objective.loss import mi_estimate

    torch.manual_seed(0)
    cfg = load_config(
        None, ["model.backbone=test_resnet", "model.fc_dim=32", "loss.score_penalty=0"]
    )
    model = build_model(cfg)
    model.eval()
    critic, tclip = model.objective.local_critic, cfg.loss.tclip
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(4.0)
        views = [model.encoder(torch.randn(4, 3, 32, 32)) for _ in range(3)]
        loss, terms = model.objective(*views)
        pairs = [
            mi_estimate("infonce", critic, views[i].local, views[c].z, tclip=tclip)
            for c in range(3)
            for i in range(3)
            if i != c
        ]
        kl = sum(gaussian_kl(v.mu, v.logvar).mean() for v in views) / 3
    expected = sum(p.bound for p in pairs) / 6
    assert torch.allclose(terms["mi/local/infonce"], expected, atol=1e-6)
    assert torch.allclose(loss, -expected, atol=1e-6)  # beta 1, gamma 0 by default
    assert torch.allclose(terms["kl"], kl, atol=1e-5)
    own = mi_estimate("infonce", critic, views[0].local, views[0].z, tclip=tclip)
    assert (own.bound - pairs[0].bound).abs() > 1e-3  # a code's own map scores otherwise


@pytest.mark.parametrize("count", [1, 2, 4])
def test_infonce_gathers_each_views_image_side_once(monkeypatch, count):
    """Cross-device negatives cost one all-gather per view and critic, not one per
    (code, other view) pair: four views would otherwise gather 12 times, not 4."""
    import pipeline.objective.loss as objective

    gathered = []
    monkeypatch.setattr(objective, "gather_with_grad", lambda x: gathered.append(x) or x)
    cfg = load_config(
        None,
        [
            "model.backbone=test_resnet",
            "model.fc_dim=32",
            "loss.global_critic=dot",
            "loss.alpha=0.5",
        ],
    )
    model = build_model(cfg)
    model.objective(*(model.encoder(torch.randn(2, 3, 32, 32)) for _ in range(count)))
    assert len(gathered) == 2 * count  # global and local critics, each view once


@pytest.mark.parametrize(
    "estimator,steps,margin",
    [  # rises measured in this loop: infonce +0.24 / dv +0.19 (local), jsd +0.06 (local)
        ("infonce", 150, 0.15),
        ("dv", 150, 0.12),
        ("jsd", 300, 0.03),  # JSD lives in [0, log 2] and learns from one negative per positive
    ],
)
def test_training_on_digits_raises_the_mi_estimates(tmp_path, estimator, steps, margin):
    """The real training loop (``pipeline.train.loop``: shards, device augmentation, the step,
    the log) on digits: the MI estimates rise, and stay under their bounds. Objective and
    critic widths pinned (global + local, gamma 0.1, 256 / 512; the margins were measured
    so): the test is about the estimators, not the defaults."""
    shards = write_shards(tmp_path / "shards", n=256, per_shard=256)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={out}",
            f"loss.estimator={estimator}",
            "loss.critic_dim=256",
            "loss.critic_hidden=512",
            "loss.global_critic=dot",
            "loss.alpha=0.5",
            "loss.gamma=0.1",
            "train.batch_size=32",
            f"train.max_steps={steps}",
            "train.log_every=10",
            "train.lr=1e-3",
            f"train.save_every={steps}",
            "data.augment=none",
            "wandb.mode=disabled",
        ],
    )
    train(cfg)
    log = metrics(out)
    assert [row["step"] for row in log] == list(range(10, steps + 1, 10))
    for scope in ("global", "local"):
        key = f"mi/{scope}/{estimator}"
        start = log[0][key]
        end = sum(row[key] for row in log[-3:]) / 3  # the last three logged values
        assert end > start + margin, (key, start, end)
        if estimator == "infonce":
            assert end <= math.log(32 * (1 if scope == "global" else 64))
        if estimator == "jsd":
            assert end <= math.log(2)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loss.estimator=nce", "loss.estimator"),
        ("loss.global_critic=bilinear", "loss.global_critic"),
        ("loss.global_input=features", "loss.global_input"),
        ("loss.local_critic=mlp", "loss.local_critic"),
        ("model.backbone=resnet_does_not_exist", "backbone"),
        ("model.local_layer=42", "local_layer"),
        ("train.batchsize=3", "train.batch_size"),
    ],
)
def test_bad_configuration_is_one_clear_error(override, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model(load_config(None, [override]))


def test_two_views_score_each_code_against_the_other_views_features():
    """Fails if the second view were ignored, or used in one direction only."""
    from pipeline.objective.loss import mi_estimate

    torch.manual_seed(0)
    model = build_model(
        load_config(
            None,
            [
                "model.backbone=test_resnet",
                "model.fc_dim=32",
                "loss.global_critic=none",
                "loss.critic_dim=256",
                "loss.critic_hidden=512",
            ],
        )
    ).eval()
    with torch.no_grad():  # scores of order 1, so that the pairings give visibly different values
        for p in model.objective.local_critic.parameters():
            p.mul_(4.0)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    loss, terms = model(x1, x2)
    # By hand: code of view 1 against the local map of view 2, and the reverse.
    e1, e2 = model.encoder(x1), model.encoder(x2)
    critic, clip = model.objective.local_critic, model.objective.cfg.tclip
    by_hand = (
        mi_estimate("infonce", critic, e2.local, e1.z, tclip=clip).nats
        + mi_estimate("infonce", critic, e1.local, e2.z, tclip=clip).nats
    ) / 2
    assert torch.allclose(terms["mi/local/infonce"], by_hand, atol=1e-5)
    # Same-view pairing (the second view ignored) gives another value.
    same = mi_estimate("infonce", critic, e1.local, e1.z, tclip=clip).nats
    assert (same - by_hand).abs() > 1e-3, (same, by_hand)
    # Symmetric in the two views, and the second view receives gradient.
    assert torch.allclose(model(x2, x1)[0], loss, atol=1e-5)
    x2.requires_grad_(True)
    model(x1, x2)[0].backward()
    assert x2.grad.abs().sum() > 0


WITH_GLOBAL = [
    "model.backbone=test_resnet",
    "model.fc_dim=32",
    "loss.global_critic=dot",
    "loss.alpha=0.5",
]


def test_clipped_fraction_is_logged_and_counts_scores_beyond_tclip():
    torch.manual_seed(0)
    model = build_model(load_config(None, [*WITH_GLOBAL, "loss.tclip=1e-3"]))
    _, terms = model(torch.randn(4, 3, 32, 32))
    assert terms["clip_frac/local"] > 0.9  # almost every score is beyond a tiny clip
    model = build_model(load_config(None, [*WITH_GLOBAL, "loss.tclip=1e6"]))
    _, terms = model(torch.randn(4, 3, 32, 32))
    assert terms["clip_frac/local"] == 0 and terms["clip_frac/global"] == 0


def test_score_penalty_is_penalty_times_mean_squared_raw_score():
    """The term's value and its gradient. Catches: the penalty logged but not added to
    the loss, taken on the clipped scores instead of the raw ones, or detached."""
    from pipeline.objective.estimators import clip_scores

    torch.manual_seed(0)

    def objective(penalty: float):
        overrides = [
            "model.backbone=test_resnet",
            "model.fc_dim=32",
            "loss.global_critic=none",
            "loss.tclip=1.0",
            f"loss.score_penalty={penalty}",
        ]
        return build_model(load_config(None, overrides))

    model = objective(0.5)
    plain = objective(0.0).objective
    with torch.no_grad():  # raw scores well beyond tclip, where clipped and raw differ
        for p in model.objective.local_critic.parameters():
            p.mul_(4.0)
    plain.load_state_dict(model.objective.state_dict())
    with torch.no_grad():
        out = model.encoder.eval()(torch.randn(6, 3, 32, 32))
    critic = model.objective.local_critic
    raw = critic.pairwise(critic.embed_a(out.local), critic.embed_b(out.z))
    by_hand = raw.pow(2).mean()
    assert (clip_scores(raw, 1.0).pow(2).mean() - by_hand).abs() > 0.1 * by_hand  # it matters

    loss, terms = model.objective(out)
    loss0, terms0 = plain(out)
    torch.testing.assert_close(terms["score_sq"], by_hand.detach())
    torch.testing.assert_close(terms["loss/score_penalty"], 0.5 * by_hand.detach())
    torch.testing.assert_close(loss - loss0, 0.5 * by_hand.detach(), rtol=1e-4, atol=1e-5)
    assert "loss/score_penalty" not in terms0
    params = list(critic.parameters())
    extra = [
        a - b
        for a, b in zip(
            torch.autograd.grad(loss, params),
            torch.autograd.grad(loss0, list(plain.local_critic.parameters())),
            strict=True,
        )
    ]
    expected = torch.autograd.grad(0.5 * by_hand, params)
    for got, want in zip(extra, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert sum(float(g.abs().sum()) for g in expected) > 0


def test_sampled_locations_are_distinct_locations_of_their_own_image():
    """Catches: locations shared across the batch's images by accident of indexing
    (an image given another image's vectors), repeats within an image, a wrong count."""
    from pipeline.objective.loss import sample_locations

    torch.manual_seed(0)
    local = torch.randn(5, 7, 4, 4)
    picked = sample_locations(local, 6)
    assert picked.shape == (5, 7, 6, 1)
    for n in range(5):
        own = local[n].flatten(1).t()  # (16 locations, 7 channels)
        hits = [(own == v).all(dim=1).nonzero().flatten().tolist() for v in picked[n, :, :, 0].t()]
        assert all(len(h) == 1 for h in hits), hits  # each one is a location of image n
        assert len({h[0] for h in hits}) == 6  # without replacement
    # Drawn per image: the images do not all get the same positions.
    positions = [
        sorted(
            (local[n].flatten(1).t() == v).all(dim=1).nonzero().item()
            for v in picked[n, :, :, 0].t()
        )
        for n in range(5)
    ]
    assert len({tuple(p) for p in positions}) > 1
    assert sample_locations(local, 0) is local and sample_locations(local, 16) is local


def test_local_positions_scores_only_the_drawn_locations():
    """The loss with loss.local_positions=k is the loss on the k drawn locations: same
    seed, same draw, by hand. Fails if the option were ignored (all 64 locations)."""
    from pipeline.objective.loss import mi_estimate, sample_locations

    overrides = ["model.backbone=test_resnet", "model.fc_dim=32", "loss.global_critic=none"]
    torch.manual_seed(0)
    model = build_model(load_config(None, [*overrides, "loss.local_positions=3"])).eval()
    with torch.no_grad():  # scores of order 1, so that subsets give visibly different values
        for p in model.objective.local_critic.parameters():
            p.mul_(4.0)
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(1)
    _, terms = model(x)
    out = model.encoder(x)
    critic, clip = model.objective.local_critic, model.objective.cfg.tclip
    torch.manual_seed(1)
    by_hand = mi_estimate("infonce", critic, sample_locations(out.local, 3), out.z, tclip=clip)
    assert torch.allclose(terms["mi/local/infonce"], by_hand.nats, atol=1e-5)
    every = mi_estimate("infonce", critic, out.local, out.z, tclip=clip).nats
    assert (every - by_hand.nats).abs() > 1e-3
