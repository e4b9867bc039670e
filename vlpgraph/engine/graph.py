"""Nodes bound to their kinds -> a networkx DAG: params, port types, capabilities, cycles, hashes.

Input: the ``nodes:`` mapping of one resolved graph (a variant with its grid values applied).
Output: a :class:`Graph` whose nodes carry validated params, a topological order and content hashes.
Every problem is added to a :class:`~vlpgraph.engine.spec.Problems`; nothing is built here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from pydantic import ValidationError

import vlpgraph
from vlpgraph.engine import registry
from vlpgraph.errors import did_you_mean
from vlpgraph.engine.registry import NodeKind, Params
from vlpgraph.engine.spec import Problems


@dataclass
class BoundNode:
    name: str
    kind: NodeKind
    params: Params
    inputs: dict[str, str | list[str]]
    hash: str = ""
    # what the node reads from disk (kind.fingerprint), part of its hash; None for kinds without one
    fingerprint: dict[str, Any] | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # kind.facts: known before building

    def input_names(self, port: str) -> list[str]:
        v = self.inputs.get(port)
        return [] if v is None else ([v] if isinstance(v, str) else list(v))


@dataclass
class Graph:
    name: str
    nodes: dict[str, BoundNode]
    dag: nx.DiGraph
    order: list[str]
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in params resolve here: the graph file's folder

    def by_role(self, role: str) -> list[str]:
        return [n for n in self.order if self.nodes[n].kind.role == role]

    @property
    def trainer(self) -> str:
        return self.by_role("trainer")[0]

    def upstream(self, name: str) -> list[str]:
        """``name`` and every node it depends on, in topological order."""
        keep = nx.ancestors(self.dag, name) | {name}
        return [n for n in self.order if n in keep]


def port_name(cls: type) -> str:
    """The port type a class implements (``VisionTower`` for a ViT tower class), for messages."""
    for c in cls.__mro__:
        if c.__module__ == "vlpgraph.engine.ports":
            return c.__name__
    return cls.__name__


def _param_problems(err: ValidationError, kind: NodeKind, name: str, problems: Problems) -> None:
    fields = list(kind.params.model_fields)
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ("nodes", name, "params") + loc[:1]
        pname = ".".join(map(str, loc))
        if e["type"] == "extra_forbidden":
            msg = f"unknown param '{pname}'{did_you_mean(loc[0], fields)}"
        elif e["type"] == "params_problem":  # Params.problems(): the message names its params itself
            msg = e["msg"]
        elif e["type"] == "missing":
            msg = f"missing param '{pname}'"
        else:
            text = e["msg"][0].lower() + e["msg"][1:] if e["msg"] else "invalid"
            text = text.removeprefix("value error, ")
            got = e.get("input")
            got_s = f" (got {got!r})" if loc and not isinstance(got, dict) else ""
            msg = f"param '{pname}': {text}{got_s}" if loc else f"params: {text}"
        problems.add(path, msg, node=name, kind=kind.name)


def bind(graph_name: str, nodes_raw: dict[str, dict], problems: Problems, base_dir: Path | None = None,
         removed: dict[str, str] | None = None, memo: dict | None = None) -> Graph | None:
    """Validate every node against its kind and every edge against port types; None if unusable.

    base_dir: the folder relative paths in params resolve against (the graph file's; default: the
    working directory). removed: nodes of the file that a variant deletes ({node: variant}), named
    when an input still refers to one. After the port checks each kind's ``check`` runs against its
    inputs' static facts (split sizes, image size), and every node's fingerprint (what it reads
    from disk) is taken for its hash. memo: a dict shared by the bind calls of one graph load, so a
    node with the same params in many trials reads its files once.
    """
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    removed = removed or {}
    kinds = registry.kinds()
    n_before = problems.added
    bound: dict[str, BoundNode] = {}
    for name, raw in nodes_raw.items():
        kind_name = raw.get("kind")
        if kind_name not in kinds:
            problems.add(("nodes", name, "kind"), f"unknown kind '{kind_name}'{did_you_mean(kind_name, kinds)}", node=name)
            continue
        kind = kinds[kind_name]
        try:
            params = kind.params.model_validate(raw.get("params") or {})
        except ValidationError as e:
            _param_problems(e, kind, name, problems)
            continue
        bound[name] = BoundNode(name, kind, params, dict(raw.get("inputs") or {}))

    dag = nx.DiGraph()
    dag.add_nodes_from(nodes_raw)
    for name, node in bound.items():
        kind = node.kind
        for port, ref in node.inputs.items():
            path = ("nodes", name, "inputs", port)
            if port not in kind.inputs:
                hint = did_you_mean(port, kind.inputs)
                known = ", ".join(kind.inputs) or "none"
                problems.add(path, f"unknown input '{port}'{hint} (inputs of {kind.name}: {known})", node=name, kind=kind.name)
                continue
            spec = kind.inputs[port]
            if isinstance(ref, list) and not spec.many:
                problems.add(path, f"input '{port}' takes one node name, got a list", node=name, kind=kind.name)
                continue
            for src in [ref] if isinstance(ref, str) else ref:
                if src not in nodes_raw:
                    why = (f"which variant '{removed[src]}' deletes" if src in removed
                           else f"which does not exist{did_you_mean(src, nodes_raw)}")
                    problems.add(path, f"input '{port}' refers to node '{src}', {why}", node=name, kind=kind.name)
                    continue
                dag.add_edge(src, name, port=port)
                if src not in bound:
                    continue  # its own problem is already reported
                up = bound[src]
                if not issubclass(up.kind.output, spec.type_tuple):
                    problems.add(path, f"input '{port}' expects {spec.type_names()}, got {port_name(up.kind.output)} from '{src}'", node=name, kind=kind.name)
                    continue
                missing = set(spec.needs) - set(up.kind.provides(up.params))
                if missing:
                    problems.add(path, f"input '{port}' needs data with {', '.join(sorted(missing))}, which '{src}' ({up.kind.name}) does not provide", node=name, kind=kind.name)
        for port, spec in kind.inputs.items():
            if not spec.optional and port not in node.inputs:
                problems.add(("nodes", name, "inputs"), f"missing input '{port}' ({spec.type_names()})", node=name, kind=kind.name)

    position = {n: i for i, n in enumerate(nodes_raw)}
    for cycle in nx.simple_cycles(dag):
        first = min(range(len(cycle)), key=lambda i: position[cycle[i]])  # start where the file does
        cycle = cycle[first:] + cycle[:first]
        loop = " -> ".join(cycle + [cycle[0]])
        problems.add((), f"cycle: {loop}")
    trainers = [n for n, raw in nodes_raw.items() if str(raw.get("kind")) == "trainer"]
    if len(trainers) != 1:
        found = ", ".join(trainers) or "none"
        problems.add(("nodes",), f"a graph needs exactly one trainer node (found: {found})")
    _check_facts(bound, base_dir, problems)  # also when something else is wrong: every problem at once
    _check_requires(bound, problems)
    if problems.added > n_before:
        return None
    graph = Graph(graph_name, bound, dag, list(nx.lexicographical_topological_sort(dag)), base_dir)
    memo = {} if memo is None else memo
    for node in bound.values():
        if node.kind.fingerprint is not None:
            key = (node.kind.name, str(base_dir), canonical(node.params.model_dump(mode="json")))
            if key not in memo:
                memo[key] = node.kind.fingerprint(node.params, base_dir)
            node.fingerprint = memo[key]
    assign_hashes(graph)
    return graph


def _check_facts(bound: dict[str, BoundNode], base_dir: Path, problems: Problems) -> None:
    """Each kind's ``check`` against the static facts of its inputs. Inputs that name no valid node
    are left out (their problem is reported already); checks read facts with ``.get``, so a source of
    the wrong kind only means fewer facts."""
    for node in bound.values():
        node.facts = dict(node.kind.facts(node.params, base_dir))
    for name, node in bound.items():
        inputs = {port: [{"node": src, **bound[src].facts} for src in node.input_names(port) if src in bound]
                  for port in node.inputs}
        for problem in node.kind.check(node.params, inputs):
            param, msg = problem if isinstance(problem, tuple) else ("", problem)
            path = ("nodes", name, "params", param) if param else ("nodes", name)
            problems.add(path, msg, node=name, kind=node.kind.name)


# Why a kind requires a capability of the trainer's data (NodeKind.requires), for the message.
_WHY = {
    "paired": "it treats each image and caption of a batch as a pair",
    "interleaved": "it trains on interleaved documents",
}


def _check_requires(bound: dict[str, BoundNode], problems: Problems) -> None:
    """Each trainer's objectives, and every node they use (a mixer, another objective), against what the
    trainer's data provides: a node whose kind ``requires`` a capability the data lacks is a problem at
    its ``kind`` line, e.g. objective.itc on unpaired or interleaved data. Every such node is reported,
    in file order; nodes or inputs that are not valid are left out (their problem is reported already)."""
    for trainer in bound.values():
        if trainer.kind.role != "trainer":
            continue
        sources = [s for s in trainer.input_names("data") if s in bound]
        if not sources:
            continue
        data = bound[sources[0]]
        provided = data.kind.provides(data.params)
        used: set[str] = set()
        todo = trainer.input_names("objectives")
        while todo:
            name = todo.pop()
            if name in used or name not in bound:
                continue
            used.add(name)
            todo += [s for port in bound[name].inputs for s in bound[name].input_names(port)]
        for name, node in bound.items():
            if name not in used:
                continue
            wired = {port: [bound[s].kind.name for s in node.input_names(port) if s in bound] for port in node.inputs}
            missing = sorted(node.kind.requires(node.params, wired) - provided)
            if not missing:
                continue
            why = "; ".join(_WHY[c] for c in missing if c in _WHY)
            problems.add(("nodes", name, "kind"),
                         f"needs {' and '.join(missing)} data{f' ({why})' if why else ''}, but the trainer's data "
                         f"'{data.name}' ({data.kind.name}) provides {', '.join(sorted(provided)) or 'nothing'}",
                         node=name, kind=node.kind.name)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def assign_hashes(graph: Graph) -> None:
    """hash(node) = sha256(kind, canonical params, inputs' hashes, package version) (docs/architecture.md, "Identity"), plus
    the node's fingerprint for kinds that read files: edited data is different data."""
    for name in graph.order:
        node = graph.nodes[name]
        ins = {p: [graph.nodes[s].hash for s in node.input_names(p)] for p in sorted(node.inputs)}
        doc = {"kind": node.kind.name, "params": node.params.model_dump(mode="json"), "inputs": ins, "version": vlpgraph.__version__}
        if node.fingerprint is not None:  # kinds without one keep the hashes they always had
            doc["data"] = node.fingerprint
        blob = canonical(doc)
        node.hash = hashlib.sha256(blob.encode()).hexdigest()
