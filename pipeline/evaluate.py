"""Evaluate an exported encoder: frozen features -> linear probe and weighted k-NN.

    python -m pipeline.evaluate --checkpoint RUN_DIR_OR_MODEL_FOLDER \\
        --train-shards 'data/train-{000000..000003}.tar' --test-shards data/test.tar \\
        [--json results.json] [--prior-json prior.json] [--wandb]

Three models share one table, so the number that matters (what pretraining bought)
is read against its baselines: ``dim`` (the checkpoint), ``random_init`` (the same
architecture, seeded random weights, with BatchNorm statistics re-estimated on the
probe's training images: a random network run with BatchNorm's initial statistics is a
broken baseline, not a fair one) and ``pixels`` (flattened, normalised images).
Views ``conv``/``fc``/``y`` are described in ``pipeline.eval.features``; probes are
``linear`` (L-BFGS logistic regression), ``mlp`` (the DIM paper's 200-unit MLP) and
``knn`` (weighted cosine k-NN). The JSON is ``{model: {view: {probe: accuracy}}}``
with accuracies as fractions in [0, 1]. The table also goes into the export's model
card (its ``README.md``), replacing an earlier one.

Beside the table, a picture (``neighbours.png`` in the model folder unless
``--neighbours`` says where, linked from the card): held-out queries with their nearest
training images by the ``dim`` conv features and by raw pixels, wrong classes framed red
(``pipeline.eval.neighbours``).

Under the table, one line on how close the ``dim`` code of the test images is to the
prior N(0, I) (``pipeline.eval.prior``: mean KL, KL of the aggregate code's Gaussian
fit, per-dimension mean/std, active dimensions), also written by ``--prior-json``. It
has a file of its own because the ``--json`` layout is relied on as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import wandb
import yaml

from pipeline.core.cli import one_line_mistakes
from pipeline.core.errors import ConfigError
from pipeline.core.files import CONFIG_FILE, PICTURE, WANDB_ID, check_output_folder
from pipeline.data.loaders import (
    eval_loader,
)
from pipeline.data.shards import read_manifest, resolve_shards
from pipeline.eval.features import (
    CONV_SOURCES,
    LOGVAR,
    PIXELS,
    extract_features,
    recalibrate_batchnorm,
)
from pipeline.eval.neighbours import Picture, neighbour_picture
from pipeline.eval.prior import PriorFit, prior_fit
from pipeline.eval.probes import PROBES, ProbeSettings, run_probes
from pipeline.models.encoder import DIMEncoder, build_encoder
from pipeline.share.card import update_evaluation
from pipeline.share.export import find_export, load_encoder, read_export_meta
from pipeline.share.tracking import EVAL_TABLE, wandb_mode

__all__ = [
    "Evaluation",
    "evaluate",
    "find_export",
    "format_table",
    "main",
    "probe_every_view",
    "random_like",
]

Results = dict[str, dict[str, dict[str, float]]]
SETTINGS = ProbeSettings()  # the offline evaluation runs the probes at their defaults
PICTURE_KEY = "eval/neighbours"  # its W&B key
PICTURE_VIEW = "conv"  # the dim view whose neighbours the picture shows
PRIOR_KEY = "eval/prior"  # W&B keys eval/prior/<measure>


class Evaluation(NamedTuple):
    results: Results  # {model: {view: {probe: accuracy}}}
    prior: PriorFit  # the dim code of the test images against N(0, I)


def random_like(meta: dict, seed: int = 0) -> DIMEncoder:
    """The exported architecture at a seeded random initialisation (the baseline)."""
    torch.manual_seed(seed)
    return build_encoder(meta)


def probe_every_view(
    train: dict[str, dict[str, torch.Tensor]],
    train_y: torch.Tensor,
    test: dict[str, dict[str, torch.Tensor]],
    test_y: torch.Tensor,
    probes: tuple[str, ...] = tuple(PROBES),
    settings: ProbeSettings = SETTINGS,
    log=print,
) -> Results:
    """``pipeline.eval.probes.run_probes`` on every (model, view) pair of feature tensors."""
    results: Results = {}
    probes = tuple(p for p in PROBES if p in probes)  # the table's order, whatever was asked
    for model, views in train.items():
        for view, feats in views.items():
            t0 = time.perf_counter()
            scores = run_probes(probes, feats, train_y, test[model][view], test_y, settings)
            results.setdefault(model, {})[view] = {p: s.accuracy for p, s in scores.items()}
            accuracies = " ".join(f"{p}={s.accuracy:.4f}" for p, s in scores.items())
            chosen = ", ".join(s.chosen for s in scores.values() if s.chosen)
            log(
                f"[evaluate] {model:>11s}/{view:<6s} dim={feats.shape[1]:5d} {accuracies} "
                f"({chosen}; {time.perf_counter() - t0:.1f}s)"
            )
    return results


def format_table(results: Results) -> str:
    """A plain-text table, one row per (model, view), accuracies in percent."""
    rows = [f"{'model':<12s} {'view':<7s} " + " ".join(f"{p:>7s}" for p in PROBES)]
    for model, views in results.items():
        for view, probes in views.items():
            cells = " ".join(
                f"{100 * probes[p]:6.2f}%" if p in probes else f"{'-':>7s}" for p in PROBES
            )
            rows.append(f"{model:<12s} {view:<7s} {cells}")
    return "\n".join(rows)


def _run_folder(path: Path | None) -> Path | None:
    """The run folder holding ``wandb_id.txt`` at or above ``path`` (an export sits in
    ``RUN/export`` or ``RUN/checkpoints/step_N/export``)."""
    if path is None or not path.exists():
        return None
    path = path.resolve()
    for folder in [path, *path.parents][:4]:
        if (folder / WANDB_ID).is_file():
            return folder
    return None


def _training_run(folder: Path | None) -> dict:
    """W&B id and project of the run that wrote ``folder`` (so eval joins that run)."""
    folder = _run_folder(folder)
    if folder is None:
        return {}
    found = {
        "id": (folder / WANDB_ID).read_text().strip(),
        "resume": "allow",
        "dir": str(folder),
    }
    if (folder / CONFIG_FILE).is_file():
        wb = (yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}).get("wandb") or {}
        found.update({k: wb[k] for k in ("project", "entity") if wb.get(k)})
    return found


def log_to_wandb(
    results: Results,
    *,
    start: bool = False,
    project: str = "dim-pretrain",
    run_dir: Path | None = None,
    picture: Path | None = None,
    prior: PriorFit | None = None,
) -> None:
    """Put the table in the active W&B run, or (``start``) in the training run that wrote
    ``run_dir`` when it has one, else a new ``eval`` run: one summary key per cell,
    ``eval/<model>/<view>/<probe>``, a table ``eval/table``, when given the prior
    measures as ``eval/prior/<measure>`` and the neighbour picture as an image
    ``eval/neighbours``."""

    run = wandb.run
    if run is None and not start:
        return
    if run is None:
        kwargs = {"project": project, "job_type": "eval", **_training_run(run_dir)}
        run = wandb.init(mode=wandb_mode("auto"), **kwargs)
    flat = {
        f"eval/{m}/{v}/{p}": acc
        for m, views in results.items()
        for v, probes in views.items()
        for p, acc in probes.items()
    }
    table = wandb.Table(
        columns=["model", "view", "probe", "accuracy"],
        data=[[*k.split("/")[1:], acc] for k, acc in flat.items()],
    )
    images = {PICTURE_KEY: wandb.Image(str(picture))} if picture else {}
    measures = {f"{PRIOR_KEY}/{k}": v for k, v in (prior.as_dict() if prior else {}).items()}
    run.log({**flat, **measures, EVAL_TABLE: table, **images})
    run.summary.update({**flat, **measures})
    if start:
        run.finish()


def _loader(spec: str, meta: dict, batch_size: int, workers: int):

    return eval_loader(
        spec,
        batch_size=batch_size,
        img_size=meta["img_size"],
        in_chans=meta["in_chans"],
        num_workers=workers,
    )


def _class_names(spec: str) -> list[str]:
    """Class names from a prepare manifest (the picture's captions); none for a pattern."""
    if spec.endswith(".json") and Path(spec).is_file():
        return read_manifest(spec).classes
    return []


def draw_neighbours(
    feats: dict, meta: dict, names: list[str], out: str | Path, conv_source: str
) -> Picture:
    """The neighbour picture from the extracted features: the ``dim`` conv view and the
    pixels, whose rows are also the images shown."""
    shape = (meta["in_chans"], meta["img_size"], meta["img_size"])
    (train, train_y), (test, test_y) = feats["train"], feats["test"]
    titles = {
        f"DIM {PICTURE_VIEW} features ({conv_source}), cosine": ("dim", PICTURE_VIEW),
        "raw pixels, cosine": (PIXELS, PIXELS),
    }
    return neighbour_picture(
        {t: train[m][v] for t, (m, v) in titles.items()},
        train_y,
        {t: test[m][v] for t, (m, v) in titles.items()},
        test_y,
        train[PIXELS][PIXELS].view(-1, *shape),
        test[PIXELS][PIXELS].view(-1, *shape),
        out,
        class_names=names,
    )


def evaluate(
    checkpoint: str | Path,
    train_shards: str,
    test_shards: str,
    *,
    batch_size: int = 256,
    settings: ProbeSettings = SETTINGS,
    device: str = "cpu",
    limit_train: int | None = None,
    limit_test: int | None = None,
    conv_source: str = "grid",
    num_workers: int = 0,
    probes: tuple[str, ...] = tuple(PROBES),
    baselines: bool = True,
    picture: str | Path | None = None,
    log=print,
) -> Evaluation:
    """Features of the checkpoint (and, with ``baselines``, of its random-init twin and
    the pixels) -> every probe, and the checkpoint's code on the test images against
    N(0, I); with ``picture``, the neighbour picture written there."""
    folder = find_export(checkpoint)
    meta = read_export_meta(folder)
    encoders = {"dim": load_encoder(folder).to(device)}
    if baselines:
        encoders["random_init"] = random_like(meta, settings.seed).to(device)
        t0 = time.perf_counter()
        seen = recalibrate_batchnorm(
            encoders["random_init"],
            _loader(train_shards, meta, batch_size, num_workers),
            device=device,
            limit=limit_train,
        )
        log(
            f"[evaluate] random_init: BatchNorm statistics re-estimated on {seen} probe-training "
            f"images ({time.perf_counter() - t0:.1f}s)"
        )
    feats = {}
    for split, spec, limit in (
        ("train", train_shards, limit_train),
        ("test", test_shards, limit_test),
    ):
        t0 = time.perf_counter()
        feats[split] = extract_features(
            encoders,
            _loader(spec, meta, batch_size, num_workers),
            device=device,
            pixels=baselines or picture is not None,
            limit=limit,
            conv_source=conv_source,
            logvar_of=("dim",) if split == "test" else (),  # the same pass, for the prior
        )
        log(
            f"[evaluate] {split}: {len(feats[split][1])} samples in {time.perf_counter() - t0:.1f}s"
        )
    if picture is not None:
        drawn = draw_neighbours(feats, meta, _class_names(test_shards), picture, conv_source)
        same = ", ".join(f"{t}: {n} of {k}" for t, (n, k) in drawn.agreement.items())
        log(f"[evaluate] nearest training images of held-out queries: {drawn.path}")
        log(f"[evaluate] neighbours of the query's class: {same}")
    (train, train_y), (test, test_y) = feats["train"], feats["test"]
    prior = prior_fit(test["dim"]["y"], test["dim"].pop(LOGVAR))
    if not baselines:  # the pixels were read for the picture only
        for split in (train, test):
            split.pop(PIXELS, None)
    return Evaluation(probe_every_view(train, train_y, test, test_y, probes, settings, log), prior)


def _probe_list(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in chosen if p not in PROBES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"probes must be a comma list of {', '.join(PROBES)}; got {text!r}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dim-evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run output folder, model folder (export/), a file in one, or a training "
        "checkpoint (RUN/checkpoints/step_N: exported into it on first use)",
    )
    p.add_argument(
        "--train-shards", required=True, help="labelled shards: probe training set / k-NN bank"
    )
    p.add_argument(
        "--test-shards", required=True, help="labelled shards: probe test set / k-NN queries"
    )
    p.add_argument("--json", help="write {model: {view: {probe: accuracy}}} here")
    p.add_argument(
        "--prior-json",
        metavar="FILE",
        help="write the prior measures of the dim code on the test images here "
        "(kl_nats, aggregate_kl_nats, mean_abs_mu, std_z_*, active_dims, ...)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--knn-k", type=int, default=ProbeSettings.k)
    p.add_argument("--knn-temperature", type=float, default=ProbeSettings.temperature)
    p.add_argument(
        "--seed",
        type=int,
        default=ProbeSettings.seed,
        help="random-init baseline and validation split",
    )
    p.add_argument(
        "--limit-train", type=int, default=None, help="use at most this many train samples"
    )
    p.add_argument(
        "--limit-test", type=int, default=None, help="use at most this many test samples"
    )
    p.add_argument(
        "--conv-source",
        choices=CONV_SOURCES,
        default="grid",
        help="conv view: last conv map pooled to a <=4x4 grid (default), the "
        "backbone's pooled pre-logits, or the mean-pooled local map",
    )
    p.add_argument(
        "--probes",
        type=_probe_list,
        default=tuple(PROBES),
        help=f"comma list of {', '.join(PROBES)} (default: all)",
    )
    p.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="skip the random-init and pixel baselines (ablations compute them once)",
    )
    p.add_argument(
        "--neighbours",
        metavar="PNG",
        help="the picture of held-out queries and their nearest training images "
        f"(default: {PICTURE} in the model folder, linked from its card)",
    )
    p.add_argument(
        "--no-neighbours",
        dest="draw_neighbours",
        action="store_false",
        help="skip the neighbour picture",
    )
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log to W&B (offline without an API key): into the training run of "
        "--checkpoint when its folder holds wandb_id.txt, else a new eval run",
    )
    p.add_argument("--wandb-project", default="dim-pretrain")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="write the table into the model card even though --test-shards is not the "
        "run's own held-out data (data.val_shards), which is when it is written by itself",
    )
    return p


def _run_config(folder: Path) -> dict:
    """The resolved config of the run that wrote the model folder ``folder`` (its
    ``config.yaml`` at or up to three folders above it), or {} for a lone export."""
    for parent in [folder.resolve(), *folder.resolve().parents][:4]:
        if (parent / CONFIG_FILE).is_file():
            return yaml.safe_load((parent / CONFIG_FILE).read_text()) or {}
    return {}


def _same_shards(a: str, b: str) -> bool:
    try:
        return {os.path.realpath(s) for s in resolve_shards(a)} == {
            os.path.realpath(s) for s in resolve_shards(b)
        }
    except ConfigError:
        return False


def _classes(spec: str) -> list[str] | None:
    """The class names a manifest records, or None (a pattern, or no names)."""
    if not spec.endswith(".json"):
        return None
    return read_manifest(spec).classes or None


def _labelled(spec: str, option: str) -> None:
    """The first sample of ``spec`` has a label: the probes need them, and a stream
    without any failed only after every feature was extracted."""
    first = next(iter(eval_loader(spec, batch_size=1, img_size=8, in_chans=3)), None)
    if first is None:
        raise ConfigError(f"{option} {spec}: no readable sample")
    if int(first["label"][0]) < 0:
        raise ConfigError(
            f"{option} {spec}: the samples have no label (.cls, or a json 'label'); "
            f"the probes need labelled shards"
        )


def check_args(args: argparse.Namespace) -> Path:
    """Every option, input and output place, before any feature is extracted: one
    ConfigError naming the problem. Returns the model folder."""
    for name, low in (("batch_size", 1), ("knn_k", 1), ("num_workers", 0)):
        if getattr(args, name) < low:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
            )
    for name in ("limit_train", "limit_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.knn_temperature > 0:
        raise ConfigError(f"--knn-temperature must be > 0, got {args.knn_temperature}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(
            f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {args.device}: this machine has no CUDA device; use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA devices")
    folder = find_export(args.checkpoint)
    for option, path in (
        ("--json", args.json),
        ("--prior-json", args.prior_json),
        ("--neighbours", args.neighbours),
    ):
        if path:
            if Path(path).is_dir():
                raise ConfigError(f"{option} {path} is a folder; give a file name")
            check_output_folder(Path(path).parent, option)
    for option, spec in (
        ("--train-shards", args.train_shards),
        ("--test-shards", args.test_shards),
    ):
        try:
            resolve_shards(spec)
        except ConfigError as err:
            raise ConfigError(f"{option}: {err}") from None
        _labelled(spec, option)
    train_classes, test_classes = _classes(args.train_shards), _classes(args.test_shards)
    if train_classes and test_classes and train_classes != test_classes:
        raise ConfigError(
            f"--train-shards and --test-shards name other classes ({len(train_classes)}: "
            f"{train_classes[:3]}... vs {len(test_classes)}: {test_classes[:3]}...); the "
            f"probes would score labels that mean different things"
        )
    return folder


# command-line options that evaluate() takes as they are
PASSED_ON = (
    "batch_size",
    "device",
    "limit_train",
    "limit_test",
    "conv_source",
    "num_workers",
    "probes",
    "baselines",
)


@one_line_mistakes("dim-evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  results alone on stdout
    settings = ProbeSettings(k=args.knn_k, temperature=args.knn_temperature, seed=args.seed)
    folder = check_args(args)
    picture = Path(args.neighbours or folder / PICTURE) if args.draw_neighbours else None
    results, prior = evaluate(
        folder,  # a model folder: evaluate's own find_export returns it as it is
        args.train_shards,
        args.test_shards,
        settings=settings,
        picture=picture,
        log=log,
        **{name: getattr(args, name) for name in PASSED_ON},
    )
    print(format_table(results), prior.line(), sep="\n", flush=True)
    for path, content in ((args.json, results), (args.prior_json, prior.as_dict())):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(content, indent=2) + "\n")
    own_data = _same_shards(
        _run_config(folder).get("data", {}).get("val_shards") or "", args.test_shards
    )
    if not (own_data or args.update_card):
        log(
            "[evaluate] model card left alone: --test-shards is not the run's own held-out "
            "data (data.val_shards); --update-card writes it anyway"
        )
        card = None
    else:
        settings_used = {
            "train shards": args.train_shards,
            "test shards": args.test_shards,
            "limit train": args.limit_train,
            "limit test": args.limit_test,
            "k": args.knn_k,
            "conv view": args.conv_source,
            "seed": args.seed,
        }
        card = update_evaluation(folder, results, settings_used, picture=picture)
    if card is not None:
        log(f"[evaluate] table written into the model card {card}")
    run_dir = (
        Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    )
    log_to_wandb(
        results,
        start=args.wandb,
        project=args.wandb_project,
        run_dir=run_dir,
        picture=picture,
        prior=prior,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
