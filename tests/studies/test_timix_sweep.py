"""The headline graph: graphs/timix_sweep.yaml validates, and its timix variant runs end to end (tiny profile)."""

from __future__ import annotations

import pytest

from tests.helpers import GRAPHS
from vlpgraph.cli import main
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

GRAPH = str(GRAPHS / "timix_sweep.yaml")


def test_sweep_shape():
    exp = load_experiment(GRAPH)
    assert len(exp.trials) == 12 and exp.variants == ["baseline", "cutmix", "timix"]
    assert sorted({t.grid["shapes.train_fraction"] for t in exp.trials}) == [0.1, 0.2, 0.4, 1.0]
    timix = next(t for t in exp.trials if t.variant == "timix")
    kinds = {b.kind.name for b in timix.graph.nodes.values()}
    assert {"mixer.timix", "head.tpp", "objective.pta", "objective.itm", "objective.mlm", "evaluator.grounding"} <= kinds
    assert next(t for t in exp.trials if t.variant == "baseline").graph.nodes["shapes"].params.caption_noise > 0
    # every trial is asked the same questions about the test scenes, on its fusion encoder's [CLS]
    for t in exp.trials:
        qa = t.graph.nodes["qa"]
        assert qa.kind.name == "evaluator.qa" and qa.input_names("fusion") == ["fusion"]
    assert len({t.graph.nodes["qa"].params.model_dump_json() for t in exp.trials}) == 1
    assert len(load_experiment(GRAPH, profile="full").trials) == 36
    assert load_experiment(GRAPH, profile="gpu").trials[0].graph.nodes["vision"].params.width == 384


def test_unknown_variant_is_a_user_error(capsys):
    assert main(["run", GRAPH, "--variant", "timixx", "--dry-run"]) == 2
    assert "--variant timixx: no such variant (did you mean 'timix'?)" in capsys.readouterr().err


@pytest.mark.integration
def test_timix_variant_runs_end_to_end(tmp_path):
    store = Store(tmp_path / "s")
    rc = main(["run", GRAPH, "--profile", "tiny", "--variant", "timix", "--set", "shapes.train_fraction=0.5",
               "--store", str(store.root)])
    assert rc == 0
    [run] = store.runs()
    assert run["status"] == "completed" and run["variant"] == "timix"
    names = {r["name"] for r in store.metrics(run["run_id"])}
    assert {"itc", "mix_itc", "itm", "mlm", "pta"} <= names
    evals = {(r["evaluator"], r["metric"]) for r in store.evals([run["run_id"]])}
    assert ("grounding", "pointing") in evals and ("retrieval", "rsum") in evals
    rows = store.patch_scores(run["run_id"])
    heat = [r for r in rows if r["kind"] == "heatmap" and r["evaluator"] == "grounding"]
    assert heat and len(heat[0]["scores"]) == heat[0]["grid_h"] * heat[0]["grid_w"]
    assert heat[0]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert any(r["evaluator"] == "grounding_sim" for r in rows)  # both scorers' maps are kept
    mixed = [r for r in rows if r["kind"] == "mixed"]
    assert len(mixed) == 4 and all(0 < r["lam"] < 1 and r["mixed_image"][:4] == b"\x89PNG" for r in mixed)
    assert mixed[0]["mixed_image"] != mixed[0]["image"]
