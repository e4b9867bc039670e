"""LCL's pieces as one graph: interleaved shapes documents -> ViT -> head.attentive_pool -> encoder.lm ->
objective.lcl, judged by the frozen-transfer evaluators, end to end through `vlpgraph run`."""

from __future__ import annotations

import pytest

from tests.helpers import evaluator, lcl_nodes, shapes, tiny_graph, trainer
from vlpgraph.cli import main
from vlpgraph.store import Store

GRAPH = tiny_graph(graph="lcl_tiny", nodes={
    "shapes": shapes(train_size=128, test_size=48, image_size=32, caption_noise=0.2, pairing="interleaved"),
    **lcl_nodes(), "train": trainer("lcl", batch_size=8, warmup_steps=1, log_every=1),
    "probe": evaluator("linear_probe", inputs={"encoder": "vision"}, steps=5),
    "transfer": evaluator("transfer_retrieval", inputs={"encoder": "vision"}, steps=5, ks=[1, 5])}, more="""\
sweep:
  variants:
    lcl: {}
    gen_only: {nodes: {lcl: {params: {con_weight: 0.0}}}}
""")


@pytest.mark.integration
def test_lcl_graph_trains_on_documents_and_is_judged_by_frozen_transfer(tmp_path):
    path = tmp_path / "lcl_tiny.yaml"
    path.write_text(GRAPH)
    store = Store(tmp_path / "s")
    assert main(["run", str(path), "--store", str(store.root)]) == 0
    runs = {r["variant"]: r for r in store.runs()}
    assert sorted(runs) == ["gen_only", "lcl"] and all(r["status"] == "completed" for r in runs.values())
    names = {v: {m["name"] for m in store.metrics(r["run_id"])} for v, r in runs.items()}
    assert {"lcl_gen", "lcl_con"} <= names["lcl"]
    assert "lcl_gen" in names["gen_only"] and "lcl_con" not in names["gen_only"]  # a weight of 0 is not computed
    for run in runs.values():
        evals = {(e["evaluator"], e["metric"]) for e in store.evals([run["run_id"]])}
        assert ("probe", "top1") in evals and ("transfer", "rsum") in evals
