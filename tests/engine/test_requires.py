"""``requires`` (issue 11): objectives and mixers that treat a batch's images and captions as pairs are
refused at validation when the trainer's data is not paired (unpaired corpora, interleaved documents)."""

from __future__ import annotations

import pytest

from tests.helpers import itc, mae, node, shapes, text, tiny_graph, trainer, vit
from vlpgraph.engine import ports, registry
from vlpgraph.cli import main

ITC_LINE = 17  # the line of "kind: objective.itc"
MIX_LINE = 15  # the line of "kind: mixer.cutmix"


def validate(capsys, tmp_path, objectives=("itc", "mae"), mixer=None, **data):
    """`vlpgraph validate` of ITC (its mixer input wired to ``mixer``, a mixer.cutmix) and MAE on shapes with
    the params ``data``: (exit code, error lines with the file named G)."""
    path = tiny_graph(tmp_path, "g.yaml", graph="t", nodes={
        "shapes": shapes(**data), "vision": vit(), "text": text(), "mix": node("mixer.cutmix"), "itc": itc(mixer=mixer),
        "mae": mae(), "train": trainer(*objectives)})
    rc = main(["validate", str(path)])
    err = capsys.readouterr().err
    return rc, [ln.replace(str(path), "G") for ln in err.strip().splitlines() if ln]


def test_itc_is_refused_on_unpaired_data_with_file_and_line(capsys, tmp_path):
    rc, lines = validate(capsys, tmp_path, pairing="unpaired")
    assert rc == 2
    assert lines == [
        f"vlpgraph: G:{ITC_LINE}: node 'itc' (objective.itc): needs paired data (it treats each image and caption "
        "of a batch as a pair), but the trainer's data 'shapes' (dataset.shapes) provides boxes, classes, gallery, "
        "labels, scenes, unpaired"
    ]


def test_itc_is_refused_on_interleaved_data(capsys, tmp_path):
    # the gap issue 10 left: interleaved shapes provide documents, not pairs
    rc, lines = validate(capsys, tmp_path, pairing="interleaved")
    assert rc == 2
    assert lines == [
        f"vlpgraph: G:{ITC_LINE}: node 'itc' (objective.itc): needs paired data (it treats each image and caption "
        "of a batch as a pair), but the trainer's data 'shapes' (dataset.shapes) provides boxes, classes, "
        "interleaved, labels, scenes"
    ]


def test_paired_data_is_accepted_and_pair_free_objectives_train_on_unpaired_data(capsys, tmp_path):
    rc, lines = validate(capsys, tmp_path, mixer="mix")
    assert rc == 0, lines
    rc, lines = validate(capsys, tmp_path, ["mae"], pairing="unpaired")
    assert rc == 0, lines  # MAE reads images only


def test_every_violation_is_reported_at_once_with_the_other_problems(capsys, tmp_path):
    # the mixer is reached through itc's input; a misspelt param elsewhere is reported alongside
    rc, lines = validate(capsys, tmp_path, mixer="mix", pairing="unpaired", train_sise=3)
    assert rc == 2
    assert any("unknown param 'train_sise'" in ln for ln in lines), lines
    rc, lines = validate(capsys, tmp_path, mixer="mix", pairing="unpaired")
    assert rc == 2
    assert [ln.split(": ")[1:3] for ln in lines] == [
        [f"G:{MIX_LINE}", "node 'mix' (mixer.cutmix)"], [f"G:{ITC_LINE}", "node 'itc' (objective.itc)"]]


def test_the_pair_treating_kinds_are_marked():
    paired = {name for name, kind in registry.kinds().items()
              if ports.PAIRED in kind.requires(kind.params.model_construct(), {})}
    assert {"objective.itc", "objective.itm", "objective.caption", "objective.prefixlm", "objective.pta",
            "objective.mlm", "mixer.cutmix", "mixer.mixup", "mixer.timix"} <= paired
    assert not {"objective.mae", "objective.lcl"} & paired
    assert registry.get("objective.lcl").requires(None, {}) == {ports.INTERLEAVED}
    # MLM predicts caption words from the image, unless a text mixer feeds it mixed sentences (VLMixer)
    mlm = registry.get("objective.mlm")
    assert mlm.requires(None, {"fusion": ["encoder.fusion"]}) == {ports.PAIRED}
    assert mlm.requires(None, {"fusion": ["encoder.fusion"], "mixer": ["mixer.cmc"]}) == frozenset()


@pytest.mark.parametrize("wire_data", [True, False])
def test_lcl_on_paired_data_is_refused_at_validation(capsys, tmp_path, wire_data):
    from tests.nodes.objectives.test_lcl_graph import GRAPH as LCL

    text = LCL.replace(", pairing: interleaved", "")
    if not wire_data:  # the optional data input left out: requires still catches it
        text = text.replace("inputs: {data: shapes, vision: vision, pool: pool", "inputs: {vision: vision, pool: pool")
    path = tmp_path / "lcl.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("node 'lcl' (objective.lcl): needs interleaved data (it trains on interleaved documents), but the "
            "trainer's data 'shapes' (dataset.shapes) provides boxes, classes, labels, paired, scenes") in err


def test_vlpgraph_nodes_says_what_the_trainers_data_must_provide(capsys):
    from vlpgraph.cli import main

    assert main(["nodes", "objective.itc"]) == 0
    assert "the trainer's data must provide: paired (validation checks it)" in capsys.readouterr().out
    assert main(["nodes", "objective.mlm"]) == 0  # paired through the fusion encoder, nothing with a mixer
    assert "must provide: paired (with every optional input wired: nothing)" in capsys.readouterr().out
    assert main(["nodes", "objective.mae"]) == 0
    assert "must provide" not in capsys.readouterr().out
