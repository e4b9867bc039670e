"""Interleaved documents (issue 10, LCL): dataset.shapes with pairing: interleaved, dataset.interleaved
(MMC4-style JSONL), ports.collate_documents, and the ``interleaved`` capability in validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import build_ctx, evaluator, node, shapes, tiny_graph, trainer, vit
import vlpgraph.nodes.datasets.interleaved as inter_mod
import vlpgraph.nodes.datasets.shapes as shapes_mod
from vlpgraph.engine import ports, registry
from vlpgraph.cli import main
from vlpgraph.errors import UserError
from vlpgraph.engine.ports import INTERLEAVED
from vlpgraph.engine.registry import In, Params

SMALL = dict(train_size=120, test_size=16, image_size=16, max_objects=2)


def build_shapes(root: Path, **params):
    ctx = build_ctx("d", cache=root, base_dir=root)
    return shapes_mod.build(shapes_mod.ShapesParams(**{**SMALL, **params}), {}, ctx)


def layouts_ok(doc_layout, n_images: int, n_texts: int) -> bool:
    """Every image and every text exactly once."""
    return (sorted(j for w, j in doc_layout if w == "image") == list(range(n_images))
            and sorted(k for w, k in doc_layout if w == "text") == list(range(n_texts)))


# ------------------------------------------------------------------------------------ placement


def placement_rate(layouts) -> tuple[float, int]:
    """Share of images standing right before their own sentence (text j of shapes documents)."""
    first = total = 0
    for layout in layouts:
        for pos, (what, j) in enumerate(layout):
            if what == "image":
                total += 1
                first += pos + 1 < len(layout) and layout[pos + 1] == ("text", j)
    return first / total, total


@pytest.mark.parametrize("p_first", [0.5, 0.2])
def test_shapes_image_before_its_sentence_at_rate_image_first_p(p_first):
    # 3000 documents of 6 images: n = 18000 placements, binomial sd = sqrt(p(1-p)/n) <= 0.0037; the
    # tolerance 0.02 is > 5 sd (a fair rule fails with probability < 1e-6), while a rule that ignored
    # the param (0.5 when asked 0.2) or always placed the image on one side would be off by >= 0.3.
    p = shapes_mod.ShapesParams(**SMALL, pairing="interleaved", image_first_p=p_first, filler_sentences=0.5)
    rate, n = placement_rate(shapes_mod.document_layout(p, d, 6)[0] for d in range(3000))
    assert n == 18000
    assert abs(rate - p_first) < 0.02, rate


def test_built_documents_place_images_at_half_rate(tmp_path):
    # The same on the built data (2000 images, so n = 2000 placements, sd 0.011): tolerance 0.05 (> 4 sd).
    data = build_shapes(tmp_path, train_size=2000, pairing="interleaved")
    rate, n = placement_rate(data.train.document(d)[2] for d in range(len(data.train)))
    assert n == 2000
    assert abs(rate - 0.5) < 0.05, rate


def test_interleaved_jsonl_placement_rate():
    # dataset.interleaved's rule (no image is opened by arrange): 4000 documents of 3 images matched to
    # sentences 0..2, n = 12000, sd 0.0046, tolerance 0.02 (> 4 sd).
    before = total = 0
    for line in range(1, 4001):
        doc = inter_mod.Document(["a", "b", "c"], [(Path(f"{k}.png"), k) for k in range(3)], line)
        a = inter_mod.arrange(doc, 0, 0.5, 6)
        assert layouts_ok(a.layout, 3, 3)
        for pos, (what, j) in enumerate(a.layout):
            if what == "image":
                total += 1
                nxt = a.layout[pos + 1] if pos + 1 < len(a.layout) else None
                before += nxt is not None and nxt[0] == "text" and a.texts[nxt[1]] == a.matched[j]
    assert total == 12000 and abs(before / total - 0.5) < 0.02


# ------------------------------------------------------------------------------------ documents


def test_documents_are_deterministic_and_made_of_the_paired_splits_images(tmp_path):
    a = build_shapes(tmp_path / "a", pairing="interleaved", caption_noise=0.3, filler_sentences=0.3)
    b = build_shapes(tmp_path / "b", pairing="interleaved", caption_noise=0.3, filler_sentences=0.3)
    paired = build_shapes(tmp_path / "a", caption_noise=0.3)
    assert len(a.train) == len(b.train) < len(paired.train)
    ids = []
    for d in range(len(a.train)):
        x, y = a.train[d], b.train[d]
        assert x["texts"] == y["texts"] and x["layout"] == y["layout"] and x["image_ids"] == y["image_ids"]
        assert torch.equal(x["images"], y["images"])
        # the document's images are the paired split's scenes, pixel for pixel, with their captions
        assert torch.equal(x["images"], torch.stack([paired.train[i]["image"] for i in x["image_ids"]]))
        assert x["texts"][: len(x["image_ids"])] == [paired.train.captions[i] for i in x["image_ids"]]
        ids += x["image_ids"]
    # equal image counts: every training image of the paired split is in exactly one document, in order
    assert ids == list(range(SMALL["train_size"]))
    assert shapes_mod.facts(a.params, tmp_path) == {"train_size": len(a.train), "train_images": 120,
                                                    "test_size": 16, "image_size": 16}
    # the test split and zero-shot set are the paired ones
    assert a.test.captions == paired.test.captions and a.zeroshot.indices == paired.zeroshot.indices
    assert ports.PAIRED in paired.capabilities and INTERLEAVED not in paired.capabilities
    assert INTERLEAVED in a.capabilities and ports.PAIRED not in a.capabilities
    # both pairings share one generated folder (the arrays do not depend on the grouping)
    assert len(list((tmp_path / "a" / "shapes").iterdir())) == 1


def test_documents_hold_one_to_max_images_and_nest_across_train_fractions(tmp_path):
    full = build_shapes(tmp_path, train_size=600, pairing="interleaved", max_images=4)
    sizes = [len(full.train.document(d)[0]) for d in range(len(full.train))]
    assert set(sizes[:-1]) == {1, 2, 3, 4}  # the last may be cut by the end of the split
    assert 1 <= sizes[-1] <= 4 and sum(sizes) == 600
    assert abs(np.mean(sizes[:-1]) - 2.5) < 0.25  # uniform 1..4: mean 2.5, sd of the mean ~0.09
    for d in range(len(full.train)):
        ids, texts, layout = full.train.document(d)
        assert layouts_ok(layout, len(ids), len(texts))
    half = build_shapes(tmp_path, train_size=600, pairing="interleaved", max_images=4, train_fraction=0.5)
    for d in range(len(half.train) - 1):  # a prefix of the documents; only the last may be shorter
        assert half.train.document(d) == full.train.document(d)
    last = half.train.document(len(half.train) - 1)
    assert last[0][-1] == 299 and set(last[0]) <= set(full.train.document(len(half.train) - 1)[0])
    one = build_shapes(tmp_path, pairing="interleaved", max_images=1)  # pairs are the one-image special case
    assert len(one.train) == SMALL["train_size"]
    assert all(len(one.train.document(d)[0]) == 1 for d in range(len(one.train)))


def test_fillers_describe_nothing_and_are_training_sentences(tmp_path):
    data = build_shapes(tmp_path, pairing="interleaved", filler_sentences=1.0)
    words = set(shapes_mod.COLOURS) | set(shapes_mod.SHAPES) | {"small", "large", "tiny", "big", "little"}
    fillers = []
    for d in range(len(data.train)):
        ids, texts, layout = data.train.document(d)
        assert len(texts) == 2 * len(ids)  # p = 1: one filler per image
        assert layouts_ok(layout, len(ids), len(texts))
        fillers += texts[len(ids):]
    assert not [f for f in fillers if words & set(f.split())]
    assert len(set(fillers)) > 5
    caps = data.train_captions()
    assert len(caps) == 2 * SMALL["train_size"] and set(fillers) <= set(caps)
    none = build_shapes(tmp_path, pairing="interleaved")
    assert none.train_captions() == list(none.train_pairs.captions)  # no fillers by default


def test_caption_noise_applies_per_sentence(tmp_path):
    data = build_shapes(tmp_path, train_size=600, pairing="interleaved", caption_noise=0.5)
    kinds = data.train_pairs.noise_kind
    mixed = 0
    for d in range(len(data.train)):
        ids, texts, _ = data.train.document(d)
        assert texts == [data.train_pairs.captions[i] for i in ids]
        mixed += len({int(kinds[i] > 0) for i in ids}) == 2
    # a noisy share near caption_noise (n = 600: sd 0.02), and documents mixing clean and noisy
    # sentences (a per-document noise draw would give none)
    assert abs(float((kinds > 0).mean()) - 0.5) < 0.08
    assert mixed > len(data.train) / 4


def test_collate_produces_the_contracts_batch(tmp_path):
    data = build_shapes(tmp_path, pairing="interleaved", filler_sentences=0.5)
    items = [data.train[d] for d in range(5)]
    batch = data.collate(items)
    assert set(batch) == {"images", "image_doc", "image_index", "image_ids", "doc_texts", "doc_layout", "sample_ids"}
    m = [len(it["images"]) for it in items]
    assert batch["images"].shape == (sum(m), 3, 16, 16)
    assert batch["image_doc"].tolist() == [b for b, k in enumerate(m) for _ in range(k)]
    assert batch["image_index"].tolist() == [j for k in m for j in range(k)]
    for b, it in enumerate(items):
        rows = batch["image_doc"] == b
        assert torch.equal(batch["images"][rows], it["images"])
        assert batch["image_ids"][rows].tolist() == it["image_ids"]
    assert batch["doc_texts"] == [it["texts"] for it in items]
    assert batch["doc_layout"] == [it["layout"] for it in items]
    assert batch["sample_ids"].tolist() == [0, 1, 2, 3, 4]
    # the trainer's Collate does not tokenise documents; paired splits collate as before
    from vlpgraph.execution.train import Collate

    class Tok:
        def __call__(self, caps):
            raise AssertionError("documents must not be tokenised by the trainer")

    assert set(Collate(data.collate, Tok())(items)) == set(batch)
    test_batch = data.collate([data.test[i] for i in range(4)])
    assert test_batch["images"].shape == (4, 3, 16, 16) and len(test_batch["captions"]) == 4
    pairs_batch = data.collate([data.train_pairs[i] for i in range(4)])
    assert pairs_batch["captions"] == data.train_pairs.captions[:4]


# ----------------------------------------------------------------------------------- validation


class _NeedsParams(Params):
    pass


def throwaway_registry(monkeypatch) -> None:
    """Register test kinds into a copy of the registry, dropped after the test (the built-in kinds are
    loaded first, so they are not loaded into the copy and lost with it)."""
    registry.load_builtin_kinds()
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))


def register_needs_interleaved(monkeypatch, name: str, build) -> None:
    """Registers, for this test only, objective kind ``name`` (built by ``build``) whose data input needs the
    interleaved capability."""
    throwaway_registry(monkeypatch)
    registry.register(name, params=_NeedsParams, output=ports.Objective, inputs={
        "data": In(ports.PairedData, needs=frozenset({INTERLEAVED}), doc="interleaved data"),
        "vision": In(ports.VisionTower)})(build)


@pytest.fixture
def needs_interleaved_kind(monkeypatch):
    """A throwaway objective kind whose data input needs the interleaved capability."""
    name = "objective.test_needs_interleaved"
    register_needs_interleaved(monkeypatch, name, lambda p, i, c: None)
    return name


def needing_graph(tmp_path, objective: str = "objective.test_needs_interleaved", train: dict | None = None,
                  evaluators: dict | None = None, **data) -> Path:
    """g.yaml: ``objective`` on a ViT and shapes with the params ``data``, then ``evaluators``."""
    return tiny_graph(tmp_path, "g.yaml", graph="t", nodes={
        "shapes": shapes(**data), "vision": vit(), "lcl": node(objective, {"data": "shapes", "vision": "vision"}),
        "train": trainer("lcl", batch_size=4, **(train or {})), **(evaluators or {})})


def test_a_node_needing_interleaved_data_refuses_paired_shapes(tmp_path, capsys, needs_interleaved_kind):
    path = needing_graph(tmp_path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("input 'data' needs data with interleaved, which 'shapes' (dataset.shapes) does not provide") in err
    needing_graph(tmp_path, pairing="interleaved")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------------- MMC4-style JSONL


def write_mmc4(tmp_path: Path, n_docs: int = 8) -> Path:
    """``n_docs`` documents of 3 sentences and 2 images each (image k of doc d: d_k.png) + a test file.
    Document 0's images: d0_0.png missing, d0_1.png corrupt; document 1 has only one image, missing."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for d in range(n_docs):
        texts = [f"doc {d} sentence {k}" for k in range(3)]
        info = [{"image_name": f"d{d}_{k}.png", "matched_text_index": 2 * k} for k in range(2 if d != 1 else 1)]
        lines.append(json.dumps({"text_list": texts, "image_info": info, "url": "x"}))
        for k in range(len(info)):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(img_dir / f"d{d}_{k}.png")
    (img_dir / "d0_0.png").unlink()
    (img_dir / "d1_0.png").unlink()
    (img_dir / "d0_1.png").write_bytes(b"not a png at all")
    ann = tmp_path / "docs.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text_list": ["a test sentence", "another"], "image_info": [
        {"image_name": "d5_0.png", "matched_text_index": 0}, {"image_name": "d6_1.png", "matched_text_index": 1}]}) + "\n")
    return ann


def build_interleaved(tmp_path: Path, logs: list, **params):
    p = inter_mod.InterleavedParams(annotations="docs.jsonl", images="imgs", image_size=16, **params)
    return inter_mod.build(p, {}, build_ctx("d", cache=tmp_path / "cache", base_dir=tmp_path, log=logs))


def test_mmc4_jsonl_skips_and_counts_a_missing_and_a_corrupt_image(tmp_path):
    write_mmc4(tmp_path)
    logs: list[str] = []
    data = build_interleaved(tmp_path, logs, test_annotations="test.jsonl", max_bad_fraction=0.25)
    # 15 distinct images, 3 bad (d0_0 missing, d0_1 corrupt, d1_0 missing): counted as dataset.captions does
    assert any("skipped 3 of 15 images" in m and "d0_0.png (missing)" in m and "d0_1.png (unreadable" in m
               for m in logs), logs
    # documents 0 and 1 lost every image: dropped and counted
    assert any("dropped 2 of 8 documents left without a readable image: line 1, line 2" in m for m in logs), logs
    assert len(data.train) == 6 and INTERLEAVED in data.capabilities
    for d in range(len(data.train)):
        item = data.train[d]
        assert item["images"].shape == (2, 3, 16, 16)
        assert len(item["texts"]) == 3 and layouts_ok(item["layout"], 2, 3)
        # image k stands right before or right after its matched sentence 2k
        for pos, (what, j) in enumerate(item["layout"]):
            if what == "image":
                near = {item["layout"][q] for q in (pos - 1, pos + 1) if 0 <= q < len(item["layout"])}
                assert ("text", 2 * j) in near
    batch = data.collate([data.train[d] for d in range(3)])
    assert batch["images"].shape == (6, 3, 16, 16) and batch["image_doc"].tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train_captions()[:3] == ["doc 2 sentence 0", "doc 2 sentence 1", "doc 2 sentence 2"]
    assert [data.test[i]["caption"] for i in range(len(data.test))] == ["a test sentence", "another"]
    assert len(data.train_pairs) == 12 and data.train_pairs[0]["image"].shape == (3, 16, 16)


def test_mmc4_jsonl_past_the_tolerance_fails_clearly(tmp_path):
    ann = write_mmc4(tmp_path)
    with pytest.raises(UserError) as e:
        build_interleaved(tmp_path, [], test_annotations="test.jsonl", max_bad_fraction=0.1)
    assert str(e.value).startswith(f"{ann}: 3 of 15 images are missing or unreadable, more than max_bad_fraction=0.1: ")
    # the same message dataset.captions gives for the same images
    import vlpgraph.nodes.datasets.captions as captions_mod

    manifest = tmp_path / "pairs.jsonl"
    names = [f"d{d}_{k}.png" for d in range(8) for k in range(2 if d != 1 else 1)]
    manifest.write_text("".join(json.dumps({"image": f"imgs/{n}", "caption": "x"}) + "\n" for n in names))
    with pytest.raises(UserError) as e2:
        captions_mod.build(captions_mod.CaptionsParams(annotations=str(manifest), test_size=2, max_bad_fraction=0.1),
                           {}, build_ctx("d", cache=tmp_path / "cache", base_dir=tmp_path))
    assert str(e2.value).split(": ", 1)[1] == str(e.value).split(": ", 1)[1]


def test_mmc4_held_out_split_fingerprint_and_facts(tmp_path):
    write_mmc4(tmp_path)
    data = build_interleaved(tmp_path, [], test_size=2, max_bad_fraction=0.25)
    assert len(data.train) == 4 and len(data.test) == 4  # the last 2 documents, flattened into pairs
    p = inter_mod.InterleavedParams(annotations="docs.jsonl", images="imgs", test_size=2)
    fp = inter_mod.fingerprint(p, tmp_path)
    assert fp["documents"] == 8 and fp["n_images"] == 15
    assert inter_mod.facts(p, tmp_path)["train_size"] == 6
    (tmp_path / "imgs" / "d3_0.png").write_bytes((tmp_path / "imgs" / "d4_0.png").read_bytes() + b"x")
    assert inter_mod.fingerprint(p, tmp_path)["images_sha256"] != fp["images_sha256"]  # a replaced image
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text_list": ["a"], "image_info": [{"image_name": "x.png", "matched_text_index": 3}]}))
    with pytest.raises(UserError, match=r"bad.jsonl:1: matched_text_index 3 is outside text_list \(0..0\)"):
        inter_mod.read_documents(bad, tmp_path)
    assert len(data.train_captions()) == 12


# ---------------------------------------------------------------------------------- end to end


class _DocObjective(ports.Objective):
    """Checks every batch is the contract's document batch; a loss from the images so training steps."""

    def __init__(self, vision):
        super().__init__()
        self.vision_ref = (vision,)
        self.seen = 0

    def forward(self, fwd, batch):
        assert "captions" not in batch and "input_ids" not in batch
        assert len(batch["doc_texts"]) == len(batch["sample_ids"]) == int(batch["image_doc"].max()) + 1
        assert batch["images"].shape[0] == batch["image_doc"].shape[0] == batch["image_index"].shape[0]
        self.seen += 1
        return {"doc": fwd.image_tokens(self.vision_ref[0]).pow(2).mean()}


@pytest.mark.integration
def test_a_trainer_steps_over_document_batches(tmp_path, monkeypatch, capsys):
    built = []
    register_needs_interleaved(monkeypatch, "objective.test_documents",
                               lambda p, i, c: built.append(_DocObjective(i["vision"])) or built[-1])
    path = needing_graph(tmp_path, "objective.test_documents", dict(max_steps=3, warmup_steps=1),
                         pairing="interleaved", image_size=32)
    assert main(["run", str(path), "--store", str(tmp_path / "store")]) == 0, capsys.readouterr().err
    assert built and built[0].seen == 3


@pytest.mark.integration
def test_frozen_transfer_evaluators_judge_a_model_trained_on_documents(tmp_path, monkeypatch, capsys):
    # the frozen-transfer heads train on the training images paired with their sentences (train_pairs)
    register_needs_interleaved(monkeypatch, "objective.test_documents", lambda p, i, c: _DocObjective(i["vision"]))
    frozen = {"encoder": "vision"}
    path = needing_graph(tmp_path, "objective.test_documents", dict(max_steps=2, warmup_steps=1), evaluators={
        "probe": evaluator("linear_probe", inputs=frozen, steps=3),
        "transfer": evaluator("transfer_retrieval", inputs=frozen, steps=3),
        "captioning": evaluator("captioning", inputs=frozen, decoder_mode="fresh", steps=3)},
        pairing="interleaved", image_size=32)
    from vlpgraph.store import Store

    assert main(["run", str(path), "--store", str(tmp_path / "store")]) == 0, capsys.readouterr().err
    store = Store(tmp_path / "store")
    evaluators = {r["evaluator"] for r in store.evals([store.runs()[0]["run_id"]])}
    assert {"probe", "transfer", "captioning"} <= evaluators
