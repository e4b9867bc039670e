"""The node-kind registry.

A node kind is a build function plus a pydantic params model, its output port type and its inputs::

    @register(
        "objective.itc",
        params=ITCParams,
        output=Objective,
        inputs={"vision": In(VisionTower), "text": In(TextTower)},
    )
    def build(params: ITCParams, inputs: dict, ctx: BuildContext) -> Objective: ...

Like timm's ``@register_model`` and LAVIS's registry, names are unique: registering a name twice
is refused. The engine finds kinds only through :func:`get` / :func:`kinds`; node modules are
imported once by :func:`load_builtin_kinds`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

ROLES = ("dataset", "encoder", "decoder", "head", "mixer", "objective", "evaluator", "trainer")


class Params(BaseModel):
    """Base class of every node's params model: unknown keys are errors, values are validated.

    Checks that involve several params go in :meth:`problems`, which returns every problem found
    (a pydantic model validator stops at its first ``raise``, so a node would show only one).
    """

    model_config = {"extra": "forbid", "validate_default": True}

    def problems(self) -> list[tuple[str, str]]:
        """Cross-param problems as ``(param, message)`` pairs (``param`` "" for the node as a whole)."""
        return []

    @model_validator(mode="after")
    def _all_problems(self):
        found = self.problems()
        if found:
            raise ValidationError.from_exception_data(type(self).__name__, [
                InitErrorDetails(type=PydanticCustomError("params_problem", msg),
                                 loc=(param,) if param else (), input=getattr(self, param, None) if param else None)
                for param, msg in found
            ])
        return self


# Static facts a data kind knows from its params, before anything is built. Keys (each optional):
#   train_size, test_size: samples in the training split (after train_fraction) and in the test split
#   image_size: the side of the square images it yields
#   at_most: True when the sizes are upper bounds (files: samples dropped as unreadable at build)
#   width: a tower's token width (encoder.text states it; encoder.fusion checks its heads against it)
Facts = dict[str, Any]


def size_of(facts: Facts, key: str) -> str:
    """'32 samples' or, for an upper bound, 'at most 32 samples' (for messages about a split size)."""
    return f"{'at most ' if facts.get('at_most') else ''}{facts[key]} samples"


@dataclass(frozen=True)
class In:
    """One input of a node kind.

    types: the port types accepted (the upstream node's ``output`` must be a subclass of one).
    many:  the input takes a list of node names.
    optional: the input may be left out.
    needs: capabilities the upstream node must provide (e.g. ``{"boxes"}``).
    """

    types: type | tuple[type, ...]
    many: bool = False
    optional: bool = False
    needs: frozenset[str] = frozenset()
    doc: str = ""

    @property
    def type_tuple(self) -> tuple[type, ...]:
        return self.types if isinstance(self.types, tuple) else (self.types,)

    def type_names(self) -> str:
        return " | ".join(t.__name__ for t in self.type_tuple)


@dataclass(frozen=True)
class NodeKind:
    name: str
    build: Callable[..., Any]
    params: type[Params]
    output: type
    inputs: dict[str, In] = field(default_factory=dict)
    # Capabilities this node's output provides, as a function of its validated params
    # (dataset.captions has boxes only when its manifest has a boxes column, say).
    provides: Callable[[Params], frozenset[str]] = lambda p: frozenset()
    # What the node reads from outside the graph file (e.g. a manifest's content hash and a
    # fingerprint of its images), as a JSON-able dict: part of the node's hash, so edited data is a
    # new trial. fingerprint(params, base_dir) -> dict; base_dir: the folder relative paths resolve against.
    fingerprint: Callable[[Params, Path], dict[str, Any]] | None = None
    # facts(params, base_dir) -> Facts known before building (a data kind's split sizes, image size).
    facts: Callable[[Params, Path], Facts] = lambda p, base_dir: {}
    # check(params, inputs) -> problems that need the inputs' facts; inputs: {port: [facts of each
    # upstream node, with its name under "node"]}. A problem is a message, or (param, message).
    check: Callable[[Params, dict[str, list[Facts]]], list[str | tuple[str, str]]] = lambda p, inputs: []
    # Capabilities the TRAINER's data must provide when this node is one of the trainer's objectives or
    # something they use (a mixer, another objective), as a function of the validated params and of the
    # kinds wired to each input ({port: [kind name, ...]}): e.g. objective.itc treats each image and caption
    # of a batch as a pair, so it requires "paired" (unpaired or interleaved data would train it on junk).
    requires: Callable[[Params, dict[str, list[str]]], frozenset[str]] = lambda p, inputs: frozenset()
    doc: str = ""

    @property
    def role(self) -> str:
        return self.name.split(".")[0]

    @property
    def summary(self) -> str:
        return (self.doc.strip().splitlines() or [""])[0]


_KINDS: dict[str, NodeKind] = {}


def register(
    name: str,
    *,
    params: type[Params],
    output: type,
    inputs: dict[str, In] | None = None,
    provides: frozenset[str] | Callable[[Params], frozenset[str]] = frozenset(),
    fingerprint: Callable[[Params, Path], dict[str, Any]] | None = None,
    facts: Callable[[Params, Path], Facts] | None = None,
    check: Callable[[Params, dict[str, list[Facts]]], list] | None = None,
    requires: frozenset[str] | Callable[[Params, dict[str, list[str]]], frozenset[str]] = frozenset(),
):
    """Decorator registering ``build`` as node kind ``name`` (``role.what``, or just ``trainer``).

    Optional hooks, all run at validation (see :class:`NodeKind`): ``fingerprint`` (what the node
    reads from disk, part of its hash), ``facts`` (what a data kind knows before building),
    ``check`` (problems found against the inputs' facts) and ``requires`` (capabilities the trainer's
    data must provide for an objective or mixer it trains with; a set, or a function of the params and
    the wired inputs' kinds)."""
    role = name.split(".")[0]
    if role not in ROLES:
        raise ValueError(f"kind {name!r}: role {role!r} is not one of {ROLES}")
    if not issubclass(params, Params):
        raise TypeError(f"kind {name!r}: params must subclass vlpgraph.engine.registry.Params")
    provides_fn = provides if callable(provides) else (lambda p, _c=frozenset(provides): _c)
    requires_fn = requires if callable(requires) else (lambda p, inputs, _c=frozenset(requires): _c)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _KINDS:
            raise ValueError(f"node kind {name!r} is already registered (by {_KINDS[name].build.__module__})")
        _KINDS[name] = NodeKind(
            name=name,
            build=fn,
            params=params,
            output=output,
            inputs=dict(inputs or {}),
            provides=provides_fn,
            requires=requires_fn,
            fingerprint=fingerprint,
            **({"facts": facts} if facts else {}),
            **({"check": check} if check else {}),
            doc=fn.__doc__ or "",
        )
        return fn

    return deco


_loaded = False


def load_builtin_kinds() -> None:
    """Import every module under ``vlpgraph.nodes`` once, which registers the built-in kinds."""
    global _loaded
    if _loaded:
        return
    import vlpgraph.nodes as nodes_pkg

    for mod in pkgutil.walk_packages(nodes_pkg.__path__, prefix="vlpgraph.nodes."):
        importlib.import_module(mod.name)
    _loaded = True


def get(name: str) -> NodeKind:
    load_builtin_kinds()
    return _KINDS[name]


def kinds() -> dict[str, NodeKind]:
    load_builtin_kinds()
    return dict(sorted(_KINDS.items()))
