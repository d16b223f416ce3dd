"""The model card: ``README.md`` of an export folder, in the Hugging Face format.

YAML front matter that the Hub indexes (library_name, license, tags, datasets where the
shard manifest names one), then sections: what was trained, with which objective (only
the terms the config turned on, the prior only when gamma > 0, and the KL and MI last
logged), on which shards, the steps, how to load it, the evaluation (with the neighbour
picture) and the resolved config. Two parts are managed
blocks between HTML comments, ``usage`` (re-rendered when pushing, to name the repo)
and ``evaluation`` (written by ``pipeline.evaluate``): tools replace a block in place,
so re-running replaces the table and the rest of the card, edits included, stays.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import timm
import yaml
from huggingface_hub import ModelCard, ModelCardData

from pipeline.core.files import METRICS
from pipeline.core.schema import OFF
from pipeline.data.shards import read_manifest
from pipeline.models.speed import precision_name
from pipeline.share.export import EXPORT_CARD
from pipeline.share.tracking import read_metrics

__all__ = [
    "MI_TERMS",
    "TAGS",
    "card_link",
    "evaluation_block",
    "get_block",
    "measured_text",
    "mi_terms",
    "objective_text",
    "precision_text",
    "render_card",
    "set_block",
    "set_front_matter",
    "update_evaluation",
    "usage_block",
]

TAGS = ("timm", "image-feature-extraction", "self-supervised", "deep-infomax", "dim-pretrain")
LICENSE = "unknown"  # the weights' license follows the training data; dim-export --license sets it
# torchvision dataset names (as pipeline.prepare records them) -> Hugging Face dataset ids
HUB_DATASETS = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
    "fashionmnist": "zalando-datasets/fashion_mnist",
}
PROBE_NAMES = {"linear": "linear probe", "mlp": "MLP probe", "knn": "k-NN"}
CITATION = """@inproceedings{hjelm2019learning,
  title={Learning deep representations by mutual information estimation and maximization},
  author={Hjelm, R Devon and Fedorov, Alex and Lavoie-Marchildon, Samuel and Grewal, Karan
          and Bachman, Phil and Trischler, Adam and Bengio, Yoshua},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- dim:{name}:begin -->", f"<!-- dim:{name}:end -->"


def set_block(text: str, name: str, body: str, heading: str | None = None) -> str:
    """Replace the managed block ``name``; append it (under ``heading``) if absent."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    title = f"## {heading}\n\n" if heading else ""
    return f"{text.rstrip()}\n\n{title}{block}\n"


def get_block(text: str, name: str) -> str | None:
    begin, end = _markers(name)
    found = re.search(re.escape(begin) + r"\n?(.*?)\n?" + re.escape(end), text, re.DOTALL)
    return found.group(1) if found else None


def set_front_matter(text: str, **fields) -> str:
    """Set front-matter fields (``None`` leaves one as it is), through huggingface_hub."""

    card = ModelCard(text)
    for key, value in fields.items():
        if value is not None:
            setattr(card.data, key, value)
    return str(card)


def _datasets(source: dict) -> list[str]:
    if source.get("kind") != "torchvision":
        return []
    key = re.sub(r"[^a-z0-9]", "", str(source.get("name", "")).lower())
    return [HUB_DATASETS[key]] if key in HUB_DATASETS else []


def _shards(spec: str) -> tuple[str, dict]:
    """A sentence on the training shards, and the source prepare recorded (if any)."""
    if not spec.endswith(".json") or not Path(spec).is_file():
        return f"`{spec}`", {}

    try:
        m = read_manifest(spec)
    except Exception:
        return f"`{spec}`", {}
    source = m.info.get("source") or {}
    origin = ", ".join(f"{k}={v}" for k, v in source.items())
    return (
        f"`{spec}`: {m.num_samples:,} images in {len(m.shards)} shard(s), "
        f"{len(m.classes)} classes (labels unused in pretraining)"
        + (f"; written by pipeline.prepare from {origin}" if origin else "")
    ), source


def _registered_here(backbone: str) -> bool:

    return timm.is_model(backbone) and timm.models.model_entrypoint(backbone).__module__.startswith(
        "pipeline"
    )


def usage_block(ref: str, backbone: str) -> str:
    """How to load the folder, ``ref`` being ``local-dir:PATH`` or ``hf-hub:org/name``."""
    register = (
        "import pipeline  # registers " + backbone + " with timm\n"
        if _registered_here(backbone)
        else ""
    )
    where = ref.split(":", 1)[1]
    full = (
        f'encoder = load_encoder("{where}")  # local map, mu, logvar, z'
        if ref.startswith("local-dir:")
        else f'encoder = load_encoder(snapshot_download("{where}"))  # local map, mu, logvar, z'
    )
    download = (
        "from huggingface_hub import snapshot_download\n" if ref.startswith("hf-hub:") else ""
    )
    return f"""The backbone, as timm loads any shared model:

```python
import timm
{register}backbone = timm.create_model("{ref}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=backbone)  # input size, mean, std
transform = timm.data.create_transform(**config)
features = backbone(transform(image).unsqueeze(0))  # (1, num_features) pooled features
```

The whole DIM encoder (backbone + head), with this project installed:

```python
{download}from pipeline.export import load_encoder
{full}
```"""


# The MI terms of L: (the DIM paper's letter, critic key, weight key, symbol in L, what it is)
MI_TERMS = (
    (
        "G",
        "global_critic",
        "alpha",
        "I_global",
        "global: {estimator} estimate of I(x; z), critic `{global_critic}` on `{global_input}`",
    ),
    (
        "L",
        "local_critic",
        "beta",
        "mean_ij I_local",
        "local: {estimator} estimate of "
        "I(C_ij(x); z) averaged over the local map's locations, critic `{local_critic}`",
    ),
)


def mi_terms(loss: dict) -> list[tuple[str, str, str, str, str]]:
    """The rows of ``MI_TERMS`` that train the encoder: a critic and a non-zero weight."""
    return [t for t in MI_TERMS if loss[t[1]] != OFF and loss[t[2]]]


def objective_text(loss: dict) -> str:
    """What the run minimised, from its ``loss`` config: only the terms that were on, the
    prior only when gamma > 0 (a card claiming a prior the run never had misleads)."""
    active = mi_terms(loss)
    formula, lines = [], []
    for term in MI_TERMS:
        _, critic, weight, symbol, what = term
        if term in active:
            formula.append(f"- {loss[weight]} * {symbol}")
            lines.append(f"{what.format(**loss)}, weight {weight} {loss[weight]}")
        else:
            scope = what.split(":")[0]
            lines.append(f"no {scope} term ({critic} `{loss[critic]}`, {weight} {loss[weight]})")
    if loss["gamma"] > 0:
        formula.append(f"+ {loss['gamma']} * E_x KL(N(mu, sigma^2) || N(0, I))")
        lines.append(f"prior: KL of the code to N(0, I), weight gamma {loss['gamma']}")
    else:
        lines.append("no prior on the code (gamma 0): nothing pulls it towards N(0, I)")
    if loss.get("tclip"):
        lines.append(
            f"critic scores soft-clipped: tclip * tanh(score / tclip), tclip {loss['tclip']}"
        )
    if loss.get("score_penalty"):
        formula.append(f"+ {loss['score_penalty']} * mean(score^2)")
        lines.append(f"score penalty {loss['score_penalty']} * mean(score^2) (AMDIM)")
    name = "DIM(" + "+".join(t[0] for t in active) + ")" if active else "no MI term"
    head = f"{name}, {loss['estimator']} estimator: `L = {' '.join(formula).lstrip('+ ')}`"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def measured_text(metrics: str | Path) -> str:
    """The KL and MI estimates of the last logged step (nats), or "" if none were logged:
    what the code ended up as, beside what the objective asked of it."""
    rows = [r for r in read_metrics(metrics) if "kl" in r] if Path(metrics).is_file() else []
    if not rows:
        return ""
    last = rows[-1]
    keys = ["kl", *sorted(k for k in last if k.startswith("mi/"))]
    figures = ", ".join(f"{k} {last[k]:.3g}" for k in keys if isinstance(last[k], (int, float)))
    return f"logged at step {last['step']:,} (`{METRICS}`, nats): {figures}"


def precision_text(asked: str, used: str | None) -> str:
    """The precision the run computed in, and the setting when it named none ("auto")."""
    used = used or asked
    said = precision_name(used)
    return f"{said} (train.mixed_precision {asked})" if asked != used else said


def render_card(
    config: dict,
    *,
    step: int,
    samples_seen: int,
    world_size: int,
    location: str,
    wandb_run: dict | None = None,
    name: str | None = None,
    precision: str | None = None,
) -> str:
    """The card of a run's export: ``config`` is the resolved run config (as a dict);
    ``precision`` is what the run computed in (accelerate's "no" / "bf16" / "fp16"), which
    ``train.mixed_precision: auto`` leaves to the machine."""

    m, data, tr = config["model"], config["data"], config["train"]
    loss = config["loss"]
    measured = measured_text(Path(tr["output_dir"]) / METRICS)
    measured = f"\n- **Measured:** {measured}" if measured else ""
    scopes = {"G": "the image as a whole", "L": "each of its local features"}
    between = " and ".join(scopes[t[0]] for t in mi_terms(loss)) or "nothing (no MI term)"
    prior = (
        f"with a KL prior pulling the code towards N(0, I) (gamma {loss['gamma']})"
        if loss["gamma"] > 0
        else "with no prior on the code"
    )
    shards, source = _shards(data["train_shards"])
    front = ModelCardData(
        library_name="timm",
        license=LICENSE,
        tags=list(TAGS),
        datasets=_datasets(source) or None,
        pipeline_tag="image-feature-extraction",
    ).to_yaml()
    init = (
        f"timm's pretrained `{m['backbone']}` weights"
        if m.get("pretrained")
        else "random initialisation"
    )
    batch = tr["batch_size"] * tr.get("grad_accum", 1) * world_size
    wb = ""
    if wandb_run and wandb_run.get("id"):
        path = "/".join(str(wandb_run[k]) for k in ("entity", "project", "id") if wandb_run.get(k))
        wb = f"\n- **W&B run:** `{path}` (the model is also logged there as an artifact)"
    cfg_yaml = yaml.safe_dump(config, sort_keys=False).strip()
    body = f"""---
{front}
---

# {name or m["backbone"] + "-dim"}

A `{m["backbone"]}` image encoder pretrained without labels by Deep InfoMax (Hjelm et al.,
ICLR 2019): maximising the mutual information between the image's global code and
{between}, {prior}. Trained with dim-pretrain.

## Model details

- **Backbone:** timm `{m["backbone"]}` ({init}), classifier removed; `model.safetensors` is
  its timm state dict, `config.json` its timm config
- **DIM head** (`dim_head.safetensors`): pooled features -> fc ({m["fc_dim"]}) -> a
  {m["code_dim"]}-d Gaussian code (mu, logvar); local map from feature stage {m["local_layer"]}
- **Input:** {m["in_chans"]} x {m["img_size"]} x {m["img_size"]}, normalisation in
  `config.json` (`pretrained_cfg`)
- **Objective:** {objective_text(loss)}{measured}
- **Training data:** {shards}
- **Training:** {step:,} optimizer steps of {batch} images ({tr["batch_size"]} per process x
  {world_size} process(es) x {tr.get("grad_accum", 1)} accumulation), {samples_seen:,} images
  seen; {tr["optimizer"]}, lr {tr["lr"]}, {tr["warmup_steps"]} warm-up steps, precision
  {precision_text(tr.get("mixed_precision", "no"), precision)}{wb}

## How to use

{_markers("usage")[0]}
{usage_block("local-dir:" + location, m["backbone"])}
{_markers("usage")[1]}

## Evaluation

{_markers("evaluation")[0]}
Not evaluated yet: `python -m pipeline.evaluate --checkpoint FOLDER --train-shards ...
--test-shards ...` writes its table here.
{_markers("evaluation")[1]}

## Training configuration

The resolved configuration of the run (`pretrain.py --config` accepts it as is):

```yaml
{cfg_yaml}
```

## Citation

```bibtex
{CITATION}
```
"""
    return body


def evaluation_block(results: dict, settings: dict, picture: str | None = None) -> str:
    """The evaluation table in markdown (accuracies in percent) and how it was made, and
    the neighbour picture when ``picture`` (a path relative to the card) is given.

    One column per probe found in ``results``, in the order evaluate ran them.
    """
    probes = list(
        dict.fromkeys(p for views in results.values() for cell in views.values() for p in cell)
    )
    rows = [
        "| model | view | " + " | ".join(PROBE_NAMES.get(p, p) for p in probes) + " |",
        "|---|---|" + "---|" * len(probes),
    ]
    for model, views in results.items():
        for view, cell in views.items():
            cells = [f"{100 * cell[p]:.2f}%" if p in cell else "-" for p in probes]
            rows.append(f"| {model} | {view} | {' | '.join(cells)} |")
    how = ", ".join(f"{k}: `{v}`" for k, v in settings.items() if v is not None)
    shown = (
        "\n\nHeld-out images (left) and their nearest training images by this encoder's "
        "conv features and by raw pixels (cosine similarity, as the k-NN probe; green: "
        f"same class, red: another class):\n\n![nearest neighbours]({picture})"
    )
    return (
        "Frozen features, `python -m pipeline.evaluate`, beside the same architecture "
        "at random init and raw pixels. Accuracy on the test shards:\n\n"
        + "\n".join(rows)
        + (f"\n\n{how}" if how else "")
        + (shown if picture else "")
    )


def card_link(folder: Path, picture: str | Path | None) -> str | None:
    """``picture`` relative to the card in ``folder`` when it lies in the model folder or
    the run folder around it (so the link travels with them), else ``None``."""
    if picture is None or not Path(picture).is_file():
        return None
    picture, folder = Path(picture).resolve(), Path(folder).resolve()
    if not picture.is_relative_to(folder.parent):
        return None
    return Path(os.path.relpath(picture, folder)).as_posix()


def update_evaluation(
    folder: str | Path, results: dict, settings: dict, picture: str | Path | None = None
) -> Path | None:
    """Write the evaluation block into ``folder/README.md``, linking the neighbour
    ``picture`` (see ``card_link``); ``None`` if there is no card."""

    path = Path(folder) / EXPORT_CARD
    if not path.is_file():
        return None
    block = evaluation_block(results, settings, card_link(Path(folder), picture))
    text = set_block(path.read_text(), "evaluation", block, heading="Evaluation")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
