"""Shard specs -> lists of shards, and the JSON manifest that ``pipeline.prepare`` writes.

A spec is what users put in ``data.train_shards``: a brace pattern
(``data/train-{000000..000127}.tar``), a glob, a comma-separated list of any of these,
a URL or ``pipe:`` command, or a manifest ``.json``. Local shards are checked here, once,
before training starts, so that a typo is a ``ConfigError`` instead of a stream that
silently yields nothing. URLs and pipes cannot be checked without reading them; they
are passed through and a shard that fails at run time is counted as skipped data.

The manifest records the shards of one split and their sample counts: it is how the
training side knows the dataset size (epoch length) and how many samples a truncated
shard lost.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.shardlists import expand_urls

from pipeline.core.errors import ConfigError

MANIFEST_FORMAT = "dim-pretrain/shards/1"


def is_remote(url: str) -> bool:
    """True for what only webdataset's ``gopen`` can open (URLs, ``pipe:`` commands)."""
    return "://" in url or url.startswith(("pipe:", "file:"))


@dataclass
class Manifest:
    """One split's shards (absolute paths) with their sample counts, and the class names."""

    path: Path
    split: str
    shards: list[str]
    samples: list[int]
    classes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(self.samples)


def write_manifest(
    path: str | Path,
    *,
    split: str,
    shards: list[tuple[str, int, int]],
    classes: list[str],
    info: dict | None = None,
) -> Path:
    """Write ``path`` atomically; ``shards`` are (file name beside it, samples, bytes)."""
    path = Path(path)
    body = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "num_samples": sum(n for _, n, _ in shards),
        "classes": list(classes),
        "shards": [{"path": name, "samples": n, "bytes": size} for name, n, size in shards],
        **(info or {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see half a manifest; it marks a finished split
    return path


def read_manifest(path: str | Path) -> Manifest:
    """Parse a manifest; shard paths become absolute (relative ones sit beside it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"shard manifest not found: {path}")
    try:
        body = json.loads(path.read_text())
        entries = body["shards"]
        if body.get("format") != MANIFEST_FORMAT:
            raise KeyError("format")
        shards = [
            e["path"] if is_remote(e["path"]) else str(path.parent.resolve() / e["path"])
            for e in entries
        ]
        samples = [int(e["samples"]) for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is not a shard manifest written by pipeline.prepare "
            f"(expected format {MANIFEST_FORMAT!r}; problem: {err})"
        ) from None
    info = {k: v for k, v in body.items() if k not in ("shards", "classes", "split")}
    return Manifest(path, body.get("split", ""), shards, samples, body.get("classes", []), info)


def _top_level_items(spec: str) -> list[str]:
    """Split on commas outside braces: ``a-{0..3}.tar,b-{x,y}.tar`` is two items."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_local(item: str) -> list[str]:
    """Brace-expand (and glob) one local item; every file must exist."""
    try:
        paths = [os.path.expanduser(p) for p in expand_urls(item)]
    except (AssertionError, ValueError) as err:  # e.g. ${VAR} with no WDS_VAR set
        raise ConfigError(f"cannot expand shard pattern {item!r}: {err}") from None
    found: list[str] = []
    missing: list[str] = []
    for path in paths:
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path))
            found.extend(matches)
            missing.extend([] if matches else [path])
        elif os.path.isdir(path):
            near = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.json")))
            raise ConfigError(
                f"shard spec {item!r} is a directory; give a brace pattern, a glob "
                f"or a manifest .json (manifests there: {near or 'none'})"
            )
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ConfigError(
            f"shard pattern {item!r}: {len(missing)} of {len(paths)} expanded "
            f"paths match no file ({shown})"
        )
    return found


def _manifest_counts(paths: list[str]) -> dict[str, int]:
    """Sample counts of shards listed in any manifest beside ``paths`` (keyed by real path)."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.realpath(p)) for p in paths}):
        for candidate in sorted(glob.glob(os.path.join(folder, "*.json"))):
            try:
                manifest = read_manifest(candidate)
            except ConfigError:
                continue  # some other JSON file
            counts.update(
                {
                    os.path.realpath(s): n
                    for s, n in zip(manifest.shards, manifest.samples, strict=True)
                }
            )
    return counts


def resolve_spec(spec: str) -> list[tuple[str, int | None]]:
    """Every shard of ``spec`` in order, with its sample count where a manifest gives it."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            "empty shard spec: give a brace pattern, a list, a URL or a manifest .json"
        )
    out: list[tuple[str, int | None]] = []
    for item in _top_level_items(spec):
        if item.endswith(".json") and not is_remote(item):
            manifest = read_manifest(item)
            if not manifest.shards:
                raise ConfigError(f"shard manifest {item!r} lists no shards")
            gone = [s for s in manifest.shards if not is_remote(s) and not os.path.isfile(s)]
            if gone:
                raise ConfigError(
                    f"shard manifest {item!r} lists {len(gone)} of {len(manifest.shards)} "
                    f"shards that are not there (first: {gone[0]})"
                )
            out.extend(zip(manifest.shards, manifest.samples, strict=True))
        elif is_remote(item):
            out.extend((url, None) for url in expand_urls(item))
        else:
            paths = _expand_local(item)
            counts = _manifest_counts(paths)
            out.extend((p, counts.get(os.path.realpath(p))) for p in paths)
    if not out:
        raise ConfigError(f"shard spec {spec!r} names no shards")
    return out


def resolve_shards(spec: str) -> list[str]:
    """The shard paths/URLs of ``spec``; ``ConfigError`` naming a pattern that matches nothing."""
    return [url for url, _ in resolve_spec(spec)]


def dataset_size(spec: str) -> int | None:
    """Samples in ``spec`` when manifests cover every shard of it, else None."""
    counts = [n for _, n in resolve_spec(spec)]
    return None if any(n is None for n in counts) else sum(counts)
