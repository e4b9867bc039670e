"""dataset.shapes and dataset.captions: determinism, nesting, noise, boxes, caching, manifests."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.helpers import build_ctx
from vlpgraph.engine import registry
from vlpgraph.errors import UserError
from vlpgraph.engine.ports import BOXES, CLASSES, LABELS, PAIRED, SCENES, default_collate

import vlpgraph.nodes.datasets.captions as captions_mod
import vlpgraph.nodes.datasets.shapes as shapes_mod


def build_shapes(root: Path, **params):
    # The modules' build functions directly: these tests do not depend on other node modules importing.
    return shapes_mod.build(shapes_mod.ShapesParams(**params), {}, build_ctx("shapes", cache=root))


SMALL = dict(train_size=600, test_size=300)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A noisy build and the clean build of the same data seed."""
    root = tmp_path_factory.mktemp("shapes")
    noisy = build_shapes(root, train_size=2000, test_size=1000, caption_noise=0.3)
    clean = build_shapes(root, train_size=2000, test_size=1000, caption_noise=0.0)
    return noisy, clean


# ------------------------------------------------------------------------------------------ shapes


def test_registered_kind_and_doc():
    kind = registry.get("dataset.shapes")
    assert kind.build is shapes_mod.build
    assert kind.provides(kind.params()) == {PAIRED, BOXES, CLASSES, LABELS, SCENES}
    assert kind.summary and len(kind.summary) < 120
    for name, field in kind.params.model_fields.items():
        assert field.description, f"param {name} has no description"
    assert set(kind.params.model_fields) >= {
        "train_size", "test_size", "image_size", "max_objects", "min_objects", "caption_noise",
        "noise_partial", "train_fraction", "data_seed", "zeroshot_fraction",
    }


@pytest.mark.parametrize(
    "bad",
    [{"image_size": 20}, {"image_size": 8}, {"min_objects": 3, "max_objects": 2}, {"max_objects": 5},
     {"caption_noise": 1.5}, {"train_fraction": 0.0}, {"train_sise": 10}],
)
def test_params_rejected(bad):
    with pytest.raises(ValidationError):
        shapes_mod.ShapesParams(**bad)


def test_determinism(tmp_path):
    a = build_shapes(tmp_path / "a", **SMALL, caption_noise=0.2)
    b = build_shapes(tmp_path / "b", **SMALL, caption_noise=0.2)
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert np.array_equal(sa.images, sb.images)
        assert sa.captions == sb.captions
        assert np.array_equal(sa.boxes, sb.boxes) and np.array_equal(sa.mentioned, sb.mentioned)
    # Sample i does not depend on how many samples there are.
    small = build_shapes(tmp_path / "c", train_size=100, test_size=50, caption_noise=0.2)
    assert np.array_equal(small.train.images, a.train.images[:100])
    assert small.train.captions == a.train.captions[:100]
    assert np.array_equal(small.train.noise_kind, a.train.noise_kind[:100])
    assert np.array_equal(small.test.images, a.test.images[:50])
    # Another data seed gives other data.
    other = build_shapes(tmp_path / "d", train_size=100, test_size=50, caption_noise=0.2, data_seed=1)
    assert not np.array_equal(other.train.images, small.train.images)


def test_nested_fractions_share_one_cache(tmp_path):
    full = build_shapes(tmp_path, **SMALL, train_fraction=1.0)
    prev = None
    for f in (0.1, 0.2, 0.7):
        d = build_shapes(tmp_path, **SMALL, train_fraction=f)
        assert len(d.train) == math.ceil(round(f * 600, 6))
        assert len(d.test) == 300
        assert d.train_captions() == full.train.captions[: len(d.train)]
        ids = [d.train[i]["sample_id"] for i in range(len(d.train))]
        assert ids == list(range(len(d.train)))
        if prev is not None:
            assert prev.train_captions() == d.train_captions()[: len(prev.train)]
        prev = d
    assert len(list((tmp_path / "shapes").iterdir())) == 1


def test_cache_reuse_does_not_regenerate(tmp_path, monkeypatch):
    build_shapes(tmp_path, **SMALL)
    folder = next((tmp_path / "shapes").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(shapes_mod, "generate_split", boom)
    d = build_shapes(tmp_path, **SMALL, train_fraction=0.5)
    assert len(d.train) == 300
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(AssertionError, match="regenerated"):  # other generation params: a new cache
        build_shapes(tmp_path, **SMALL, data_seed=3)


def test_test_split_disjoint_and_clean(noisy):
    data, _ = noisy
    assert (data.test.noise_kind == 0).all()
    assert data.test.mentioned[np.arange(len(data.test)), 0].any()
    train_hashes = {im.tobytes() for im in data.train.images}
    assert not any(im.tobytes() in train_hashes for im in data.test.images)
    assert len(set(data.test.captions) & set(data.train.captions)) < 0.1 * len(data.test)


def test_caption_noise_rate_and_kinds(noisy):
    data, clean = noisy
    kind = data.train.noise_kind
    rate = (kind > 0).mean()
    assert abs(rate - 0.3) < 0.04, rate
    partial = (kind == 1).sum() / max(1, (kind > 0).sum())
    assert abs(partial - 0.5) < 0.08, partial
    assert (clean.train.noise_kind == 0).all()
    # Content does not depend on caption_noise; only the noisy captions change.
    assert np.array_equal(data.train.images, clean.train.images)
    for i in range(len(data.train)):
        if kind[i] == 0:
            assert data.train.captions[i] == clean.train.captions[i]
        else:
            assert data.train.captions[i] != clean.train.captions[i]
        if kind[i] == 2:
            assert not data.train.mentioned[i].any()
            assert data.train.captions[i] in clean.train.captions[:i] or i == 0


def _phrases(split, i):
    n = int(split.counts[i])
    return [f"{shapes_mod.COLOURS[split.colour[i, k]]} {shapes_mod.SHAPES[split.shape[i, k]]}" for k in range(n)]


def test_clean_captions_name_exactly_the_mentioned_objects(noisy):
    data, _ = noisy
    for split in (data.train, data.test):
        for i in range(len(split)):
            cap = split.captions[i]
            names = _phrases(split, i)
            if split.noise_kind[i] == 0:
                for k, name in enumerate(names):
                    assert (name in cap) == bool(split.mentioned[i, k]), (cap, names, split.mentioned[i])
                assert split.mentioned[i, : len(names)].any()
            elif split.noise_kind[i] == 1:
                # ``mentioned`` keeps only the objects still described correctly; one named class is
                # not in the image.
                for k, name in enumerate(names):
                    if split.mentioned[i, k]:
                        assert name in cap, (cap, names, split.mentioned[i])
                said = re.findall(r"(\w+ (?:circle|square|triangle|cross))", cap)
                said = [s.split()[-2] + " " + s.split()[-1] for s in said]
                assert any(s not in names for s in said), (cap, names)


def test_objects_are_drawn_where_their_boxes_say(noisy):
    data, _ = noisy
    split = data.test
    S = data.image_size
    for i in range(300):
        for k in range(int(split.counts[i])):
            x0, y0, x1, y1 = split.boxes[i, k]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            pix = split.images[i, cy, cx].astype(float)
            want = shapes_mod.COLOUR_RGB[split.colour[i, k]]
            assert np.abs(pix - want).max() < 60, (i, k, pix, want)
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S


def test_boxes_inside_nonempty_disjoint(noisy):
    data, _ = noisy
    S = data.image_size
    for split in (data.train, data.test):
        counts = split.counts
        assert counts.min() >= 1 and counts.max() <= 4
        for i in range(len(split)):
            b = split.boxes[i, : counts[i]]
            assert (b >= 0).all() and (b <= S).all()
            assert ((b[:, 2] - b[:, 0]) >= 2).all() and ((b[:, 3] - b[:, 1]) >= 2).all()
            for j in range(len(b)):
                for k in range(j):
                    overlap_x = min(b[j, 2], b[k, 2]) - max(b[j, 0], b[k, 0])
                    overlap_y = min(b[j, 3], b[k, 3]) - max(b[j, 1], b[k, 1])
                    assert overlap_x <= 0 or overlap_y <= 0


_REL = re.compile(
    r"a (?:\w+ )?(\w+ (?:circle|square|triangle|cross)) (to the left of|to the right of|above|below|next to) "
    r"a (?:\w+ )?(\w+ (?:circle|square|triangle|cross))"
)
_POS = re.compile(r"(\w+ (?:circle|square|triangle|cross)) (in the top left|at the top|in the top right|on the left|"
                  r"in the middle|on the right|in the bottom left|at the bottom|in the bottom right)")


def test_relations_and_positions_are_true(noisy):
    data, _ = noisy
    split, S = data.test, data.image_size
    n_rel = n_pos = 0
    for i in range(len(split)):
        names = _phrases(split, i)
        boxes = split.boxes[i]
        for a, rel, b in _REL.findall(split.captions[i]):
            A, B = boxes[names.index(a)], boxes[names.index(b)]
            n_rel += 1
            if rel == "to the left of":
                assert A[2] <= B[0]
            elif rel == "to the right of":
                assert A[0] >= B[2]
            elif rel == "above":
                assert A[3] <= B[1]
            elif rel == "below":
                assert A[1] >= B[3]
            else:
                assert max(B[0] - A[2], A[0] - B[2], B[1] - A[3], A[1] - B[3]) <= 0.15 * S
        for name, where in _POS.findall(split.captions[i]):
            box = boxes[names.index(name)]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            n_pos += 1
            if "left" in where:
                assert cx < S / 3
            if "right" in where:
                assert cx > 2 * S / 3
            if "top" in where:
                assert cy < S / 3
            if "bottom" in where:
                assert cy > 2 * S / 3
            if where == "in the middle":
                assert S / 3 <= cx <= 2 * S / 3 and S / 3 <= cy <= 2 * S / 3
    assert n_rel > 50 and n_pos > 100


def test_captions_varied(noisy):
    data, _ = noisy
    caps = data.test.captions
    dup = sum(c for c in Counter(caps).values() if c > 1) / len(caps)
    assert dup < 0.03, dup
    assert max(len(c.split()) for c in caps) <= 20


def test_zeroshot_set(noisy):
    data, _ = noisy
    zs = data.zeroshot
    assert zs.prompt == "a {}" and len(zs.class_names) == 24 and "red circle" in zs.class_names
    assert abs(len(zs.indices) / len(data.test) - 0.3) < 0.05
    for idx, label in zip(zs.indices, zs.labels):
        assert data.test.counts[idx] == 1
        assert zs.class_names[label] == _phrases(data.test, idx)[0]
        assert data.test[idx]["label"] == label
    others = np.setdiff1d(np.arange(len(data.test)), zs.indices)
    assert (data.test.counts[others] > 1).all() and (data.test.labels[others] == -1).all()


def test_items_and_collate(tmp_path):
    d = build_shapes(tmp_path, train_size=64, test_size=16, image_size=16, caption_noise=0.5)
    item = d.train[5]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert isinstance(item["caption"], str) and item["sample_id"] == 5
    k = int(d.train.counts[5])
    assert item["boxes"].shape == (k, 4) and item["mentioned"].dtype == torch.bool
    back = d.denormalize(item["image"][None])[0]
    raw = torch.from_numpy(np.array(d.train.images[5])).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, raw, atol=1e-5)
    many = d.train.__getitems__([5, 0, 63])
    assert torch.equal(many[0]["image"], item["image"]) and many[0]["caption"] == item["caption"]
    batch = default_collate(many)
    assert batch["images"].shape == (3, 3, 16, 16) and batch["sample_ids"].tolist() == [5, 0, 63]
    assert len(batch["boxes"]) == 3 and batch["label"].shape == (3,)
    with pytest.raises(IndexError):
        d.train[64]
    loader = torch.utils.data.DataLoader(d.train, batch_size=32, collate_fn=d.collate)
    assert sum(len(b["captions"]) for b in loader) == 64


def test_64px_and_one_object_only(tmp_path):
    d = build_shapes(tmp_path, train_size=40, test_size=20, image_size=64, max_objects=1)
    assert d.train.images.shape == (40, 64, 64, 3)
    assert (d.train.counts == 1).all() and (d.test.labels >= 0).all()
    assert len(d.zeroshot.indices) == 20


# ---------------------------------------------------------------------------------------- captions


def build_captions(root: Path, logs: list | None = None, **params):
    ctx = build_ctx("caps", cache=root / "cache", log=logs)
    return captions_mod.build(captions_mod.CaptionsParams(**params), {}, ctx)


@pytest.fixture
def folder(tmp_path):
    """20 PNGs (40 x 30), of which img_03 is missing and img_07 corrupt; manifests in three formats."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(20):
        name = f"img_{i:02d}.png"
        if i == 7:
            (imgs / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif i != 3:
            Image.new("RGB", (40, 30), (10 * i, 255 - 10 * i, 128)).save(imgs / name)
        for c in range(2):  # two captions per image
            boxes = [[0, 0, 20, 15], [30, 20, 40, 30]]
            rows.append({"image": name, "caption": f"picture {i} caption {c}", "boxes": boxes})
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "boxes"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "boxes": json.dumps(r["boxes"])})
    names = list(dict.fromkeys(r["image"] for r in rows))
    coco = {
        "images": [{"id": 100 + k, "file_name": n} for k, n in enumerate(names)],
        "annotations": [
            {"id": j, "image_id": 100 + names.index(r["image"]), "caption": r["caption"], "boxes": r["boxes"]}
            for j, r in enumerate(rows)
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(coco))
    return tmp_path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_captions_three_formats_skip_bad(folder, fmt):
    logs: list[str] = []
    d = build_captions(folder, logs, annotations=str(folder / f"m.{fmt}"), images=str(folder / "imgs"),
                       max_bad_fraction=0.2, test_size=6, image_size=24, boxes=True)
    assert len(logs) == 1 and "skipped 2 of 20" in logs[0] and "img_03.png" in logs[0] and "img_07.png" in logs[0]
    assert len(d.train) + len(d.test) == 36
    assert len(d.test) == 6
    train_imgs = {r.image for r in d.train.records}
    assert not train_imgs & {r.image for r in d.test.records}
    assert d.capabilities == {PAIRED, BOXES}
    assert d.train_captions()[0] == "picture 0 caption 0"
    item = d.test[0]
    assert item["image"].shape == (3, 24, 24)
    # Resize 40x30 -> 32x24, center crop 24 (x offset 4): [0,0,20,15] -> [0,0,12,12]; [30,20,40,30] -> [20,16,24,24].
    assert torch.allclose(item["boxes"], torch.tensor([[0.0, 0, 12, 12], [20, 16, 24, 24]]))
    assert item["mentioned"].tolist() == [True, True]
    torch.manual_seed(0)
    for i in range(5):
        it = d.train[i]
        assert it["image"].shape == (3, 24, 24)
        assert (it["boxes"] >= 0).all() and (it["boxes"] <= 24).all()
        b = it["boxes"]
        assert it["mentioned"].tolist() == ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).tolist()
    batch = d.collate([d.train[0], d.train[1]])
    assert batch["images"].shape == (2, 3, 24, 24)


def test_captions_too_many_bad_images(folder):
    with pytest.raises(UserError) as e:
        build_captions(folder, annotations=str(folder / "m.jsonl"), images=str(folder / "imgs"))
    msg = str(e.value)
    assert "\n" not in msg and "m.jsonl" in msg and "2 of 20" in msg
    assert "img_03.png (missing)" in msg and "img_07.png (unreadable" in msg


def test_captions_without_boxes_and_fraction(folder):
    full = build_captions(folder, annotations=str(folder / "m.csv"), images=str(folder / "imgs"),
                          max_bad_fraction=0.2, test_size=6, image_size=16)
    assert full.capabilities == {PAIRED}
    assert "boxes" not in full.train[0]
    kind = registry.get("dataset.captions")
    assert kind.build is captions_mod.build
    assert kind.provides(kind.params(annotations="x.csv")) == {PAIRED}
    assert kind.provides(kind.params(annotations="x.csv", boxes=True)) == {PAIRED, BOXES}
    half = build_captions(folder, annotations=str(folder / "m.csv"), images=str(folder / "imgs"),
                          max_bad_fraction=0.2, test_size=6, image_size=16, train_fraction=0.5)
    assert len(half.train) == 15 and half.train_captions() == full.train_captions()[:15]


def test_captions_separate_test_annotations(folder):
    (folder / "t.jsonl").write_text(json.dumps({"image": "img_00.png", "caption": "held out"}) + "\n")
    d = build_captions(folder, annotations=str(folder / "m.jsonl"), test_annotations=str(folder / "t.jsonl"),
                       images=str(folder / "imgs"), max_bad_fraction=0.2, image_size=16)
    assert len(d.train) == 36 and d.test.captions == ["held out"]


def test_captions_relative_to_annotations_folder(folder):
    (folder / "imgs" / "rel.jsonl").write_text(json.dumps({"image": "img_01.png", "caption": "x"}) + "\n"
                                               + json.dumps({"image": "img_02.png", "caption": "y"}) + "\n")
    d = build_captions(folder, annotations=str(folder / "imgs" / "rel.jsonl"), test_size=1, image_size=16)
    assert d.train.captions == ["x"] and d.test.captions == ["y"]


@pytest.mark.parametrize(
    "name, text, params, expect",
    [
        ("x.jsonl", '{"image": "a.png", "text": "hi"}\n', {}, "x.jsonl: no 'caption' column (columns: image, text)"),
        ("x.csv", "path,caption\na.png,hi\n", {}, "x.csv: no 'image' column (columns: path, caption)"),
        ("x.csv", "image,caption\na.png,hi\n", {"boxes": True}, "x.csv: no 'boxes' column"),
        ("x.jsonl", '{"image": "a.png", "caption": "hi"}\n{oops\n', {}, "x.jsonl:2: not valid JSON"),
        ("x.json", '{"images": [], "annotations": [{"image_id": 1, "caption": "c"}]}', {},
         "x.json: annotation 0: image_id 1"),
        ("x.json", "{not json", {}, "x.json: not valid JSON"),
        ("x.json", '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "text": "c"}]}',
         {}, "x.json: no 'caption' column (columns: image, image_id, text)"),
        ("x.txt", "hello", {}, "unsupported annotations format"),
        ("missing.jsonl", None, {}, "missing.jsonl: annotations file not found"),
    ],
)
def test_captions_bad_annotations(tmp_path, name, text, params, expect):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        build_captions(tmp_path, annotations=str(tmp_path / name), **params)
    msg = str(e.value)
    assert not msg.startswith("vlpgraph: ") and "\n" not in msg  # the CLI adds the prefix
    assert expect in msg, msg
