"""A graph file -> the list of trials it asks for (grid x variants x seeds), each a validated Graph.

Precedence of edits, lowest first: the file's ``nodes:``, the variant, the grid point, the
``--profile``, then ``--set``. Every resolved graph is validated; all problems of all trials are
reported together, each at the line in the file that caused it.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpgraph.errors import did_you_mean
from vlpgraph.engine.graph import Graph, bind, canonical
from vlpgraph.engine.spec import Problems, apply_dotted, deep_merge, load_yaml, parse_graph_document, split_dotted

DEFAULT_VARIANT = "default"


@dataclass
class Trial:
    variant: str
    seed: int
    grid: dict[str, Any]
    graph: Graph

    @property
    def run_id(self) -> str:
        """The trial's identity: its trainer's content hash plus the seed (docs/architecture.md, "Identity")."""
        return f"{self.graph.nodes[self.graph.trainer].hash[:16]}-s{self.seed}"

    def flat_params(self) -> dict[str, Any]:
        """Every node param as ``node.param`` -> value (JSON types)."""
        out: dict[str, Any] = {}
        for name in self.graph.order:
            for k, v in self.graph.nodes[name].params.model_dump(mode="json").items():
                out[f"{name}.{k}"] = v
        return out

    def data_fingerprints(self) -> dict[str, dict[str, Any]]:
        """{node: fingerprint} of the nodes that read files (what they read, e.g. a manifest's hash)."""
        return {n: b.fingerprint for n, b in self.graph.nodes.items() if b.fingerprint is not None}

    def document(self) -> dict[str, Any]:
        """The resolved trial as plain data (stored in runs.params); ``data`` holds the fingerprints
        of what its data nodes read, so a later run can say what changed (:func:`data_changes`)."""
        nodes = {
            n: {"kind": b.kind.name, "inputs": b.inputs, "params": b.params.model_dump(mode="json")}
            for n, b in self.graph.nodes.items()
        }
        return {"graph": self.graph.name, "variant": self.variant, "seed": self.seed, "grid": self.grid, "nodes": nodes,
                "data": self.data_fingerprints()}


@dataclass
class Experiment:
    file: str
    name: str
    description: str
    trials: list[Trial]
    varied: list[str] = field(default_factory=list)  # node.param keys whose value differs across trials
    variants: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user should know before running (not errors)


def _remap_lines(lines: dict, src_prefix: tuple, dst_prefix: tuple) -> dict:
    n = len(src_prefix)
    return {dst_prefix + p[n:]: ln for p, ln in lines.items() if p[:n] == src_prefix}


def _apply_variant(nodes: dict, name: str, edit: Any, lines: dict, problems: Problems) -> tuple[dict, dict]:
    here = ("sweep", "variants", name)
    nodes = copy.deepcopy(nodes)  # dotted edits write in place; the base graph is shared by every variant
    new_lines = dict(lines)
    if not isinstance(edit, dict):
        problems.add(here, f"variant '{name}': expected a mapping (use {{}} for the unchanged graph)")
        return nodes, new_lines
    for key, value in edit.items():
        if key == "nodes":
            if not isinstance(value, dict):
                problems.add(here + (key,), f"variant '{name}': 'nodes' must be a mapping of node edits")
                continue
            nodes = deep_merge(nodes, value)
            new_lines.update(_remap_lines(lines, here + ("nodes",), ("nodes",)))
        elif split_dotted(key):
            if apply_dotted(nodes, key, value, here + (key,), problems, f"variant '{name}'"):
                node, param = split_dotted(key)
                new_lines[("nodes", node, "params", param)] = lines.get(here + (key,))
        else:
            problems.add(here + (key,), f"variant '{name}': unknown key '{key}' (a variant has 'nodes:' edits and node.param keys)")
    return nodes, new_lines


def load_experiment(path: str | Path, sets: list[tuple[str, Any]] = (), profile: str | None = None) -> Experiment:
    """Load, expand and validate a graph file; raises UserError listing every problem."""
    file = str(path)
    data, lines = load_yaml(path)
    problems = Problems(file, lines)
    spec = parse_graph_document(data, problems)
    if spec is None:
        problems.raise_if_any()
    raw = data  # keep the user's own spelling of inputs/params (pydantic defaults are not edits)
    base_nodes = {n: {k: copy.deepcopy(v) for k, v in raw["nodes"][n].items()} for n in raw["nodes"]}
    sweep = spec.sweep
    seeds = list(sweep.seeds) if sweep and sweep.seeds is not None else [spec.seed]

    overrides: list[tuple[str, Any, tuple, str]] = []  # (key, value, path, what) applied after the grid
    if profile is not None:
        if profile not in spec.profiles:
            names = ", ".join(spec.profiles) or "none defined"
            problems.add(("profiles",), f"unknown profile '{profile}'{did_you_mean(profile, spec.profiles)} (profiles: {names})")
        else:
            for key, value in spec.profiles[profile].items():
                if key == "sweep.seeds":
                    seeds = list(value) if isinstance(value, list) else [value]
                else:
                    overrides.append((key, value, ("profiles", profile, key), f"profile '{profile}'"))
    for key, value in sets:
        overrides.append((key, value, ("--set", key), "--set"))
        lines[("--set", key)] = f"--set {key}"

    grid = sweep.grid if sweep else {}
    for key in grid:
        if not grid[key]:
            problems.add(("sweep", "grid", key), f"sweep grid '{key}' has no values")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    variants = dict(sweep.variants) if sweep and sweep.variants else {DEFAULT_VARIANT: {}}

    trials: list[Trial] = []
    seen: dict[str, Trial] = {}
    same_model: dict[tuple[str, str], list[str]] = {}  # (variant, earlier variant) -> where they coincide
    resolved = {v: _apply_variant(base_nodes, v, e, lines, problems) for v, e in variants.items()}
    any_variant = set().union(*(set(n) for n, _ in resolved.values()))
    base_dir = Path(file).resolve().parent  # relative paths in params are relative to the graph file
    found: dict[tuple[str, str], list[str]] = {}  # (where, what) of each trial's problem -> its variants
    memo: dict = {}  # fingerprints of data nodes: each distinct one read once per load
    for vname in variants:
        vnodes, vlines = resolved[vname]
        removed = {n: vname for n in base_nodes if n not in vnodes}
        for point in points:
            nodes = copy.deepcopy(vnodes)
            tlines = dict(vlines)
            ok = True
            for key, value in point.items():
                here = ("sweep", "grid", key)
                ok &= apply_dotted(nodes, key, value, here, problems, "sweep grid")
                if split_dotted(key):
                    tlines[("nodes",) + (split_dotted(key)[0], "params", split_dotted(key)[1])] = lines.get(here)
            for key, value, here, what in overrides:
                node = (split_dotted(key) or ("",))[0]
                if node not in nodes and node in any_variant:
                    continue  # a profile may tune a node that only some variants have
                ok &= apply_dotted(nodes, key, value, here, problems, what)
                if split_dotted(key):
                    tlines[("nodes", split_dotted(key)[0], "params", split_dotted(key)[1])] = lines.get(here, f"--set {key}")
            if not ok:
                continue
            tproblems = Problems(file, tlines)
            graph = bind(spec.graph, nodes, tproblems, base_dir=base_dir, removed=removed, memo=memo)
            for entry in tproblems.entries:
                if vname not in found.setdefault(entry, []):
                    found[entry].append(vname)
            if graph is None:
                continue
            # the grid values as the trial really has them (--set or a profile may override a grid key)
            resolved_point = {k: graph.nodes[split_dotted(k)[0]].params.model_dump(mode="json").get(split_dotted(k)[1], v)
                              for k, v in point.items()}
            for seed in seeds:
                trial = Trial(vname, seed, resolved_point, graph)
                first = seen.get(trial.run_id)
                if first is None:
                    seen[trial.run_id] = trial
                    trials.append(trial)
                elif first.variant != vname:
                    # two edits that train the same model are one trial (one training run, one row): say so,
                    # since this variant's own evaluators, if it has any, never run
                    where = " ".join([f"{k}={v}" for k, v in point.items()] + [f"seed={seed}"])
                    same_model.setdefault((vname, first.variant), []).append(where)
    # A problem every variant has is the file's; one that only some variants have is named by them
    # (a node a variant adds, edits or deletes, and its consequences).
    for (where, what), in_variants in found.items():
        if len(variants) == 1 or len(in_variants) == len(variants):
            problems.add_line(where, what)
        else:
            for vname in in_variants:
                problems.add_line(where, f"variant '{vname}': {what}")
    problems.raise_if_any()

    flat = [t.flat_params() for t in trials]
    keys = sorted({k for f in flat for k in f})
    # varied: a param whose value differs between trials that have it (a node only some variants
    # have is what tells the variants apart, not a varied param)
    varied = [k for k in keys if len({repr(f[k]) for f in flat if k in f}) > 1]
    notes = [f"variant '{v}' trains the same model as variant '{first}' in {len(where)} trial(s) (e.g. {where[0]}): "
             f"each runs once, as '{first}', with that variant's evaluators; to compare evaluators on one model, "
             "give them different node names in one graph" for (v, first), where in same_model.items()]
    return Experiment(file, spec.graph, spec.description, trials, varied, list(variants), notes)


def data_changes(exp: Experiment, store) -> list[str]:
    """One line per data node whose files changed since earlier runs of the same trials.

    A trial not yet in ``store`` is compared with the newest earlier run of the same graph, variant,
    seed and grid point (a different run id: something in the graph changed); each data node whose
    fingerprint differs from the one that run recorded is announced once, e.g. ``node 'coco'
    (dataset.captions): annotations, images changed since run 1a2b...-s0 (rows 40 -> 20); its
    trials train again``. Runs recorded before fingerprints existed are not compared.
    """
    if not store.exists():
        return []
    earlier: dict[tuple, list[dict]] = {}
    runs = store.runs({"graph": exp.name})  # oldest first
    known = {run["run_id"] for run in runs}
    for run in runs:
        try:
            doc = json.loads(run["params"]) if isinstance(run.get("params"), str) else (run.get("params") or {})
        except ValueError:
            continue
        earlier.setdefault((run["variant"], run["seed"], canonical(doc.get("grid") or {})), []).append(
            {"run_id": run["run_id"], "data": doc.get("data") or {}})
    lines: dict[tuple, list[str]] = {}  # (node, kind, what changed, counts) -> run ids it changed since
    for trial in exp.trials:
        before = [r for r in earlier.get((trial.variant, trial.seed, canonical(trial.grid)), [])
                  if r["run_id"] != trial.run_id]
        if not before or trial.run_id in known:  # known: the change was announced when it first ran
            continue
        last = before[-1]
        for node, new in trial.data_fingerprints().items():
            old = last["data"].get(node)
            if old is None or old == new:
                continue
            keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
            what = ", ".join(k for k in keys if not isinstance(new.get(k, old.get(k)), int)) or "data"
            counts = ", ".join(f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys
                               if isinstance(new.get(k, old.get(k)), int))
            kind = trial.graph.nodes[node].kind.name
            lines.setdefault((node, kind, what, counts), []).append(last["run_id"])
    return [f"node '{node}' ({kind}): {what} changed since run {since[-1]}{f' ({counts})' if counts else ''}; "
            f"its trials train again" for (node, kind, what, counts), since in lines.items()]
