"""evaluator.documents: objective.lcl scored on held-out interleaved documents, on the small fakes of
tests/nodes/objectives/test_lcl.py (the real sequence builder, a fake LM and tower), and the held-out documents of
dataset.shapes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import build_ctx
from tests.nodes.objectives.test_lcl import DOCS, make_batch, make_lcl
from vlpgraph.results import analysis
from vlpgraph.engine import ports
from vlpgraph.layers.interleaved import build_sequences
from vlpgraph.nodes.datasets import shapes
from vlpgraph.nodes.evaluators import documents as docs_mod

# a fourth document whose first image stands at the very start (no context: left out of the contrastive term)
DOCS4 = DOCS + [(["a green square", "the blue triangle"], [("image", 0), ("text", 0), ("text", 1), ("image", 1)])]


class FakeData(ports.PairedData):
    """Held-out documents by the contract (items as a document dataset's), collated as interleaved data."""

    def __init__(self, docs=DOCS4, seed: int = 0):
        batch = make_batch(docs, seed)
        images = batch["images"]
        self.test_documents, start = [], 0
        for d, (texts, layout) in enumerate(docs):
            m = sum(kind == "image" for kind, _ in layout)
            self.test_documents.append({"images": images[start:start + m], "texts": list(texts), "layout": list(layout),
                                        "sample_id": d, "image_ids": list(range(start, start + m))})
            start += m
        self.capabilities = frozenset({ports.INTERLEAVED})

    def collate(self, items):
        return ports.collate_documents(items)

    def denormalize(self, images):
        return images.sigmoid()


def model_of(obj, vision, pool, lm):
    return SimpleNamespace(modules=nn.ModuleDict({"vision": vision, "pool": pool, "lm": lm}),
                           objectives={"lcl": obj}, device=torch.device("cpu"))


def evaluate(obj, vision, pool, lm, data=None, **params):
    data = data or FakeData()
    ev = docs_mod.DocumentsEvaluator(docs_mod.DocumentsParams(**params), data, obj)
    ctx = build_ctx("docs")
    return ev.evaluate(model_of(obj, vision, pool, lm), ctx)


def test_text_after_an_image_runs_from_its_eoi_to_the_next_block_or_the_end():
    tok = SimpleNamespace(pad_id=0, cls_id=1, sep_id=2, soi_id=5, img_id=6, eoi_id=7)
    ids = torch.tensor([[1, 10, 11, 5, 6, 6, 7, 12, 13, 5, 6, 6, 7, 2, 0],
                        [1, 5, 6, 6, 7, 14, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
    after = docs_mod.text_after_images(ids, torch.tensor([3, 9, 1]), torch.tensor([0, 0, 1]), tok)
    assert [a.tolist() for a in after] == [[7, 8], [], [5]]


def test_scores_are_the_objectives_own_terms():
    """The token losses average to the generation term and the features give back the contrastive term:
    what the evaluator reports is what training optimised, not a look-alike."""
    obj, *_ = make_lcl(con_weight=1.0)
    obj.eval()
    batch = make_batch(DOCS4)
    with torch.no_grad():
        s = obj.score_documents(ports.Forward(batch))
        step = obj.step(ports.Forward(batch))
        gen, con = obj.generation_loss(step), obj.contrastive_loss(step)
    scored = s.labels != -100
    assert torch.allclose(s.token_loss[scored].mean(), gen, atol=1e-6)
    assert bool((s.token_loss[~scored] == 0).all())
    keep = s.has_context
    logits = s.image_features[keep] @ s.context_features[keep].T / obj.temperature
    target = torch.arange(int(keep.sum()))
    mine = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert torch.allclose(mine, con, atol=1e-5)


def test_metrics_and_stored_documents_mark_each_images_soi():
    obj, vision, pool, lm = make_lcl(con_weight=0.5)
    result = evaluate(obj, vision, pool, lm, batch_size=3)  # two batches: features are pooled across them
    m = result.metrics
    # independent recomputation over all four documents at once
    batch = make_batch(DOCS4)
    obj.eval()
    with torch.no_grad():
        step = obj.step(ports.Forward(batch))
        gen = obj.generation_loss(step).item()
        s = obj.score_documents(ports.Forward(batch))
    assert m["documents"] == 4 and math.isclose(m["gen_loss"], gen, rel_tol=1e-5)
    assert math.isclose(m["perplexity"], math.exp(gen), rel_tol=1e-5)
    keep = s.has_context
    sim = s.image_features[keep] @ s.context_features[keep].T
    hits = (sim.argmax(1) == torch.arange(len(sim))).float().mean() + (sim.argmax(0) == torch.arange(len(sim))).float().mean()
    assert m["context_images"] == int(keep.sum()) and math.isclose(m["context_r1"], 0.5 * float(hits), rel_tol=1e-6)
    assert math.isclose(m["context_chance"], 1 / int(keep.sum()))

    seqs = build_sequences(batch["doc_texts"], batch["doc_layout"], batch["image_doc"], batch["image_index"],
                           lm.tokenizer, 4, obj.max_len)
    rows = {r["sample_id"]: r for r in result.samples}
    assert sorted(rows) == [0, 1, 2, 3] and all(r["kind"] == "document" for r in rows.values())
    for d, (texts, layout) in enumerate(DOCS4):
        info = rows[d]["info"]
        # the k-th <soi> of the row is the k-th image in reading order
        soi = (seqs.input_ids[d] == lm.tokenizer.soi_id).nonzero().flatten().tolist()
        reading = [k for kind, k in layout if kind == "image"]
        by_image = {e["image"]: e for e in info["images"]}
        assert [by_image[j]["soi"] for j in reading] == soi
        for j in reading:  # an image right after [CLS] has no context (exclude_bos_only)
            assert by_image[j]["context"] == (by_image[j]["soi"] > 1)
            assert (by_image[j].get("context_rank") is not None) == by_image[j]["context"]
        assert rows[d]["text"] == " ".join(f"[image {k + 1}]" if kind == "image" else texts[k] for kind, k in layout)
        assert info["texts"] == texts and [tuple(x) for x in info["layout"]] == layout
        assert not info["truncated"]
    assert rows[3]["info"]["images"][0]["context"] is False  # DOCS4's last document opens with an image


def test_untrained_terms_are_not_reported_and_weights_do_not_change():
    obj, vision, pool, lm = make_lcl(con_weight=0.0)  # generation only: the contrastive heads never trained
    before = {k: v.clone() for k, v in model_of(obj, vision, pool, lm).modules.state_dict().items()}
    m = evaluate(obj, vision, pool, lm).metrics
    assert "gen_loss" in m and "context_r1" not in m
    assert all(torch.equal(before[k], v) for k, v in model_of(obj, vision, pool, lm).modules.state_dict().items())
    obj2, *rest = make_lcl(gen_weight=0.0, con_weight=1.0)
    m2 = evaluate(obj2, *rest).metrics
    assert "context_r1" in m2 and "gen_loss" not in m2 and "perplexity" not in m2


def test_truncated_images_are_stored_as_cut():
    obj, vision, pool, lm = make_lcl(max_len=12)  # [CLS] + one block of 4 visual tokens + a few words
    rows = {r["sample_id"]: r for r in evaluate(obj, vision, pool, lm).samples}
    info = rows[0]["info"]  # image, text, image, text: the second image cannot fit
    assert info["truncated"] and [e["kept"] for e in info["images"]] == [True, False]
    parts = analysis.document_parts(info)
    labels = [p["label"] for p in parts if "image" in p]
    assert labels[0].startswith("<soi> at token 1") and "left out of the contrastive term" in labels[0]
    assert labels[1].startswith("cut by truncation")


def test_document_parts_follow_the_reading_order():
    info = {"layout": [["text", 0], ["image", 0], ["text", 1]], "texts": ["a red circle", "big square"],
            "images": [{"image": 0, "kept": True, "soi": 5, "context": True, "context_rank": 2, "after_image_loss": 1.5}],
            "context_pool": 40}
    parts = analysis.document_parts(info)
    assert [p.get("text") for p in parts] == ["a red circle", None, "big square"]
    assert parts[1] == {"image": 0, "label": "<soi> at token 5 · its context ranks it 2 of 40 · loss of the text after it 1.50"}


def test_shapes_held_out_documents_are_the_test_scenes(tmp_path):
    p = shapes.ShapesParams(train_size=64, test_size=40, image_size=32, pairing="interleaved")
    data = shapes.ShapesData(shapes.materialise(p, tmp_path, log=lambda *_: None), p)
    docs = data.test_documents
    ids = [i for d in range(len(docs)) for i in docs[d]["image_ids"]]
    assert ids == list(range(len(data.test)))  # every test scene once, in order
    item = docs[1]
    for image, i in zip(item["images"], item["image_ids"]):
        assert torch.equal(image, data.test[i]["image"])
    assert item["texts"][: len(item["image_ids"])] == [data.test.captions[i] for i in item["image_ids"]]
    # their own random stream: not the training documents' sizes
    assert not np.array_equal(shapes.document_bounds(p, 40), shapes.document_bounds(p, 40, shapes.TEST_DOC_STREAM))
    paired = shapes.ShapesData(shapes.materialise(p.model_copy(update={"pairing": "paired"}), tmp_path,
                                                  log=lambda *_: None), p.model_copy(update={"pairing": "paired"}))
    assert paired.test_documents is None


def test_the_kind_is_registered_against_document_objectives():
    from vlpgraph.engine import registry
    kind = registry.get("evaluator.documents")
    assert kind.inputs["objective"].type_tuple == (ports.DocumentModel,)
    assert ports.INTERLEAVED in kind.inputs["data"].needs
    assert issubclass(registry.get("objective.lcl").output, ports.DocumentModel)
