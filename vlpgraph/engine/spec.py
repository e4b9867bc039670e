"""YAML -> a checked graph document, with the file line of every key kept for error messages.

This module knows the *shape* of a graph file (docs/reference/graph-file.md): ``graph``, ``nodes``, ``sweep``,
``profiles``; it does not know node kinds (graph.py checks those). Every problem found is collected
into an :class:`Problems` list so the user sees all of them at once.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlpgraph.errors import UserError, did_you_mean

NODE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
Path_ = tuple  # a key path into the document, e.g. ("nodes", "train", "params", "epochs")


# ------------------------------------------------------------------------------------ problems


@dataclass
class Problems:
    """Collects one-line error messages, each with the file line of the key it is about."""

    file: str
    lines: dict[Path_, int | str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    added: int = 0  # every add() call, duplicates included: lets a caller ask "did my part fail?"
    entries: list[tuple[str, str]] = field(default_factory=list)  # (where, what) of each message

    def line_of(self, path: Path_) -> int | str | None:
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def add(self, path: Path_, message: str, node: str | None = None, kind: str | None = None) -> None:
        self.added += 1
        line = self.line_of(path)
        # a line may also be a label such as "--set train.lr" for edits that come from the command line
        where = line if isinstance(line, str) else (f"{self.file}:{line}" if line else self.file)
        who = ""
        if node is not None:
            who = f"node '{node}' ({kind}): " if kind else f"node '{node}': "
        self.add_line(where, f"{who}{message}")

    def add_line(self, where: str, what: str) -> None:
        """Add ``where: what`` once (``where`` is ``file:line`` or a label such as ``--set k``)."""
        msg = f"{where}: {what}"
        if msg not in self.messages:
            self.messages.append(msg)
            self.entries.append((where, what))

    def raise_if_any(self) -> None:
        if self.messages:
            raise UserError(self.messages)


# ------------------------------------------------------------------------------ YAML with lines


def _to_python(node: yaml.Node, path: Path_, lines: dict, dupes: list, constructor) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            kpath = path + (key,)
            if key in out:
                dupes.append((kpath, lines.get(kpath), key_node.start_mark.line + 1))
                continue
            lines[kpath] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, kpath, lines, dupes, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        out_list = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            out_list.append(_to_python(item, path + (i,), lines, dupes, constructor))
        return out_list
    return constructor.construct_object(node, deep=True)


def load_yaml(path: str | Path) -> tuple[Any, dict[Path_, int]]:
    """Safe-load a YAML file; returns (data, {key path: line}). Duplicate keys and syntax errors are
    UserErrors with the line."""
    p = Path(path)
    if not p.exists():
        hint = ""
        if p.parent.is_dir():
            hint = did_you_mean(p.name, [c.name for c in p.parent.glob("*.yaml")])
        raise UserError(f"{path}: file not found{hint}")
    if p.is_dir():
        raise UserError(f"{path}: is a directory, not a graph file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the file ({e})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[Path_, int] = {}
        dupes: list = []
        data = None if root is None else _to_python(root, (), lines, dupes, yaml.SafeLoader(""))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and cmark and mark and cmark.line != mark.line:
            problem += f" ({ctx} that starts on line {cmark.line + 1})"
        raise UserError(f"{path}{line}: YAML syntax error: {problem}") from None
    if dupes:
        raise UserError(
            [f"{path}:{new}: duplicate key '{kp[-1]}' (first given on line {old})" for kp, old, new in dupes]
        )
    return data, lines


# ---------------------------------------------------------------------------------- the document


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSpec(_Strict):
    kind: str
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class SweepSpec(_Strict):
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[int] | None = None


class GraphSpec(_Strict):
    graph: str
    description: str = ""
    seed: int = 0
    nodes: dict[str, NodeSpec]
    sweep: SweepSpec | None = None
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)


def _pydantic_problems(err: ValidationError, problems: Problems, prefix: Path_ = ()) -> None:
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        node = loc[1] if len(loc) > 1 and loc[0] == "nodes" else None
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], allowed)}"
            if parent and not node:
                msg = f"in '{'.'.join(map(str, parent))}': " + msg
        elif e["type"] == "missing":
            msg = f"missing key '{loc[-1]}'"
        else:
            where = ".".join(map(str, loc[2:] if node else loc))
            msg = f"'{where}': {e['msg']}" if where else e["msg"]
        problems.add(loc, msg, node=node)


def _allowed_keys(parent: Path_) -> list[str]:
    if not parent:
        return list(GraphSpec.model_fields)
    if parent[0] == "nodes" and len(parent) == 2:
        return list(NodeSpec.model_fields)
    if parent[0] == "sweep" and len(parent) == 1:
        return list(SweepSpec.model_fields)
    return []


def parse_graph_document(data: Any, problems: Problems) -> GraphSpec | None:
    """Check the document's shape (not node kinds): returns None if it is unusable."""
    if data is None:
        problems.add((), "the file is empty (a graph needs at least 'graph:' and 'nodes:')")
        return None
    if not isinstance(data, dict):
        problems.add((), f"a graph file must be a mapping with 'graph:' and 'nodes:', got a {type(data).__name__}")
        return None
    for name in (data.get("nodes") or {}) if isinstance(data.get("nodes"), dict) else {}:
        if not isinstance(name, str) or not NODE_NAME.match(name):
            problems.add(("nodes", name), f"bad node name '{name}': use lower case letters, digits and _, starting with a letter")
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as e:
        _pydantic_problems(e, problems)
        return None
    if not spec.nodes:
        problems.add(("nodes",), "'nodes' is empty: a graph needs at least a dataset and a trainer")
        return None
    return spec


# ----------------------------------------------------------------------------- dotted overrides


def split_dotted(key: str) -> tuple[str, str] | None:
    """'shapes.train_fraction' -> ('shapes', 'train_fraction'); None if not of that form."""
    parts = str(key).split(".")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def apply_dotted(nodes: dict, key: str, value: Any, path: Path_, problems: Problems, what: str) -> bool:
    """Set ``nodes[node]['params'][param] = value`` for a dotted key; reports a bad key."""
    parts = split_dotted(key)
    if parts is None:
        problems.add(path, f"{what} '{key}': write overrides as node.param (e.g. shapes.train_fraction)")
        return False
    node, param = parts
    if node not in nodes:
        problems.add(path, f"{what} '{key}': no node '{node}'{did_you_mean(node, nodes)}")
        return False
    nodes[node].setdefault("params", {})[param] = copy.deepcopy(value)
    return True


def parse_set(item: str) -> tuple[str, Any]:
    """'--set train.lr=3e-4' -> ('train.lr', 0.0003): the value parses as a YAML scalar."""
    if "=" not in item:
        raise UserError(f"--set {item}: expected node.param=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if split_dotted(key.strip()) is None:
        raise UserError(f"--set {item}: expected node.param=value (e.g. train.epochs=2)")
    return key.strip(), value


def deep_merge(base: Any, edit: Any) -> Any:
    """Merge ``edit`` into ``base``: dicts merge key by key, ``null`` deletes, anything else replaces."""
    if isinstance(base, dict) and isinstance(edit, dict):
        out = dict(base)
        for k, v in edit.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
        return out
    return copy.deepcopy(edit)
