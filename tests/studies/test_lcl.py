"""The LCL study: graphs/lcl.yaml validates with its ten variants wired as the study says (equal images,
equal evaluator budgets), runs end to end on its tiny profile, and `vlpgraph report` prints its table."""

from __future__ import annotations

import pytest

from tests.helpers import GRAPHS, objectives_of
from vlpgraph.cli import main
from vlpgraph.nodes.datasets import shapes
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

GRAPH = str(GRAPHS / "lcl.yaml")
WEIGHTS = {"gen_only": (1.0, 0.0), "con_only": (0.0, 1.0), "lcl": (1.0, 0.1),
           "lcl_lam003": (1.0, 0.03), "lcl_lam03": (1.0, 0.3), "lcl_lam1": (1.0, 1.0)}
FROZEN = {("probe", "top1"), ("transfer", "rsum"), ("captioning", "cider")}


def test_variants_are_wired_as_the_study_says(tmp_path):
    exp = load_experiment(GRAPH)
    by = {t.variant: t for t in exp.trials}
    assert len(exp.trials) == 10 and set(by) == {"clip"} | set(WEIGHTS) | {f"{v}_pairs" for v in ("gen_only", "con_only", "lcl")}
    assert objectives_of(by["clip"]) == {"objective.itc"}
    assert by["clip"].graph.nodes["shapes"].params.pairing == "paired"
    for name, trial in by.items():
        data = trial.graph.nodes["shapes"].params
        if name == "clip":
            continue
        assert objectives_of(trial) == {"objective.lcl"} and data.pairing == "interleaved"
        lcl = trial.graph.nodes["lcl"].params
        assert (lcl.gen_weight, lcl.con_weight) == WEIGHTS[name.removesuffix("_pairs")]
        assert data.max_images == (1 if name.endswith("_pairs") else 6)
    # equal images: every variant trains on the same scenes, and the batch sizes give ~64 images a step
    facts = {v: shapes.facts(t.graph.nodes["shapes"].params, tmp_path) for v, t in by.items()}
    assert len({f["train_images"] for f in facts.values()}) == 1
    for v, t in by.items():
        docs, images = facts[v]["train_size"], facts[v]["train_images"]
        per_step = t.graph.nodes["train"].params.batch_size * images / docs
        assert 56 <= per_step <= 72, (v, per_step)
    # every variant judged by the same frozen-transfer evaluators with the same params (same budgets)
    for name in ("probe", "transfer", "captioning"):
        assert len({t.graph.nodes[name].params.model_dump_json() for t in by.values()}) == 1, name
    # the held-out documents evaluator wherever there is a document objective
    assert all(("docs" in t.graph.nodes) == (v != "clip") for v, t in by.items())
    assert len(load_experiment(GRAPH, profile="full").trials) == 30
    assert load_experiment(GRAPH, profile="gpu").trials[0].graph.nodes["vision"].params.width == 384


@pytest.mark.integration
@pytest.mark.slow
def test_lcl_study_runs_end_to_end_on_its_tiny_profile_and_reports(tmp_path, capsys):
    store = Store(tmp_path / "s")
    assert main(["run", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    runs = {r["variant"]: r for r in store.runs()}
    assert len(runs) == 10 and all(r["status"] == "completed" for r in runs.values())
    for variant, run in runs.items():
        evals = {(r["evaluator"], r["metric"]) for r in store.evals([run["run_id"]])}
        assert FROZEN <= evals, variant
        base = variant.removesuffix("_pairs")
        if variant == "clip":
            assert not any(e == "docs" for e, _ in evals)
            continue
        assert (("docs", "perplexity") in evals) == (WEIGHTS[base][0] > 0), variant
        assert (("docs", "context_r1") in evals) == (WEIGHTS[base][1] > 0), variant
        kinds = {r["kind"] for r in store.samples(run["run_id"]) if r["evaluator"] == "docs"}
        assert kinds == {"document"}
    losses = {r["name"] for r in store.metrics(runs["lcl"]["run_id"])}
    assert {"lcl_gen", "lcl_con"} <= losses
    assert "lcl_con" not in {r["name"] for r in store.metrics(runs["gen_only"]["run_id"])}
    capsys.readouterr()
    assert main(["report", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in runs) and "probe.top1" in out and "10/10 trials done" in out
