"""The node catalog as Markdown: docs/reference/nodes.md, generated from the registry so it cannot drift.

:func:`markdown` documents every built-in kind (those registered by the modules under ``vlpgraph.nodes``)
from what the registry holds — the same docstrings, port types and pydantic fields that ``vlpgraph
nodes KIND`` prints — grouped by role, sorted by name. ``scripts/write-node-catalog`` writes it to
docs/reference/nodes.md; a test compares the committed file with this function's output.
"""

from __future__ import annotations

import inspect
import re
import types

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic.fields import FieldInfo

from vlpgraph.engine import registry
from vlpgraph.engine.graph import port_name
from vlpgraph.engine.registry import NodeKind

PATH = "docs/reference/nodes.md"
COMMAND = "scripts/write-node-catalog"

ROLE_TITLES = {
    "dataset": "Datasets",
    "encoder": "Encoders",
    "decoder": "Decoders",
    "head": "Heads",
    "mixer": "Mixers",
    "objective": "Objectives",
    "evaluator": "Evaluators",
    "trainer": "Trainer",
}


def builtin_kinds() -> dict[str, NodeKind]:
    """The kinds the package itself registers (a kind registered at run time, e.g. by a test, is left out)."""
    return {name: k for name, k in registry.kinds().items() if k.build.__module__.startswith("vlpgraph.nodes.")}


# ----------------------------------------------------------------------------------- text helpers


def type_name(annotation) -> str:
    """A param's type as written in Python: ``int``, ``float | None``, ``Literal['cls', 'mean']``."""
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+([A-Za-z_]\w*)", r"\1", text)  # module paths off class names


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return repr(value)


_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"),
           (MinLen, "min_length", "length ≥"), (MaxLen, "max_length", "length ≤"))


def constraints_text(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(m, cls):
                parts.append(f"{sign} {getattr(m, attr)}")
                break
        else:
            parts.append(str(m))
    return ", ".join(parts)


def _prose(text: str) -> str:
    """Docstring or description text as Markdown: RST ``code`` becomes `code`; outside code, ``<`` and
    ``>`` are escaped (``<soi>`` is not an HTML tag)."""
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):  # even pieces are outside code spans
        pieces[i] = pieces[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def _cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped."""
    return _prose(" ".join(str(text).split())).replace("|", "\\|")


def _code(text: str) -> str:
    """A code span for a table cell (pipes escaped; backticks in the text widen the fence)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def anchor(name: str) -> str:
    """The anchor GitHub gives the heading ``### `name` ``: lower case, punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


# --------------------------------------------------------------------------------------- sections


def _requires_line(kind: NodeKind) -> str | None:
    """What the trainer's data must provide when this kind trains (as ``vlpgraph nodes KIND`` says it)."""
    try:
        defaults = kind.params()
    except ValueError:  # required params: what it requires depends on them
        return None
    bare = kind.requires(defaults, {})
    wired = kind.requires(defaults, {name: [name] for name in kind.inputs})
    if not (bare or wired):
        return None
    line = f"The trainer's data must provide: {', '.join(sorted(bare)) or 'nothing'}"
    if wired != bare:
        line += f" (with every optional input wired: {', '.join(sorted(wired)) or 'nothing'})"
    return line + " (validation checks it, with the default params)."


def kind_section(kind: NodeKind) -> list[str]:
    out = [f"### `{kind.name}`", ""]
    doc = inspect.cleandoc(kind.doc) if kind.doc else "(no doc)"
    out += [_prose(doc), ""]
    out += [f"Output: `{port_name(kind.output)}`.", ""]
    requires = _requires_line(kind)
    if requires:
        out += [requires, ""]
    if kind.inputs:
        out += ["| input | accepts | list | optional | needs | what |", "|---|---|---|---|---|---|"]
        for port, spec in kind.inputs.items():
            out.append(f"| `{port}` | {_code(spec.type_names())} | {'yes' if spec.many else ''} | "
                       f"{'yes' if spec.optional else ''} | {', '.join(sorted(spec.needs))} | {_cell(spec.doc)} |")
        out.append("")
    else:
        out += ["No inputs.", ""]
    fields = kind.params.model_fields
    if fields:
        out += ["| param | type | default | constraints | what |", "|---|---|---|---|---|"]
        for name, field in fields.items():
            out.append(f"| `{name}` | {_code(type_name(field.annotation))} | {_code(default_text(field))} | "
                       f"{_cell(constraints_text(field))} | {_cell(field.description or '')} |")
        out.append("")
    else:
        out += ["No params.", ""]
    return out


def markdown(kinds: dict[str, NodeKind] | None = None) -> str:
    """The catalog page: a table of every kind, then one section per kind (role order, then name)."""
    kinds = builtin_kinds() if kinds is None else kinds
    ordered = sorted(kinds.values(), key=lambda k: (registry.ROLES.index(k.role), k.name))
    out = [
        "# Node catalog",
        "",
        f"<!-- Generated from the node registry by {COMMAND}; do not edit by hand. -->",
        "",
        (f"Every node kind vlpgraph ships, generated from the registry (`{COMMAND}` writes this page; a test "
         "fails when it differs from the code). `vlpgraph nodes` lists the same kinds and `vlpgraph nodes KIND` "
         "prints one of them. How a graph file uses them: [the graph file](graph-file.md); how to add one: "
         "[writing a node kind](../writing-a-node-kind.md)."),
        "",
        ("Inputs name the port types they accept (`VisionTower`, `PairedData`, ...: the interfaces in "
         "`vlpgraph/engine/ports.py`); validation checks every edge against them. *list*: the input takes a list "
         "of node names. *needs*: capabilities the upstream data must provide. Types and defaults are written as "
         "Python writes them: `None` is YAML's `null`, `True` its `true`, a tuple a YAML list."),
        "",
        "| kind | output | what it does |",
        "|---|---|---|",
    ]
    for k in ordered:
        out.append(f"| [`{k.name}`](#{anchor(k.name)}) | `{port_name(k.output)}` | {_cell(k.summary)} |")
    out.append("")
    role = None
    for k in ordered:
        if k.role != role:
            role = k.role
            out += [f"## {ROLE_TITLES.get(role, role)}", ""]
        out += kind_section(k)
    return "\n".join(out).rstrip("\n") + "\n"
