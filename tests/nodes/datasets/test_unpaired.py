"""Unpaired corpora (issue 11, VLMixer): dataset.shapes with pairing: unpaired (an image corpus and a text
corpus of disjoint scenes, the concept gallery, scene graphs) and dataset.unpaired (real files)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import build_ctx, evaluator, itc, mae, node, shapes, text, tiny_graph, trainer, vit
import vlpgraph.nodes.datasets.shapes as shapes_mod
from vlpgraph.engine import ports
from vlpgraph.cli import main
from vlpgraph.errors import UserError

SMALL = dict(train_size=120, test_size=16, image_size=32, max_objects=3)


def build_shapes(root: Path, **params):
    ctx = build_ctx("d", cache=root, base_dir=root)
    return shapes_mod.build(shapes_mod.ShapesParams(**{**SMALL, **params}), {}, ctx)


# ------------------------------------------------------------------------------------ the streams


def test_no_item_shares_a_scene_across_modalities_and_the_corpora_are_disjoint(tmp_path):
    data = build_shapes(tmp_path, pairing="unpaired")
    N = SMALL["train_size"]
    items = [data.train[k] for k in range(len(data.train))]
    assert len(items) == N  # train_size counts images, as for the other pairings
    image_ids = {it["image_id"] for it in items}
    text_ids = {it["text_id"] for it in items}
    assert all(it["image_id"] != it["text_id"] for it in items)
    assert not image_ids & text_ids and len(image_ids) == len(text_ids) == N
    # each sentence is the caption of its text scene (a training scene that is never drawn), and the
    # image is the image corpus's image of its image scene
    p = data.params
    for it in items[:20]:
        assert it["text_id"] >= N
        assert it["caption"] == shapes_mod.make_scene(p.data_seed, "train", it["text_id"], p).caption
        assert torch.equal(it["image"], data.train_pairs[it["image_id"]]["image"])
    # no sentence of an image-corpus scene reaches training
    image_captions = [data.train_pairs.captions[i] for i in sorted(image_ids)]
    assert data.train_captions() == [it["caption"] for it in items]
    assert len(set(data.train_captions())) > 0.8 * N and data.train_captions() != image_captions
    assert {ports.UNPAIRED, ports.GALLERY, ports.SCENES} <= data.capabilities and ports.PAIRED not in data.capabilities


def test_unpaired_batches_and_equal_data_with_a_paired_run(tmp_path):
    unpaired = build_shapes(tmp_path, pairing="unpaired", train_fraction=0.5)
    paired = build_shapes(tmp_path, train_fraction=0.5)
    assert unpaired.folder == paired.folder  # one cached folder for every pairing
    assert len(unpaired.train) == len(paired.train) == 60
    facts = shapes_mod.facts(unpaired.params, tmp_path)  # what validation knows: one item per image
    assert facts["train_size"] == facts["train_images"] == 60
    assert np.array_equal(unpaired.train_pairs.images, paired.train.images)  # the very same images
    full = build_shapes(tmp_path, pairing="unpaired")
    assert unpaired.train.text_ids == full.train.text_ids[:60]  # nested fractions keep a prefix of both corpora
    batch = unpaired.collate(unpaired.train.__getitems__([3, 0, 7]))
    assert set(batch) == {"images", "captions", "image_ids", "text_ids", "sample_ids"}
    assert batch["images"].shape == (3, 3, 32, 32) and batch["image_ids"].tolist() == [3, 0, 7]
    assert batch["text_ids"].tolist() == [120 + 3, 120, 120 + 7] and len(batch["captions"]) == 3
    # the test split stays paired and clean
    assert "caption" in unpaired.test[0] and "text_id" not in unpaired.test[0]
    assert unpaired.test.captions == paired.test.captions


def test_paired_data_and_hashes_are_unchanged_by_the_unpaired_params():
    default = shapes_mod.ShapesParams()
    assert "region_size" not in default.model_dump()  # an unset late param stays out of the node hash
    assert shapes_mod.ShapesParams(region_size=16).model_dump()["region_size"] == 16
    assert shapes_mod.cache_key(default) == shapes_mod.cache_key(
        shapes_mod.ShapesParams(pairing="unpaired", region_size=16))
    with pytest.raises(ValueError, match="pairing: unpaired has no image-caption pairs"):
        shapes_mod.ShapesParams(pairing="unpaired", caption_noise=0.2)


# -------------------------------------------------------------------------------------- the gallery


def nearest_colour(rgb: torch.Tensor) -> int:
    return int(((torch.from_numpy(shapes_mod.COLOUR_RGB) - rgb) ** 2).sum(1).argmin())


def test_every_gallery_region_is_its_boxs_object_from_the_image_corpus(tmp_path):
    data = build_shapes(tmp_path, pairing="unpaired", train_fraction=0.5)
    g, images = data.gallery, data.train_pairs
    assert len(g) == int(images.counts.sum())  # every object of the image corpus, nothing else
    mean = torch.tensor(shapes_mod.MEAN).view(3, 1, 1)
    std = torch.tensor(shapes_mod.STD).view(3, 1, 1)
    centre_ok = 0
    for rid in range(len(g)):
        image, concept, image_id, box = g.region(rid)
        assert 0 <= image_id < len(images)  # an image-corpus scene (the text scenes are >= train_size)
        objs = [k for k in range(images.counts[image_id]) if tuple(images.boxes[image_id, k]) == tuple(np.float32(box))]
        assert len(objs) == 1
        k = objs[0]
        assert concept == f"{shapes_mod.COLOURS[images.colour[image_id, k]]} {shapes_mod.SHAPES[images.shape[image_id, k]]}"
        assert rid in g.regions(concept) and image.shape == (3, 32, 32)
        # the crop is centred on the object: its centre pixels have the object's colour
        centre = ((image * std + mean) * 255)[:, 14:18, 14:18].mean((1, 2))
        centre_ok += nearest_colour(centre) == images.colour[image_id, k]
    assert centre_ok == len(g)
    assert set(g.concepts) <= set(shapes_mod.CLASS_NAMES) and len(g.concepts) > 12
    # sample: one of the concept's regions, a pure function of the generator
    c = g.concepts[0]
    draws = [g.sample(c, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(draws) <= set(g.regions(c)) and len(set(draws)) > 1
    assert draws == [g.sample(c, torch.Generator().manual_seed(s)) for s in range(20)]
    some = g.regions(c)[:3] + g.regions(g.concepts[-1])[:3]
    batched = g.region_images(some)  # one resampling call: the same pixels as region() one by one
    assert batched.shape == (len(some), 3, 32, 32) and len(some) >= 4
    assert torch.allclose(batched, torch.stack([g.region(r)[0] for r in some]), atol=1e-4)
    # DataLoader workers may get the data (its collate) pickled
    assert torch.equal(pickle.loads(pickle.dumps(data)).gallery.region(5)[0], g.region(5)[0])
    small = build_shapes(tmp_path, pairing="unpaired", region_size=16).gallery
    assert small.region(0)[0].shape == (3, 16, 16)


def test_scene_graphs_describe_the_images(tmp_path):
    data = build_shapes(tmp_path)
    test = data.test
    for i in range(len(test)):
        scene = test.scene(i)
        assert len(scene.objects) == test.counts[i]
        if test.labels[i] >= 0:  # single-object images: the scene's one object is the labelled class
            o = scene.objects[0]
            assert f"{o.colour} {o.shape}" == shapes_mod.CLASS_NAMES[test.labels[i]]
        for k, o in enumerate(scene.objects):
            assert o.size in ("small", "large") and o.box == tuple(float(v) for v in test.boxes[i, k])
            if test.mentioned[i, k]:  # the caption names every mentioned object as "<colour> <shape>"
                assert f"{o.colour} {o.shape}" in test.captions[i]


# ------------------------------------------------------------------------------ through the trainer


@pytest.mark.integration
def test_a_trainer_steps_over_unpaired_batches_and_frozen_transfer_judges_it(tmp_path, capsys):
    path = tiny_graph(tmp_path, "g.yaml", graph="t", nodes={
        "shapes": shapes(image_size=32, pairing="unpaired"), "vision": vit(), "mae": mae(),
        "train": trainer("mae", batch_size=8, max_steps=2, warmup_steps=1),
        "probe": evaluator("linear_probe", inputs={"encoder": "vision"}, steps=3)})
    assert main(["run", str(path), "--store", str(tmp_path / "store")]) == 0, capsys.readouterr().err
    from vlpgraph.store import Store

    store = Store(tmp_path / "store")
    run = store.runs()[0]
    assert run["status"] == "completed"
    assert ("probe", "top1") in {(e["evaluator"], e["metric"]) for e in store.evals([run["run_id"]])}


# ------------------------------------------------------------------------------ dataset.unpaired


def write_corpora(tmp_path: Path) -> None:
    """imgs/img_0..5.png (img_0 has a pure red box at x 2..12, y 2..10), a list naming them plus a missing
    and a corrupt file, a text file, COCO instances and a paired COCO-captions test file."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        a = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        if i == 0:
            a[2:10, 2:12] = (255, 0, 0)
        Image.fromarray(a).save(img_dir / f"img_{i}.png")
    (img_dir / "corrupt.png").write_bytes(b"not a png at all")
    names = [f"imgs/img_{i}.png" for i in range(6)] + ["imgs/missing.png", "imgs/corrupt.png"]
    (tmp_path / "images.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "texts.txt").write_text("a red circle on the left\n\n  a dog   and a cat\nthree shapes\nhello\nbye\n")
    instances = {
        "images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)] + [{"id": 99, "file_name": "imgs/other.png"}],
        "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "red  circle"}],
        "annotations": [
            {"image_id": 10, "category_id": 1, "bbox": [2, 2, 10, 8]},
            {"image_id": 11, "category_id": 3, "bbox": [0, 0, 12, 12]},
            {"image_id": 12, "category_id": 3, "bbox": [0, 0, 12, 12], "iscrowd": 1},  # crowd: left out
            {"image_id": 13, "category_id": 3, "bbox": [0, 0, 2, 12]},  # under min_box_size: left out
            {"image_id": 17, "category_id": 1, "bbox": [0, 0, 12, 12]},  # the corrupt image: left out
            {"image_id": 99, "category_id": 1, "bbox": [0, 0, 12, 12]},  # not in the corpus: left out
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    test = {"images": [{"id": 1, "file_name": "imgs/img_4.png"}, {"id": 2, "file_name": "imgs/img_5.png"}],
            "annotations": [{"image_id": 1, "caption": "a test caption"}, {"image_id": 2, "caption": "another"}]}
    (tmp_path / "test.json").write_text(json.dumps(test))


def build_unpaired(tmp_path: Path, logs: list, **params):
    import vlpgraph.nodes.datasets.unpaired as unpaired_mod

    p = unpaired_mod.UnpairedParams(images="images.txt", texts="texts.txt", test_annotations="test.json",
                                    instances="instances.json", image_size=16, min_box_size=4, **params)
    return unpaired_mod.build(p, {}, build_ctx("d", cache=tmp_path / "cache", base_dir=tmp_path, log=logs))


def test_dataset_unpaired_skips_and_counts_a_missing_and_a_corrupt_image(tmp_path):
    write_corpora(tmp_path)
    logs: list[str] = []
    data = build_unpaired(tmp_path, logs, max_bad_fraction=0.25)
    assert any("skipped 2 of 8 images" in m and "missing.png (missing)" in m and "corrupt.png (unreadable" in m
               for m in logs), logs
    assert any("left out 2 of 4 boxes" in m for m in logs), logs  # the corrupt image's and the outside one
    assert {ports.UNPAIRED, ports.GALLERY} == data.capabilities
    # 6 readable images, 5 sentences: 6 items, the text corpus repeating; nothing pairs them
    assert len(data.train) == 6 and data.train_captions()[1] == "a dog and a cat"
    items = [data.train[k] for k in range(6)]
    assert [it["image_id"] for it in items] == list(range(6)) and [it["text_id"] for it in items] == [0, 1, 2, 3, 4, 0]
    assert items[0]["image"].shape == (3, 16, 16) and items[5]["caption"] == "a red circle on the left"
    batch = data.collate(items[:4])
    assert batch["images"].shape == (4, 3, 16, 16) and batch["text_ids"].tolist() == [0, 1, 2, 3]
    # the gallery: the two usable boxes, concepts named as the categories (in id order)
    g = data.gallery
    assert g.concepts == ["red circle", "dog"] and len(g) == 2
    image, concept, image_id, box = g.region(g.regions("red circle")[0])
    assert concept == "red circle" and image_id == 0 and box == (2.0, 2.0, 12.0, 10.0)
    rgb = image * torch.tensor(data.std).view(3, 1, 1) + torch.tensor(data.mean).view(3, 1, 1)
    assert image.shape == (3, 16, 16) and torch.allclose(rgb, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1), atol=0.02)
    assert g.region(g.regions("dog")[0])[2] == 1
    assert torch.equal(pickle.loads(pickle.dumps(data)).gallery.region(0)[0], g.region(0)[0])
    # the paired test split; no training pairs for frozen-transfer heads
    assert [data.test[i]["caption"] for i in range(len(data.test))] == ["a test caption", "another"]
    with pytest.raises(UserError, match="no image-caption pairs for training"):
        data.paired_train()


def test_dataset_unpaired_past_the_tolerance_fails_clearly(tmp_path):
    write_corpora(tmp_path)
    with pytest.raises(UserError) as e:
        build_unpaired(tmp_path, [], max_bad_fraction=0.1)
    assert str(e.value).startswith(f"{tmp_path / 'images.txt'}: 2 of 8 images are missing or unreadable, "
                                   "more than max_bad_fraction=0.1: missing.png (missing), corrupt.png (unreadable")


def test_dataset_unpaired_folder_facts_and_validation(tmp_path, capsys):
    import vlpgraph.nodes.datasets.unpaired as unpaired_mod

    write_corpora(tmp_path)
    (tmp_path / "imgs" / "corrupt.png").unlink()
    p = unpaired_mod.UnpairedParams(images="imgs", texts="texts.txt", test_annotations="test.json", image_size=16)
    assert unpaired_mod.facts(p, tmp_path)["train_size"] == 6
    data = unpaired_mod.build(p, {}, build_ctx("d", cache=tmp_path / "cache", base_dir=tmp_path))
    assert len(data.train) == 6 and data.gallery is None and data.capabilities == {ports.UNPAIRED}
    fp = unpaired_mod.fingerprint(p, tmp_path)
    (tmp_path / "texts.txt").write_text("an edited corpus\n")
    assert unpaired_mod.fingerprint(p, tmp_path)["texts"] != fp["texts"]
    corpora = node("dataset.unpaired", images="imgs", texts="texts.txt", test_annotations="test.json", image_size=16)
    graph = tiny_graph(tmp_path, "g.yaml", graph="t", nodes={
        "corpora": corpora, "vision": vit(image_size=16), "text": text("corpora"), "itc": itc(),
        "train": trainer("itc", data="corpora", batch_size=2)})
    assert main(["validate", str(graph)]) == 2
    assert (f"{graph}:15: node 'itc' (objective.itc): needs paired data (it treats each image and caption of a batch "
            "as a pair), but the trainer's data 'corpora' (dataset.unpaired) provides unpaired") in capsys.readouterr().err
