"""evaluator.qa (the VQA analogue) and its question generator (vlpgraph.nodes.evaluators.scene_tasks.qa_items): every answer
re-derived from the question's text and the scene graph by an independent parser, the answer distribution
of each type, determinism, the evaluator on real tiny towers (weights bit-identical in every finetune
mode), VQAv2-style files, and the refusals."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import DATA, build_ctx
from vlpgraph.engine import ports
from vlpgraph.nodes.evaluators import scene_tasks
from vlpgraph.errors import UserError
from vlpgraph.nodes.datasets import shapes as shapes_mod
from vlpgraph.nodes.encoders import fusion as fusion_mod
from vlpgraph.nodes.encoders import text as text_mod
from vlpgraph.nodes.encoders import vit as vit_mod
from vlpgraph.nodes.evaluators import qa as qa_mod

PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


# ------------------------------------------------------------------------- an independent answer key


def answer_key(scene: ports.Scene, question: str) -> tuple[str, str]:
    """(type, answer) of ``question`` about ``scene``, from its text alone (not from the generator's code)."""
    objs = scene.objects

    def only(**attrs) -> ports.SceneObject:
        found = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
        assert len(found) == 1, f"{question!r} does not name exactly one object: {found}"
        return found[0]

    if question == "how many shapes are there?":
        return "count", str(len(objs))
    if m := re.fullmatch(r"how many (small|large) shapes are there\?", question):
        return "count", str(sum(o.size == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return "count", str(sum(o.colour == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return "count", str(sum(o.shape == PLURALS[m[1]] for o in objs))
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return "colour", only(shape=m[1]).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return "shape", only(colour=m[1]).shape
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        return "size", only(colour=m[1], shape=m[2]).size
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "exists", "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        a, b = only(colour=m[1], shape=m[2]), only(colour=m[4], shape=m[5])
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
        sides = {"left of": (ax1 <= bx0, ax0 >= bx1), "right of": (ax0 >= bx1, ax1 <= bx0),
                 "above": (ay1 <= by0, ay0 >= by1), "below": (ay0 >= by1, ay1 <= by0)}[m[3]]
        assert any(sides), f"{question!r}: the boxes overlap along that axis (undecidable)"
        return "relation", "yes" if sides[0] else "no"
    raise AssertionError(f"a question no template matches: {question!r}")


def random_scenes(n: int, seed: int = 0) -> list[ports.Scene]:
    """Scenes with repeated colours, shapes and even identical objects (what dataset.shapes never makes),
    boxes anywhere (overlapping too): the generator must still only ask what has one answer."""
    rng = np.random.default_rng(seed)
    colours, shapes = ("red", "green", "blue"), ("circle", "square", "cross")
    out = []
    for _ in range(n):
        objs = []
        for _ in range(int(rng.integers(0, 6))):
            x, y, r = rng.uniform(0, 28, 2).tolist() + [float(rng.uniform(2, 6))]
            objs.append(ports.SceneObject(colours[rng.integers(3)], shapes[rng.integers(3)],
                                          ("small", "large")[rng.integers(2)], (x, y, x + r, y + r)))
        out.append(ports.Scene(objs))
    return out


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    ctx = build_ctx("qa", cache=root / "cache", base_dir=root)
    return shapes_mod.build(shapes_mod.ShapesParams(train_size=400, test_size=400), {}, ctx)


def shapes_questions(data, split: str = "test"):
    s = data.test if split == "test" else data.paired_train()
    scenes = [s.scene(i) for i in range(len(s))]
    vocab = scene_tasks.Vocab(shapes_mod.COLOURS, shapes_mod.SHAPES)
    return scenes, [q for i, sc in enumerate(scenes) for q in scene_tasks.qa_items(sc, vocab, 0, i, split=1)]


# ------------------------------------------------------------------------------------- the questions


def test_shapes_scene_graph_matches_the_split_arrays(shapes_data):
    split = shapes_data.test
    assert ports.SCENES in shapes_data.capabilities
    for i in range(50):
        scene = split.scene(i)
        assert len(scene.objects) == int(split.counts[i]) == len(split[i]["boxes"])
        for k, o in enumerate(scene.objects):
            assert o.colour == shapes_mod.COLOURS[split.colour[i, k]] and o.shape == shapes_mod.SHAPES[split.shape[i, k]]
            assert o.size in ("small", "large") and torch.allclose(torch.tensor(o.box), split[i]["boxes"][k])
        if split.labels[i] >= 0:  # single-object images: the class name is the object's colour and shape
            assert shapes_mod.CLASS_NAMES[split.labels[i]] == f"{scene.objects[0].colour} {scene.objects[0].shape}"


@pytest.mark.parametrize("source", ["shapes", "random"])
def test_every_answer_is_correct_for_its_scene(shapes_data, source):
    if source == "shapes":
        scenes, items = shapes_questions(shapes_data)
    else:
        scenes = random_scenes(600)
        vocab = scene_tasks.Vocab.of(scenes)
        items = [q for i, sc in enumerate(scenes) for q in scene_tasks.qa_items(sc, vocab, 3, i)]
    seen = Counter()
    for q in items:
        kind, answer = answer_key(scenes[q.image], q.question)
        assert (kind, answer) == (q.type, q.answer), q
        seen[kind] += 1
    assert set(seen) == set(scene_tasks.QA_TYPES)  # every type was asked (and checked) many times
    assert min(seen.values()) >= 100, seen


def test_answer_distribution_of_each_type_is_not_degenerate(shapes_data):
    """On the shapes test split: several answers per type, none taking most of it, yes/no balanced; the
    majority-answer baseline of each type is printed."""
    _, items = shapes_questions(shapes_data)
    by_type: dict[str, Counter] = {}
    for q in items:
        by_type.setdefault(q.type, Counter())[q.answer] += 1
    for kind, answers in sorted(by_type.items()):
        top, n = answers.most_common(1)[0][1], sum(answers.values())
        print(f"{kind:9s} {n:4d} questions, majority answer {answers.most_common(1)[0][0]!r}: {top / n:.2f}")
        assert len(answers) >= 2 and top / n < 0.7, (kind, answers)
    for kind in ("exists", "relation"):
        assert set(by_type[kind]) == {"yes", "no"} and abs(by_type[kind]["yes"] / sum(by_type[kind].values()) - 0.5) < 0.1
    assert set(by_type["count"]) >= {"0", "1", "2"}
    vocab = set(shapes_mod.COLOURS) | set(shapes_mod.SHAPES) | {"yes", "no", "small", "large"} | set("01234")
    assert {q.answer for q in items} <= vocab


def test_questions_are_deterministic_and_per_type_streams(shapes_data):
    scenes, items = shapes_questions(shapes_data)
    assert shapes_questions(shapes_data)[1] == items
    vocab = scene_tasks.Vocab(shapes_mod.COLOURS, shapes_mod.SHAPES)
    only = [q for i, sc in enumerate(scenes) for q in scene_tasks.qa_items(sc, vocab, 0, i, ["exists", "size"], split=1)]
    assert only == [q for q in items if q.type in ("exists", "size")]
    other = [q for i, sc in enumerate(scenes) for q in scene_tasks.qa_items(sc, vocab, 1, i, split=1)]
    assert other != items  # another seed asks other questions


# ---------------------------------------------------------------------------------- the evaluator


class FakeModel(ports.Model):
    def __init__(self):
        self.modules, self.objectives, self.tokenizer, self.device = nn.ModuleDict(), {}, None, torch.device("cpu")


def towers(data, c, fusion: bool = True):
    vision = vit_mod.build(vit_mod.ViTParams(width=32, depth=1, heads=2, patch_size=8), {"data": data}, c)
    text = text_mod.build(text_mod.TextParams(width=32, depth=1, heads=2, max_len=24), {"data": data}, c)
    fus = fusion_mod.build(fusion_mod.FusionParams(depth=1, heads=2), {"text": text, "vision": vision}, c) if fusion else None
    return vision, text, fus


def snapshot(*modules) -> dict:
    return {(i, k): v.clone() for i, m in enumerate(modules) if m is not None for k, v in m.state_dict().items()}


def qa(data, vision, text, fusion, c, **params):
    params = {"steps": 30, "batch_size": 32, "max_train_images": 160, "max_test_images": 60} | params
    ev = qa_mod.build(qa_mod.QAParams(**params), {"model": FakeModel(), "data": data, "vision": vision, "text": text,
                                                  "fusion": fusion}, c)
    return ev.evaluate(FakeModel(), c)


@pytest.mark.parametrize("finetune,fusion", [("auto", True), ("head", True), ("all", True), ("auto", False)])
def test_qa_runs_and_leaves_the_model_bit_identical(shapes_data, tmp_path, finetune, fusion):
    c = build_ctx("qa", cache=tmp_path / "cache", base_dir=tmp_path)
    vision, text, fus = towers(shapes_data, c, fusion)
    for m in (vision, text, fus):
        if m is not None:
            m.train()  # as mid-training: the evaluator must give back the train flags too
    before = snapshot(vision, text, fus)
    result = qa(shapes_data, vision, text, fus, c, finetune=finetune)
    after = snapshot(vision, text, fus)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for m in (vision, text, fus):
        if m is not None:
            assert all(q.grad is None for q in m.parameters()) and all(x.training for x in m.modules())
    m = result.metrics
    assert {"accuracy", "majority", "n", "n_train", "answers"} <= set(m)
    for kind in scene_tasks.QA_TYPES:
        assert 0 <= m[f"accuracy_{kind}"] <= 1 and 0 <= m[f"majority_{kind}"] <= 1
    assert all(math.isfinite(v) for v in m.values())
    print({k: round(v, 3) for k, v in m.items() if k.startswith("majority")})
    assert m["majority"] < 0.6 and max(m[f"majority_{t}"] for t in scene_tasks.QA_TYPES) < 0.8
    # the samples: the first 8 test questions, the model's answer and the true one
    _, test_items = qa_mod.QAEvaluator(qa_mod.QAParams(max_train_images=160, max_test_images=60), shapes_data,
                                       vision, text, fus).items()
    assert [r["sample_id"] for r in result.samples] == list(range(8))
    for r, q in zip(result.samples, test_items):
        assert r["kind"] == "qa" and r["reference"] == q.answer and r["info"]["question"] == q.question
        assert r["image"][:8] == b"\x89PNG\r\n\x1a\n" and r["info"]["correct"] == (r["text"] == q.answer)


def test_qa_is_seeded_and_majority_is_the_training_prior(shapes_data, tmp_path):
    c = build_ctx("qa", cache=tmp_path / "cache", base_dir=tmp_path)
    vision, text, fus = towers(shapes_data, c)
    a = qa(shapes_data, vision, text, fus, c, steps=10)
    assert a.metrics == qa(shapes_data, vision, text, fus, c, steps=10).metrics
    # the majority baseline by hand: the most common training answer of each type, scored on the test questions
    train, test = qa_mod.QAEvaluator(qa_mod.QAParams(max_train_images=160, max_test_images=60), shapes_data,
                                     vision, text, fus).items()
    prior = {t: Counter(q.answer for q in train if q.type == t).most_common(1)[0][0] for t in scene_tasks.QA_TYPES}
    for t in scene_tasks.QA_TYPES:
        of_type = [q for q in test if q.type == t]
        assert a.metrics[f"majority_{t}"] == pytest.approx(sum(q.answer == prior[t] for q in of_type) / len(of_type))


class BagOfWords(ports.TextTower):
    """A fake text tower: token t of a question is the one-hot of its id (so the mean pool is a bag of words)."""

    def __init__(self, tokenizer, width: int):
        super().__init__()
        self.tokenizer, self.width = tokenizer, width
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, ids, mask):
        return torch.nn.functional.one_hot(ids % self.width, self.width).float() + 0 * self.weight


class SceneTower(ports.VisionTower):
    """A fake vision tower that sees the scene graph: the CLS token is the multi-hot of the (colour, shape)
    classes in the image, looked up by the image's key (pixel 0; see KeyedSplit)."""

    def __init__(self, splits):
        super().__init__()
        rows = []
        for split in splits:
            for i in range(len(split)):
                row = torch.zeros(24)
                for k in range(int(split.counts[i])):
                    row[int(split.colour[i, k]) * 4 + int(split.shape[i, k])] = 1
                rows.append(row)
        self.register_buffer("table", torch.stack(rows))
        self.width, self.num_prefix_tokens, self.patch_size, self.grid_size = 24, 1, 1, (1, 1)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].round().long()][:, None] + 0 * self.weight


class KeyedSplit(torch.utils.data.Dataset):
    """A shapes split whose images are replaced by their key ``offset + i`` (what SceneTower looks up)."""

    def __init__(self, split, offset: int):
        self.split, self.offset = split, offset

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(self.offset + i)), "caption": self.split.captions[i],
                "sample_id": i}

    def scene(self, i):
        return self.split.scene(i)


def test_the_head_learns_what_the_representation_carries(shapes_data, tmp_path):
    """Towers that see which objects are present (and read the question's words): the head answers 'exists'
    far above its majority baseline, and no better than it once the image carries nothing."""
    c = build_ctx("qa", cache=tmp_path / "cache", base_dir=tmp_path)
    _, text, _ = towers(shapes_data, c, fusion=False)
    data = shapes_mod.ShapesData(shapes_data.folder, shapes_data.params)
    data.train = data.train_pairs = KeyedSplit(shapes_data.train_pairs, 0)
    data.test = KeyedSplit(shapes_data.test, len(shapes_data.train_pairs))
    words = BagOfWords(text.tokenizer, 512)
    vision = SceneTower([shapes_data.train_pairs, shapes_data.test])
    params = dict(types=["exists"], steps=300, batch_size=64, lr=3e-3, max_train_images=400, max_test_images=400)
    m = qa(data, vision, words, None, c, **params).metrics
    print(m)
    assert m["accuracy"] > m["majority"] + 0.15, m
    vision.table.zero_()
    blind = qa(data, vision, words, None, c, **params).metrics
    print(blind)
    assert blind["accuracy"] < blind["majority"] + 0.08, blind


# ------------------------------------------------------------------------------- VQAv2-style files


def test_vqa_files_load_and_drive_the_evaluator(shapes_data, tmp_path):
    items = qa_mod.load_vqa(DATA / "vqa_questions.json", DATA / "vqa_annotations.json", 64, "test")
    assert [(q.image, q.question, q.answer, q.type) for q in items[:2]] == [
        (0, "how many shapes are in the picture?", "2", "number"), (1, "is there a red circle?", "no", "yes/no")]
    for name in ("vqa_questions.json", "vqa_annotations.json", "vqa_train_questions.json", "vqa_train_annotations.json"):
        shutil.copy(DATA / name, tmp_path / name)
    c = build_ctx("qa", cache=tmp_path / "cache", base_dir=tmp_path)
    vision, text, fus = towers(shapes_data, c)
    result = qa(shapes_data, vision, text, fus, c, questions="vqa_questions.json", annotations="vqa_annotations.json",
                train_questions="vqa_train_questions.json", train_annotations="vqa_train_annotations.json")
    assert result.metrics["n"] == len(items) and {"accuracy_yes_no", "accuracy_number", "majority_other"} <= set(result.metrics)


def test_vqa_image_outside_the_test_split_is_a_clear_error(shapes_data, tmp_path):
    doc = json.loads((DATA / "vqa_questions.json").read_text())
    doc["questions"][1]["image_id"] = 400
    (tmp_path / "q.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"q.json: question 1 \(question_id 1001\) is about image_id 400, which is not "
                                        r"in the test split \(400 images: ids 0..399\)"):
        qa_mod.load_vqa(tmp_path / "q.json", DATA / "vqa_annotations.json", len(shapes_data.test), "test")
    with pytest.raises(UserError, match="has no annotation"):
        qa_mod.load_vqa(DATA / "vqa_train_questions.json", DATA / "vqa_annotations.json", 400, "training")


def test_vqa_params_come_as_a_set(tmp_path):
    with pytest.raises(ValueError, match="need all of questions, annotations, train_questions, train_annotations"):
        qa_mod.QAParams(questions="q.json", annotations="a.json")


# -------------------------------------------------------------------------------------- refusals


class ShapesWithoutScenes(ports.PairedData):
    def __init__(self, data):
        self.train, self.test, self.capabilities = data.train, data.test, frozenset({ports.PAIRED})


def test_refusals(shapes_data, tmp_path):
    c = build_ctx("qa", cache=tmp_path / "cache", base_dir=tmp_path)
    vision, text, fus = towers(shapes_data, c)
    other_vision, _, _ = towers(shapes_data, c, fusion=False)
    build = lambda data=shapes_data, v=vision, f=fus, **p: qa_mod.build(  # noqa: E731
        qa_mod.QAParams(**p), {"model": FakeModel(), "data": data, "vision": v, "text": text, "fusion": f}, c)
    with pytest.raises(UserError, match=r"node 'qa' \(evaluator.qa\): its data has no scene graphs"):
        build(ShapesWithoutScenes(shapes_data))
    for name in ("vqa_questions.json", "vqa_annotations.json", "vqa_train_questions.json", "vqa_train_annotations.json"):
        shutil.copy(DATA / name, tmp_path / name)
    files = dict(questions="vqa_questions.json", annotations="vqa_annotations.json",
                 train_questions="vqa_train_questions.json", train_annotations="vqa_train_annotations.json")
    assert len(build(ShapesWithoutScenes(shapes_data), **files).items()[1]) == 12  # with VQAv2 files: no scenes needed
    with pytest.raises(UserError, match="fuses other towers than the 'vision' and 'text' inputs"):
        build(v=other_vision)
    with pytest.raises(UserError, match="finetune 'fusion' needs a fusion encoder"):
        build(f=None, finetune="fusion")
    assert qa_mod.check(qa_mod.QAParams(finetune="fusion"), {"fusion": []}) != []
    with pytest.raises(ValueError, match="unknown question type"):
        qa_mod.QAParams(types=["count", "colours"])
