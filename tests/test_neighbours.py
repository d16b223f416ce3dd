"""The neighbour picture: the right neighbours, the right marks, the right size, and the
evaluation writing it (linked from the card, logged to W&B)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from test_evaluate import FakeRun, FakeWandb, tiny_run  # noqa: F401  (tiny_run: a fixture)

import pipeline.evaluate as evaluate_module
from pipeline.eval.neighbours import (
    QUERY,
    RIGHT,
    WRONG,
    Layout,
    nearest,
    neighbour_picture,
    pick_queries,
    render_neighbours,
    same_class,
    to_display,
)


def brute_force_nearest(bank: torch.Tensor, queries: torch.Tensor, k: int) -> list[list[int]]:
    """Cosine similarity one pair at a time, sorted: what the k-NN probe calls nearest."""
    found = []
    for q in queries.double():
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank.double()]
        found.append(sorted(range(len(bank)), key=lambda i: -sims[i])[:k])
    return found


def flat_colours(n: int, size: int = 4) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images of one flat, distinct colour each, as eval-transform tensors in
    [-1, 1], and the colours (n, 3) they display as."""
    i = np.arange(n)
    colours = np.stack([i * 7 % 256, 255 - i * 7 % 256, i * 37 % 256], axis=1).astype(np.uint8)
    images = torch.tensor(colours, dtype=torch.float32)[:, :, None, None] / 255 * 2 - 1
    return images.expand(-1, -1, size, size).contiguous(), colours


def pixel(picture: np.ndarray, layout: Layout, row: int, col: int, inset: int) -> np.ndarray:
    """The picture's pixel ``inset`` px inside the frame of tile (row, col)."""
    x, y = layout.origin(row, col)
    return picture[y + inset, x + inset]


def which(colour: np.ndarray, colours: np.ndarray) -> int:
    return int(np.abs(colours.astype(int) - colour.astype(int)).sum(axis=1).argmin())


def test_nearest_is_the_cosine_nearest_by_brute_force():
    """Catches: Euclidean or dot-product instead of cosine, farthest instead of nearest,
    an order other than nearest first, bank and queries swapped."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(40, 6, generator=g) * torch.rand(40, 1, generator=g) * 5  # norms differ
    queries = torch.randn(7, 6, generator=g)
    assert nearest(bank, queries, 5).tolist() == brute_force_nearest(bank, queries, 5)
    assert nearest(bank[:3], queries, 5).shape == (7, 3)  # never more than the bank holds


def test_pick_queries_one_per_class_in_class_order_then_again():
    labels = torch.tensor([2, 0, 0, 1, 2, 1, 0, 3])
    assert pick_queries(labels, 6).tolist() == [1, 3, 0, 7, 2, 5]
    assert pick_queries(labels, 100).tolist() == [1, 3, 0, 7, 2, 5, 4, 6]


def test_the_picture_shows_the_nearest_training_images_of_each_feature_space(tmp_path):
    """Read back from the PNG: each row holds the picked query, then per block the bank
    images that block's features put nearest, nearest first. Catches: both blocks from
    one feature space, a neighbour drawn from the wrong bank row, rows out of step."""
    g = torch.Generator().manual_seed(1)
    bank_images, colours = flat_colours(30)
    all_queries, all_colours = flat_colours(36)
    query_images, query_colours = all_queries[30:], all_colours[30:]  # 6 more colours
    bank_y, query_y = torch.arange(30) % 3, torch.tensor([2, 0, 1, 0, 2, 1])
    bank = {"a": torch.randn(30, 5, generator=g), "b": torch.randn(30, 9, generator=g)}
    queries = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(6, 9, generator=g)}
    out, agree = neighbour_picture(
        bank, bank_y, queries, query_y, bank_images, query_images, tmp_path / "nb.png", n=4, k=3
    )
    picture = np.asarray(Image.open(out).convert("RGB"))
    layout = Layout(rows=4, k=3, blocks=2)
    chosen = [1, 2, 0, 3]  # one query per class, in class order, then a second class 0
    middle = layout.frame + layout.tile // 2
    for row, q in enumerate(chosen):
        assert which(pixel(picture, layout, row, 0, middle), all_colours) == 30 + q
        assert (pixel(picture, layout, row, 0, middle) == query_colours[q]).all()
        for b, title in enumerate(("a", "b")):
            want = brute_force_nearest(bank[title], queries[title][q : q + 1], 3)[0]
            got = [
                which(pixel(picture, layout, row, 1 + 3 * b + j, middle), colours) for j in range(3)
            ]
            assert got == want, (row, title)
    for title in ("a", "b"):  # the count the picture states: the query's class among these
        want = brute_force_nearest(bank[title], queries[title][chosen], 3)
        pairs = zip(chosen, want, strict=True)
        right = sum(int(bank_y[i]) == int(query_y[q]) for q, row in pairs for i in row)
        assert agree[title] == (right, 4 * 3), title


def test_wrong_class_neighbours_are_framed_red_and_right_ones_green(tmp_path):
    """Catches: marks from the wrong labels (the query's own row, the neighbour's index
    instead of its label), colours swapped, the query framed as a neighbour."""
    bank_images, _ = flat_colours(5)
    bank_y = torch.tensor([0, 1, 1, 0, 2])
    query_y = torch.tensor([1, 0])
    idx = torch.tensor([[1, 0, 2], [3, 4, 0]])
    expected = [[True, False, True], [True, False, True]]
    assert same_class(query_y, bank_y, idx).tolist() == expected
    out, _ = render_neighbours(
        bank_images[:2], query_y, bank_images, bank_y, {"x": idx}, tmp_path / "m.png"
    )
    picture = np.asarray(Image.open(out).convert("RGB"))
    layout = Layout(rows=2, k=3, blocks=1)
    for row, marks in enumerate(expected):
        assert tuple(pixel(picture, layout, row, 0, 1)) == QUERY
        for j, ok in enumerate(marks):
            assert tuple(pixel(picture, layout, row, 1 + j, 1)) == (RIGHT if ok else WRONG)


def test_png_size_follows_the_layout(tmp_path):
    """Three rows, two blocks of two, 8 px tiles: 5 cells of 8 + 2 * 3 (frame) + 4 (pad)
    = 18 px, a 4 px margin and two 16 px gaps across; an 18 px header and 3 rows of
    18 + 13 (caption) down. The evaluation's default (10 rows, 8 + 8 columns, 64 px
    tiles) too."""
    images, _ = flat_colours(6)
    found = {"a": torch.tensor([[0, 1]] * 3), "b": torch.tensor([[2, 3]] * 3)}
    labels = torch.zeros(6, dtype=torch.long)
    out, _ = render_neighbours(
        images[:3], labels[:3], images, labels, found, tmp_path / "s.png", tile=8
    )
    assert Image.open(out).size == (4 + 5 * 18 + 2 * 16, 18 + 3 * (18 + 13)) == (126, 111)
    assert Layout(rows=10, k=8, blocks=2).size == (4 + 17 * 74 + 2 * 16, 18 + 10 * 87)


def test_display_undoes_the_normalisation():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    shown = to_display(x)
    assert shown.shape == (1, 2, 2, 3) and shown.dtype == np.uint8
    assert shown[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    assert (shown[..., 0] == shown[..., 2]).all()  # grey stays grey


CARD = "# tiny\n\n## Evaluation\n\n<!-- dim:evaluation:begin -->\n<!-- dim:evaluation:end -->\n"


def test_evaluate_writes_the_picture_and_the_card_links_it(tiny_run, tmp_path):  # noqa: F811
    """Catches: no picture by default, one not linked from the card (or linked where it
    does not lie), the pixels read for the picture leaking into a --no-baselines table."""
    run, train, test = tiny_run  # a model folder of its own (no card: one is given here)
    (run / "README.md").write_text(CARD)
    common = ["--train-shards", train, "--test-shards", test, "--probes", "knn", "--knn-k", "5"]
    common += ["--no-baselines", "--batch-size", "32", "--update-card"]
    picture, card = run / "neighbours.png", run / "README.md"
    out = tmp_path / "eval.json"
    assert evaluate_module.main(["--checkpoint", str(run), "--json", str(out), *common]) == 0
    # 30 test images of 3 classes: 10 query rows; 8 neighbours by DIM conv and by pixels
    assert Image.open(picture).size == Layout(rows=10, k=8, blocks=2).size
    assert "![nearest neighbours](neighbours.png)" in card.read_text()
    assert set(json.loads(out.read_text())) == {"dim"}

    elsewhere = tmp_path / "pictures" / "nb.png"
    assert (
        evaluate_module.main(["--checkpoint", str(run), "--neighbours", str(elsewhere), *common])
        == 0
    )
    assert elsewhere.is_file() and "nearest neighbours" not in card.read_text()

    picture.unlink()
    assert evaluate_module.main(["--checkpoint", str(run), "--no-neighbours", *common]) == 0
    assert not picture.exists()


def test_wandb_gets_the_picture_as_an_image(tmp_path, monkeypatch):
    class WandbWithImages(FakeWandb):
        @staticmethod
        def Image(path):  # wandb's spelling
            return ("image", path)

    active = FakeRun()
    monkeypatch.setattr(evaluate_module, "wandb", WandbWithImages(run=active))
    picture = tmp_path / "nb.png"
    evaluate_module.log_to_wandb({"dim": {"conv": {"knn": 0.5}}}, picture=picture)
    assert active.logged[0]["eval/neighbours"] == ("image", str(picture))
    evaluate_module.log_to_wandb({"dim": {"conv": {"knn": 0.5}}})
    assert "eval/neighbours" not in active.logged[1]
