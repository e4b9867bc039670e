"""evaluator.nlvr (the NLVR2 analogue) and its statement generator (vlpgraph.nodes.evaluators.scene_tasks.nlvr_items): every
label re-derived from the statement's text by an independent parser, labels balanced overall and per type,
the evaluator on tiny towers (weights bit-identical), validation against data without scene graphs, and a
tiny graph with both scene evaluators through the runner and the store."""

from __future__ import annotations

import io
import math
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from tests.helpers import build_ctx, captions_itc_nodes, evaluator, itc, node, shapes, text, tiny_graph, trainer, vit
from tests.nodes.evaluators.test_qa import FakeModel, random_scenes, snapshot, towers
from tests.nodes.evaluators.test_transfer import write_captions
from vlpgraph.engine import ports
from vlpgraph.nodes.evaluators import scene_tasks
from vlpgraph.cli import main
from vlpgraph.nodes.datasets import shapes as shapes_mod
from vlpgraph.nodes.evaluators import nlvr as nlvr_mod
from vlpgraph.store import Store

NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                       "ten"))}
SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross", "shapes": "shape"}


def parse_subject(words: str, colours: set[str]) -> tuple[str | None, str | None]:
    """'red circle' / 'red shapes' / 'circle' -> (colour or None, shape or None)."""
    parts = words.split()
    colour = parts[0] if parts[0] in colours else None
    noun = SINGULAR.get(parts[-1], parts[-1])
    assert len(parts) == 1 + (colour is not None), words
    return colour, None if noun == "shape" else noun


def truth(left: ports.Scene, right: ports.Scene, statement: str, colours: set[str]) -> tuple[str, bool]:
    """(type, truth) of ``statement`` about the pair, from its text alone."""

    def n(scene, colour, shape):
        return sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in scene.objects)

    if m := re.fullmatch(r"both images contain an? (.+)", statement):
        c, s = parse_subject(m[1], colours)
        return "both", n(left, c, s) > 0 and n(right, c, s) > 0
    if m := re.fullmatch(r"exactly one image contains an? (.+)", statement):
        c, s = parse_subject(m[1], colours)
        return "one", (n(left, c, s) > 0) + (n(right, c, s) > 0) == 1
    a, b = len(left.objects), len(right.objects)
    fixed = {"the left image has more shapes than the right image": a > b,
             "the left image has fewer shapes than the right image": a < b,
             "the right image has more shapes than the left image": b > a,
             "the two images have the same number of shapes": a == b}
    if statement in fixed:
        return "compare", fixed[statement]
    if m := re.fullmatch(r"there (is|are) exactly (\w+) (.+) in total", statement):
        k = NUMBERS[m[2]]
        assert (m[1] == "is") == (k == 1), statement
        c, s = parse_subject(m[3], colours)
        return "total", n(left, c, s) + n(right, c, s) == k
    raise AssertionError(f"a statement no template matches: {statement!r}")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr")
    ctx = build_ctx("qa", cache=root / "cache", base_dir=root)
    return shapes_mod.build(shapes_mod.ShapesParams(train_size=400, test_size=200), {}, ctx)


@pytest.mark.parametrize("source", ["shapes", "random"])
def test_every_label_is_correct_and_labels_are_balanced(shapes_data, source):
    if source == "shapes":
        scenes = [shapes_data.train_pairs.scene(i) for i in range(400)]
        vocab = scene_tasks.Vocab(shapes_mod.COLOURS, shapes_mod.SHAPES)
    else:
        scenes = random_scenes(400, seed=5)
        vocab = scene_tasks.Vocab.of(scenes)
    items = scene_tasks.nlvr_items(scenes, 2000, vocab, seed=0)
    by_type: dict[str, list[bool]] = {}
    for it in items:
        assert it.left != it.right
        kind, true = truth(scenes[it.left], scenes[it.right], it.statement, set(vocab.colours))
        assert (kind, true) == (it.type, it.label), it
        by_type.setdefault(kind, []).append(it.label)
    # the label is a fair coin per item: over 2000 items the share of trues has std 0.011, per type (500) 0.022
    assert abs(sum(it.label for it in items) / len(items) - 0.5) < 0.04
    assert set(by_type) == set(scene_tasks.NLVR_TYPES)
    for kind, labels in by_type.items():
        print(f"{kind:8s} {len(labels)} statements, {sum(labels) / len(labels):.2f} true")
        # types come in turn; an empty left image (random scenes) cannot be in "both" images: the next type
        assert len(labels) == 500 if source == "shapes" else len(labels) >= 400, kind
        assert abs(sum(labels) / len(labels) - 0.5) < 0.08, kind
    # no one wording gives the label away: the commonest statement is a small share of its type
    assert max(Counter(it.statement for it in items).values()) < 0.1 * len(items)


def test_statements_are_deterministic(shapes_data):
    scenes = [shapes_data.test.scene(i) for i in range(100)]
    vocab = scene_tasks.Vocab(shapes_mod.COLOURS, shapes_mod.SHAPES)
    a = scene_tasks.nlvr_items(scenes, 300, vocab, seed=2, split=1)
    assert a == scene_tasks.nlvr_items(scenes, 300, vocab, seed=2, split=1)
    assert a != scene_tasks.nlvr_items(scenes, 300, vocab, seed=3, split=1)


@pytest.mark.parametrize("fusion", [True, False])
def test_nlvr_runs_and_leaves_the_model_bit_identical(shapes_data, tmp_path, fusion):
    c = build_ctx("nlvr", cache=tmp_path / "cache", base_dir=tmp_path)
    vision, text, fus = towers(shapes_data, c, fusion)
    before = snapshot(vision, text, fus)
    ev = nlvr_mod.build(nlvr_mod.NLVRParams(steps=30, batch_size=32, max_train_images=120, max_test_images=60),
                        {"model": FakeModel(), "data": shapes_data, "vision": vision, "text": text, "fusion": fus}, c)
    result = ev.evaluate(FakeModel(), c)
    after = snapshot(vision, text, fus)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(q.grad is None for m in (vision, text, fus) if m is not None for q in m.parameters())
    m = result.metrics
    assert m["n"] == 120 and m["n_train"] == 240 and all(math.isfinite(v) for v in m.values())
    assert {f"accuracy_{t}" for t in scene_tasks.NLVR_TYPES} | {f"majority_{t}" for t in scene_tasks.NLVR_TYPES} <= set(m)
    assert abs(m["majority"] - 0.5) < 0.15  # balanced labels: the majority label is right about half the time
    _, test_items = ev.items()
    assert len(result.samples) == 8
    for r, it in zip(result.samples, test_items):
        assert r["kind"] == "nlvr" and r["reference"] == ("true" if it.label else "false")
        assert r["info"]["statement"] == it.statement and r["info"]["correct"] == (r["text"] == r["reference"])
        assert Image.open(io.BytesIO(r["image"])).size == (2 * 32 + 2, 32)  # the two images side by side


def test_validation_refuses_data_without_scene_graphs(tmp_path, capsys):
    write_captions(tmp_path / "data", [("a.png", "a cat", ""), ("b.png", "a dog", ""), ("c.png", "a cow", "")],
                   "train.csv")
    graph = tiny_graph(tmp_path, "g.yaml", graph="t", seed=None, nodes={
        **captions_itc_nodes(),
        "nlvr": evaluator("nlvr", data="data", inputs={"vision": "vision", "text": "text"}, finetune="fusion")})
    assert main(["validate", str(graph)]) == 2
    err = capsys.readouterr().err
    assert "input 'data' needs data with scenes, which 'data' (dataset.captions) does not provide" in err
    assert "finetune 'fusion' needs a fusion encoder wired as the 'fusion' input" in err


@pytest.mark.integration
def test_tiny_graph_runs_both_scene_evaluators_into_the_store(tmp_path):
    towers = {"vision": "vision", "text": "text"}
    graph = tiny_graph(tmp_path, "scenes.yaml", graph="scenes", nodes={
        "shapes": shapes(train_size=192, test_size=48), "vision": vit(), "text": text(max_len=24),
        "fusion": node("encoder.fusion", {"text": "text", "vision": "vision"}, depth=1, heads=2),
        "itc": itc(embed_dim=32),
        "itm": node("objective.itm", {"fusion": "fusion", "itc": "itc"}), "train": trainer("itc", "itm"),
        "qa": evaluator("qa", inputs={**towers, "fusion": "fusion"}, steps=20, batch_size=32),
        "nlvr": evaluator("nlvr", inputs=towers, steps=20, batch_size=32, num_samples=4)})
    assert main(["run", str(graph), "--store", str(tmp_path / "store")]) == 0
    store = Store(tmp_path / "store")
    [run] = store.runs()
    assert run["status"] == "completed"
    rows = store.evals([run["run_id"]])
    got = {(r["evaluator"], r["metric"]) for r in rows}
    assert {("qa", "accuracy"), ("qa", "majority"), ("qa", "accuracy_count"), ("qa", "majority_relation"),
            ("nlvr", "accuracy"), ("nlvr", "majority"), ("nlvr", "accuracy_total")} <= got
    assert {r["evaluator"]: r["metric"] for r in rows if r.get("headline")} == {"qa": "accuracy", "nlvr": "accuracy"}
    samples = store.samples(run["run_id"])
    kinds = Counter(s["kind"] for s in samples)
    assert kinds == {"qa": 8, "nlvr": 4}
