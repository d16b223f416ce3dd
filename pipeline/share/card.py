"""The model card: ``README.md`` of an export folder, in the Hugging Face format.

YAML front matter that the Hub indexes (library_name, license, tags, datasets where the
shard manifest names one), then sections: what was trained, on which shards, the
steps, how to load it, the evaluation and the resolved config. Two parts are managed
blocks between HTML comments, ``usage`` (re-rendered when pushing, to name the repo)
and ``evaluation`` (written by ``pipeline.evaluate``): tools replace a block in place,
so re-running replaces the table and the rest of the card, edits included, stays.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import yaml
from huggingface_hub import ModelCard, ModelCardData

from pipeline.data.shards import read_manifest
from pipeline.share.export import EXPORT_CARD

__all__ = [
    "TAGS",
    "evaluation_block",
    "get_block",
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


def render_card(
    config: dict,
    *,
    step: int,
    samples_seen: int,
    world_size: int,
    location: str,
    wandb_run: dict | None = None,
    name: str | None = None,
) -> str:
    """The card of a run's export: ``config`` is the resolved run config (as a dict)."""

    m, data, tr = config["model"], config["data"], config["train"]
    loss = config["loss"]
    global_mi = (
        "no global critic"
        if loss["global_critic"] == "none"
        else f"global critic `{loss['global_critic']}` on `{loss['global_input']}`"
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
ICLR 2019): maximising the mutual information between the image's local features and its
global code, with a KL prior on the code. Trained with dim-pretrain.

## Model details

- **Backbone:** timm `{m["backbone"]}` ({init}), classifier removed; `model.safetensors` is
  its timm state dict, `config.json` its timm config
- **DIM head** (`dim_head.safetensors`): pooled features -> fc ({m["fc_dim"]}) -> a
  {m["code_dim"]}-d Gaussian code (mu, logvar); local map from feature stage {m["local_layer"]}
- **Input:** {m["in_chans"]} x {m["img_size"]} x {m["img_size"]}, normalisation in
  `config.json` (`pretrained_cfg`)
- **Objective:** {loss["estimator"]} estimator, {global_mi},
  local critic `{loss["local_critic"]}`;
  alpha {loss["alpha"]}, beta {loss["beta"]}, gamma {loss["gamma"]}
- **Training data:** {shards}
- **Training:** {step:,} optimizer steps of {batch} images ({tr["batch_size"]} per process x
  {world_size} process(es) x {tr.get("grad_accum", 1)} accumulation), {samples_seen:,} images
  seen; {tr["optimizer"]}, lr {tr["lr"]}, {tr["warmup_steps"]} warm-up steps, precision
  {tr.get("mixed_precision", "no")}{wb}

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


def evaluation_block(results: dict, settings: dict) -> str:
    """The evaluation table in markdown (accuracies in percent) and how it was made.

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
    return (
        "Frozen features, `python -m pipeline.evaluate`, beside the same architecture "
        "at random init and raw pixels. Accuracy on the test shards:\n\n"
        + "\n".join(rows)
        + (f"\n\n{how}" if how else "")
    )


def update_evaluation(folder: str | Path, results: dict, settings: dict) -> Path | None:
    """Write the evaluation block into ``folder/README.md``; ``None`` if there is no card."""

    path = Path(folder) / EXPORT_CARD
    if not path.is_file():
        return None
    text = set_block(
        path.read_text(), "evaluation", evaluation_block(results, settings), heading="Evaluation"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
