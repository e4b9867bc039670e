"""A trial's validated graph -> a Plan: every node built in topological order.

A node's build function receives its params, its built inputs (a dict {node: output} for a ``many``
input) and a BuildContext. The random state is reseeded from (trial seed, node name) before each
build, so a module's initial weights do not depend on which other nodes the graph happens to have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.engine.ports import BuildContext, Evaluator, Model
from vlpgraph.engine.sweep import Trial


@dataclass
class Plan:
    trial: Trial
    model: Model  # the trainer's output
    evaluators: dict[str, Evaluator]
    built: dict[str, Any]


def node_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def compile_trial(trial: Trial, cache_root: Path, device: torch.device, log: Callable[[str], None] = print) -> Plan:
    graph = trial.graph
    built: dict[str, Any] = {}
    for name in graph.order:
        node = graph.nodes[name]
        inputs: dict[str, Any] = {}
        for port, spec in node.kind.inputs.items():
            if port not in node.inputs:
                inputs[port] = {} if spec.many else None
                continue
            srcs = node.input_names(port)
            inputs[port] = {s: built[s] for s in srcs} if spec.many else built[srcs[0]]
        upstream = {n: built[n] for n in graph.upstream(name) if n != name}
        ctx = BuildContext(name, node.hash, trial.seed, cache_root, device, log, upstream, graph.base_dir)
        torch.manual_seed(node_seed(trial.seed, name))
        try:
            out = node.kind.build(node.params, inputs, ctx)
        except (UserError, TrialFailed):
            raise
        except Exception as e:  # a bug or a resource problem in one node: fail this trial, name the node
            raise TrialFailed(f"node '{name}' ({node.kind.name}) failed to build: {type(e).__name__}: {e}") from e
        if isinstance(out, torch.nn.Module):
            out.to(device)
        built[name] = out
    model = built[graph.trainer]
    evaluators = {n: built[n] for n in graph.by_role("evaluator")}
    return Plan(trial, model, evaluators, built)
