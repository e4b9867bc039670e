"""evaluator.mixing: mixer.cmc on held-out sentences (the rate against p, the stored mixed sentences), on the
real unpaired shapes data and its gallery."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import build_ctx, evaluator, node, shapes, text, tiny_graph, trainer, vit
from vlpgraph.cli import main
from vlpgraph.errors import UserError
from vlpgraph.layers.tokenizer import WordPieceTokenizer, train_wordpiece
from vlpgraph.nodes.encoders.text import TextParams, build_bert
from vlpgraph.nodes.encoders.vit import ViTParams, build_vit
from vlpgraph.nodes.datasets import shapes as shapes_mod
from vlpgraph.nodes.evaluators import mixing as mixing_mod
from vlpgraph.nodes.mixers import cmc as cmc_mod
from vlpgraph.store import Store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The unpaired shapes data (a gallery) with 200 test captions."""
    root = tmp_path_factory.mktemp("shapes")
    params = shapes_mod.ShapesParams(train_size=120, test_size=200, image_size=32, max_objects=3, pairing="unpaired")
    return shapes_mod.build(params, {}, build_ctx("d", cache=root, base_dir=root))


def make(data, p: float = 0.5, trial_seed: int = 0):
    """mixer.cmc on the unpaired shapes data with a BERT and a ViT, and the model that holds them."""
    tok = WordPieceTokenizer(train_wordpiece(list(data.train_captions()), 300), 32)
    torch.manual_seed(trial_seed)
    text = build_bert(TextParams(width=16, depth=1, heads=2, max_len=32, attention="sdpa"), tok)
    vision = build_vit(ViTParams(image_size=32, patch_size=8, width=16, depth=1, heads=2), 32)
    mixer = cmc_mod.build(cmc_mod.CMCParams(p=p), {"data": data, "vision": vision, "text": text},
                          build_ctx("cmc", trial_seed))
    model = SimpleNamespace(modules=nn.ModuleDict({"text": text, "vision": vision, "cmc": mixer}), objectives={},
                            device=torch.device("cpu"), tokenizer=tok)
    return mixer, model


def evaluate(data, mixer, model, trial_seed: int = 0, **params):
    ev = mixing_mod.build(mixing_mod.MixingParams(**params), {"model": model, "data": data, "mixer": mixer},
                          build_ctx("mixing", trial_seed))
    return ev.evaluate(model, build_ctx("mixing", trial_seed))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_rate_is_p_on_held_out_sentences_and_rows_replace_only_concept_spans(data, p):
    mixer, model = make(data, p)
    mixer.train()  # as mid-training: the evaluator mixes anyway and gives the flag back
    before = {k: v.clone() for k, v in model.modules.state_dict().items()}
    result = evaluate(data, mixer, model, max_samples=200, num_samples=8)
    m = result.metrics
    assert m["n"] == 200 and m["candidates_per_sentence"] >= 1  # every shapes caption names a shape
    assert abs(m["rate"] - p) < 0.08  # ~300 spans: about 3 standard deviations
    assert all(torch.equal(before[k], v) for k, v in model.modules.state_dict().items())
    assert mixer.training and mixer.text.training
    rows = result.samples
    assert rows and all(r["kind"] == "cmc" for r in rows)
    assert [r["sample_id"] for r in rows] == sorted(r["sample_id"] for r in rows)
    for r in rows:
        i = r["sample_id"]
        assert i < 8 and r["reference"] == data.test[i]["caption"]  # numbered by test caption
        for span in r["info"]["spans"]:
            _, concept, source, box = data.gallery.region(span["region"])
            assert concept == span["concept"]  # a region of the named concept
            assert span["concept"] in r["reference"]  # that replaced a span naming it
            assert f"[{concept} #{span['region']}]" in r["text"] and source == span["source_image"]


def test_every_evaluation_of_every_trial_mixes_the_same_way_and_the_seed_param_moves_it(data):
    mixer, model = make(data, trial_seed=0)
    first = evaluate(data, mixer, model, trial_seed=0, max_samples=64)
    other_mixer, other_model = make(data, trial_seed=5)
    second = evaluate(data, other_mixer, other_model, trial_seed=5, max_samples=64)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows]  # noqa: E731
    assert strip(first.samples) == strip(second.samples) and first.metrics == second.metrics
    moved = evaluate(data, mixer, model, max_samples=64, seed=1)
    assert strip(moved.samples) != strip(first.samples)


def test_refuses_a_mixer_without_draws(data):
    refusal = r"node 'mixing' \(evaluator.mixing\): its mixer \(Module\) has no draw\(\) or sample_rows\(\)"
    with pytest.raises(UserError, match=refusal):
        mixing_mod.build(mixing_mod.MixingParams(), {"model": None, "data": data, "mixer": nn.Module()},
                         build_ctx("mixing"))


@pytest.mark.integration
def test_a_vlmixer_run_stores_mixed_test_sentences(tmp_path: Path, capsys):
    path = tiny_graph(tmp_path, "g.yaml", graph="t", nodes={
        "shapes": shapes(image_size=32, pairing="unpaired"), "vision": vit(), "text": text(),
        "cmc": node("mixer.cmc", {"data": "shapes", "vision": "vision", "text": "text"}),
        "mlm": node("objective.mlm", {"mixer": "cmc"}),
        "train": trainer("mlm", batch_size=8, max_steps=2, warmup_steps=1),
        "mixing": evaluator("mixing", inputs={"mixer": "cmc"}, num_samples=6)})
    assert main(["run", str(path), "--store", str(tmp_path / "store")]) == 0, capsys.readouterr().err
    store = Store(tmp_path / "store")
    [run] = store.runs()
    metrics = {e["metric"]: e["value"] for e in store.evals([run["run_id"]]) if e["evaluator"] == "mixing"}
    assert metrics["n"] == 32 and 0.2 < metrics["rate"] < 0.8
    rows = store.samples(run["run_id"])
    assert rows and {r["kind"] for r in rows} == {"cmc"} and all(r["sample_id"] < 6 for r in rows)
    assert all("[" in r["text"] and r["image"] for r in rows)
