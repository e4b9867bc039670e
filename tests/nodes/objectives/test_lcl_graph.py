"""LCL's pieces as one graph: interleaved shapes documents -> ViT -> head.attentive_pool -> encoder.lm ->
objective.lcl, judged by the frozen-transfer evaluators, end to end through `vlpgraph run`."""

from __future__ import annotations

from vlpgraph.cli import main
from vlpgraph.store import Store

GRAPH = """\
graph: lcl_tiny
seed: 0
nodes:
  shapes:
    kind: dataset.shapes
    params: {train_size: 128, test_size: 48, image_size: 32, caption_noise: 0.2, pairing: interleaved}
  vision:
    kind: encoder.vit
    params: {image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}
  pool:
    kind: head.attentive_pool
    inputs: {vision: vision}
    params: {heads: 2}
  lm:
    kind: encoder.lm
    inputs: {data: shapes}
    params: {width: 32, depth: 1, heads: 2, max_len: 160}
  lcl:
    kind: objective.lcl
    inputs: {data: shapes, vision: vision, pool: pool, lm: lm}
    params: {embed_dim: 32}
  train:
    kind: trainer
    inputs: {data: shapes, objectives: [lcl]}
    params: {epochs: 1, batch_size: 8, warmup_steps: 1, log_every: 1}
  probe:
    kind: evaluator.linear_probe
    inputs: {model: train, data: shapes, encoder: vision}
    params: {steps: 5}
  transfer:
    kind: evaluator.transfer_retrieval
    inputs: {model: train, data: shapes, encoder: vision}
    params: {steps: 5, ks: [1, 5]}
sweep:
  variants:
    lcl: {}
    gen_only: {nodes: {lcl: {params: {con_weight: 0.0}}}}
"""


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
