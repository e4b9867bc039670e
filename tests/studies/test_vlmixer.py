"""The VLMixer study: graphs/vlmixer.yaml validates with its four variants wired as the study says (equal
images, no pairs reaching the unpaired variants, the same probes for all), runs end to end on its tiny
profile, and `vlpgraph report` prints its table."""

from __future__ import annotations

import pytest

from tests.helpers import GRAPHS, objectives_of
from vlpgraph.cli import main
from vlpgraph.nodes.datasets import shapes
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

GRAPH = str(GRAPHS / "vlmixer.yaml")
PROBES = {("qa", "accuracy"), ("nlvr", "accuracy"), ("transfer", "rsum"), ("probe", "top1")}


def test_variants_are_wired_as_the_study_says(tmp_path):
    exp = load_experiment(GRAPH)
    by = {t.variant: t for t in exp.trials}
    assert sorted(by) == ["cmc", "cmc_cmcl", "mlm_only", "paired"]
    assert objectives_of(by["paired"]) == {"objective.itc", "objective.itm", "objective.mlm"}
    assert by["paired"].graph.nodes["mlm"].input_names("fusion") == ["fusion"]
    assert by["paired"].graph.nodes["shapes"].params.pairing == "paired"
    for v in ("mlm_only", "cmc", "cmc_cmcl"):
        g = by[v].graph.nodes
        assert g["shapes"].params.pairing == "unpaired" and g["mlm"].input_names("mixer") == ["cmc"]
    assert by["mlm_only"].graph.nodes["cmc"].params.p == 0.0 and by["cmc"].graph.nodes["cmc"].params.p == 0.5
    assert objectives_of(by["cmc"]) == {"objective.mlm"}
    assert objectives_of(by["cmc_cmcl"]) == {"objective.mlm", "objective.cmcl"}
    # equal data: the same training images, and as many sentences as images, for every variant
    facts = {v: shapes.facts(t.graph.nodes["shapes"].params, tmp_path) for v, t in by.items()}
    assert len({f["train_images"] for f in facts.values()}) == 1
    # the same probes with the same params everywhere (ALBEF's fused ones come on top, for paired only)
    for name in ("qa", "nlvr", "transfer", "probe"):
        assert len({t.graph.nodes[name].params.model_dump_json() for t in by.values()}) == 1, name
        assert "fusion" not in by["paired"].graph.nodes[name].inputs
    assert all(("qa_fused" in t.graph.nodes) == (v == "paired") for v, t in by.items())
    assert len(exp.trials) == 8 and len(load_experiment(GRAPH, profile="full").trials) == 20
    assert load_experiment(GRAPH, profile="gpu").trials[0].graph.nodes["vision"].params.width == 384


@pytest.mark.integration
@pytest.mark.slow
def test_vlmixer_study_runs_end_to_end_on_its_tiny_profile_and_reports(tmp_path, capsys):
    store = Store(tmp_path / "s")
    assert main(["run", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    runs = {r["variant"]: r for r in store.runs()}
    assert sorted(runs) == ["cmc", "cmc_cmcl", "mlm_only", "paired"]
    assert all(r["status"] == "completed" for r in runs.values())
    for variant, run in runs.items():
        evals = {(r["evaluator"], r["metric"]) for r in store.evals([run["run_id"]])}
        assert PROBES <= evals, variant
        assert {("qa", "majority"), ("nlvr", "majority")} <= evals  # the majority baselines beside accuracy
        assert (("qa_fused", "accuracy") in evals) == (variant == "paired")
        kinds = {r["kind"] for r in store.samples(run["run_id"])}
        assert {"qa", "nlvr"} <= kinds
    losses = {v: {r["name"] for r in store.metrics(run["run_id"])} for v, run in runs.items()}
    assert "cmcl" in losses["cmc_cmcl"] and "cmcl" not in losses["cmc"] and "mlm" in losses["mlm_only"]
    assert {"itc", "itm", "mlm"} <= losses["paired"]
    capsys.readouterr()
    assert main(["report", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in runs) and "qa.accuracy" in out and "4/4 trials done" in out
