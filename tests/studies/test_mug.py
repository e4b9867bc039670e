"""The MUG study: graphs/mug.yaml validates with the four variants wired as intended, runs end to end on its
tiny profile, and `vlpgraph report` prints its variant x metric table."""

from __future__ import annotations

import pytest

from tests.helpers import GRAPHS, objectives_of
from vlpgraph.cli import main
from vlpgraph.store import Store
from vlpgraph.engine.sweep import load_experiment

GRAPH = str(GRAPHS / "mug.yaml")
VARIANTS = ["clip", "mae", "captioner", "mug"]
TRANSFER = {("probe", "top1"), ("transfer", "rsum"), ("captioning", "cider"), ("captioning", "bleu4")}


def test_variants_are_wired_as_the_study_says():
    exp = load_experiment(GRAPH)
    assert exp.variants == VARIANTS and len(exp.trials) == 8  # 4 variants x 2 seeds
    by = {t.variant: t for t in exp.trials if t.seed == 0}
    assert objectives_of(by["clip"]) == {"objective.itc"}
    assert objectives_of(by["mae"]) == {"objective.mae"}
    assert objectives_of(by["captioner"]) == {"objective.caption"}
    assert objectives_of(by["mug"]) == {"objective.mae", "objective.caption"}
    # MUG's caption objective reads MAE's masked encoding at 0.1 weight; the captioner's reads the full image
    mug_cap, cap_cap = by["mug"].graph.nodes["caption"], by["captioner"].graph.nodes["caption"]
    assert mug_cap.input_names("masked") == ["mae"] and mug_cap.params.weight == 0.1
    assert "masked" not in cap_cap.inputs and cap_cap.params.weight == 1.0
    assert by["mug"].graph.nodes["mae"].params.weight == 1.0
    # every variant is judged by the same frozen-transfer evaluators with the same params (same budgets)
    for name in ("probe", "transfer", "captioning"):
        hashes = {t.graph.nodes[name].params.model_dump_json() for t in by.values()}
        assert len(hashes) == 1, name
        assert all(t.graph.nodes[name].input_names("encoder") == ["vision"] for t in by.values())
    assert len(load_experiment(GRAPH, profile="full").trials) > len(exp.trials)
    assert load_experiment(GRAPH, profile="gpu").trials[0].graph.nodes["vision"].params.width == 384


@pytest.mark.integration
@pytest.mark.slow
def test_mug_study_runs_end_to_end_and_reports(tmp_path, capsys):
    store = Store(tmp_path / "s")
    assert main(["run", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    runs = {r["variant"]: r for r in store.runs()}
    assert sorted(runs) == sorted(VARIANTS) and all(r["status"] == "completed" for r in runs.values())
    for variant, run in runs.items():
        evals = {(r["evaluator"], r["metric"]) for r in store.evals([run["run_id"]])}
        assert TRANSFER <= evals, variant
        kinds = {(r["evaluator"], r["kind"]) for r in store.samples(run["run_id"])}
        assert ("captioning", "caption") in kinds
        assert (("recon", "reconstruction") in kinds) == (variant in ("mae", "mug"))
        assert (("own_captions", "caption") in kinds) == (variant in ("captioner", "mug"))
    mug_losses = {r["name"] for r in store.metrics(runs["mug"]["run_id"])}
    assert {"mae", "caption"} <= mug_losses
    capsys.readouterr()
    assert main(["report", GRAPH, "--profile", "tiny", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "probe.top1" in out and "transfer.rsum" in out and "captioning.cider" in out
    assert all(v in out for v in VARIANTS) and "4/4 trials done" in out
