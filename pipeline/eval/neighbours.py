"""A picture of what an encoder groups together: held-out queries beside their nearest
training images, by the encoder's features and by raw pixels.

"Nearest" is cosine similarity between flattened features, the metric the k-NN probe
votes with (``pipeline.eval.probes.knn_predict``), so the picture shows the neighbours
behind the k-NN figure. A neighbour of the query's class gets a green frame, one of
another class a red frame, and each block's title counts the green ones, so the picture
states what it shows. Tensors in, a PNG out: no model, no data loading here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = [
    "QUERIES",
    "K",
    "Layout",
    "Picture",
    "nearest",
    "neighbour_picture",
    "pick_queries",
    "render_neighbours",
    "same_class",
    "to_display",
]

QUERIES = 10  # query rows: one per class, in class order, while classes last
K = 8  # neighbours shown per query and per feature space
TILE = 64  # px per image: small images are enlarged (nearest pixel), large ones shrunk
RIGHT, WRONG, QUERY = (0, 170, 0), (220, 0, 0), (120, 120, 120)  # frame colours
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def pick_queries(labels: torch.Tensor, n: int = QUERIES) -> torch.Tensor:
    """Indices of ``n`` samples: the first of each class in class order, then the second
    of each class, and so on, so every class shows when ``n`` allows and the same data
    gives the same queries."""
    labels = labels.long().cpu()
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts  # how many of its class come before it
    key = rank * (int(labels.max()) + 1 if len(labels) else 1) + labels
    return torch.argsort(key, stable=True)[:n]


@torch.no_grad()
def nearest(bank: torch.Tensor, queries: torch.Tensor, k: int = K) -> torch.Tensor:
    """(Q, k) indices of the bank rows most cosine-similar to each query, nearest first."""
    bank_n = F.normalize(bank.flatten(1).float(), dim=1)
    q = F.normalize(queries.flatten(1).float(), dim=1)
    return (q @ bank_n.T).topk(min(k, bank.shape[0]), dim=1).indices


def same_class(
    query_labels: torch.Tensor, bank_labels: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """(Q, k) booleans: is each neighbour of its query's class (a green frame, else red)."""
    return bank_labels[idx] == query_labels[:, None]


def to_display(images: torch.Tensor) -> np.ndarray:
    """Eval-transform images (N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 RGB."""
    x = (images.float() * 0.5 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True)
class Layout:
    """Where each tile goes: column 0 holds the query, then one block of ``k`` columns per
    feature space, blocks apart by ``gap``; a header line on top, a caption under each tile."""

    rows: int
    k: int
    blocks: int
    tile: int = TILE
    frame: int = 3
    pad: int = 4
    gap: int = 16
    header: int = 18
    caption: int = 13

    @property
    def cell(self) -> int:
        return self.tile + 2 * self.frame + self.pad

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left corner of the frame around tile (row, col)."""
        gaps = 0 if col == 0 else 1 + (col - 1) // self.k
        return (
            self.pad + col * self.cell + gaps * self.gap,
            self.header + row * (self.cell + self.caption),
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture in pixels."""
        columns = 1 + self.blocks * self.k
        width = self.pad + columns * self.cell + self.blocks * self.gap
        return width, self.header + self.rows * (self.cell + self.caption)


def _tile(
    draw: ImageDraw.ImageDraw, canvas: Image.Image, image: np.ndarray, at, colour, caption, layout
):
    """One framed image with its caption below."""
    x, y = at
    side = layout.tile + 2 * layout.frame
    draw.rectangle([x, y, x + side - 1, y + side - 1], fill=colour)
    small = image.shape[0] < layout.tile
    resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
    canvas.paste(
        Image.fromarray(image).resize((layout.tile, layout.tile), resample),
        (x + layout.frame, y + layout.frame),
    )
    draw.text((x + layout.frame, y + side), caption, fill=colour if colour != QUERY else INK)


class Picture(NamedTuple):
    path: Path
    agreement: dict[str, tuple[int, int]]  # {title: (neighbours of their query's class, shown)}


def render_neighbours(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    found: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    tile: int = TILE,
) -> Picture:
    """Write the grid to ``out`` (PNG): a row per query, the query then, for each titled
    block of ``found`` ((Q, k) bank indices), its neighbours framed green (same class)
    or red (another class), its title followed by the green count, which is returned
    with the path. Images are eval-transform tensors in [-1, 1]."""
    k = max((idx.shape[1] for idx in found.values()), default=0)
    layout = Layout(rows=len(queries), k=k, blocks=len(found), tile=tile)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    names = list(class_names or ())
    name = lambda c: names[c] if c < len(names) else str(c)  # noqa: E731
    query_px, bank_px = to_display(queries), to_display(bank)
    draw.text((layout.pad, 2), "query", fill=INK)
    right = {title: same_class(query_labels, bank_labels, idx) for title, idx in found.items()}
    agree = {title: (int(r.sum()), r.numel()) for title, r in right.items()}
    for b, (title, idx) in enumerate(found.items()):
        header = f"{title}: {agree[title][0]} of {agree[title][1]} of the query's class"
        draw.text((layout.origin(0, 1 + b * k)[0], 2), header, fill=INK)
        rows = zip(idx.tolist(), right[title].tolist(), strict=True)
        for row, (neighbours, marks) in enumerate(rows):
            for j, (i, ok) in enumerate(zip(neighbours, marks, strict=True)):
                at = layout.origin(row, 1 + b * k + j)
                colour = RIGHT if ok else WRONG
                _tile(draw, canvas, bank_px[i], at, colour, name(int(bank_labels[i])), layout)
    for row, label in enumerate(query_labels.tolist()):
        _tile(draw, canvas, query_px[row], layout.origin(row, 0), QUERY, name(label), layout)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="png")
    return Picture(path, agree)


def neighbour_picture(
    bank: Mapping[str, torch.Tensor],
    bank_labels: torch.Tensor,
    queries: Mapping[str, torch.Tensor],
    query_labels: torch.Tensor,
    bank_images: torch.Tensor,
    query_images: torch.Tensor,
    out: str | Path,
    *,
    n: int = QUERIES,
    k: int = K,
    class_names: Sequence[str] | None = None,
) -> Picture:
    """The picture for the evaluation: ``pick_queries`` of the held-out set, their ``k``
    nearest bank items in each titled feature space (``{title: (N, D)}``, the same titles
    in ``bank`` and ``queries``); where it went, and how many neighbours share their
    query's class in each space."""
    chosen = pick_queries(query_labels, n)
    found = {title: nearest(bank[title], queries[title][chosen], k) for title in bank}
    return render_neighbours(
        query_images[chosen],
        query_labels[chosen],
        bank_images,
        bank_labels,
        found,
        out,
        class_names=class_names,
    )
