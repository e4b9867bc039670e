"""The package's shape, read from its imports (docs/architecture.md): no import circle, arrows between
the folders run one way, no node module imports another node kind's module, and no module imports
another module's private names. Private attributes of other objects (``obj._x``) are ruff's SLF001,
which CI runs."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
# package name -> its folder (the app lives at the top level and installs as vlpgraph.app)
PACKAGES = {"vlpgraph": REPO / "vlpgraph", "vlpgraph.app": REPO / "app"}

# Which folders a folder may import from ("vlpgraph" is the top-level package: __version__).
# errors.py is the shared vocabulary of user errors: anyone may import it.
ALLOWED = {
    "errors": set(),
    "engine": {"vlpgraph"},
    "files": {"engine"},
    "layers": {"engine", "files"},
    "nodes": {"engine", "files", "layers"},
    "store": {"vlpgraph"},
    "execution": {"engine", "files", "store"},
    "results": {"engine", "store"},
    "app": {"results", "store"},
    "cli": {"vlpgraph", "app", "engine", "execution", "files", "results", "store"},
}
# The registry finds node kinds by walking vlpgraph.nodes: the engine's one way to the nodes.
DISCOVERY = {("vlpgraph.engine.registry", "vlpgraph.nodes")}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def resolve(name: str) -> str:
    """The module a dotted import name lands in (``vlpgraph.store.Store`` -> ``vlpgraph.store``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every vlpgraph import in ``module``, lazy ones too."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlpgraph"):
            for alias in node.names:
                target = resolve(f"{node.module}.{alias.name}")
                out.append((target, "" if target.endswith(f".{alias.name}") else alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(resolve(a.name), "", node.lineno) for a in node.names if a.name.startswith("vlpgraph")]
    return out


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vlpgraph"


def registers_a_kind(module: str) -> bool:
    return "@register(" in MODULES[module].read_text()


def test_the_checker_sees_the_package():
    assert {"vlpgraph.engine.registry", "vlpgraph.store", "vlpgraph.app.main", "vlpgraph.nodes.mixers.timix"} <= set(MODULES)
    assert ("vlpgraph.engine.registry", "") in {(t, n) for t, n, _ in imports("vlpgraph.engine.graph")}
    assert {"engine", "execution", "files", "layers", "nodes", "results", "store", "app"} <= {folder(m) for m in MODULES}


def test_no_import_circle():
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_edges_from((module, target) for target, _, _ in imports(module) if target != module)
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_arrows_between_folders_run_one_way():
    wrong = []
    for module in MODULES:
        for target, _, line in imports(module):
            a, b = folder(module), folder(target)
            if a == b or b == "errors" or (module, target) in DISCOVERY:
                continue
            if b not in ALLOWED[a]:
                wrong.append(f"{MODULES[module].relative_to(REPO)}:{line}: {a}/ imports {target} ({b}/)")
    assert not wrong, "\n".join(wrong)


def test_no_node_module_imports_another_node_kind():
    wrong = [f"{MODULES[m].relative_to(REPO)}:{line}: imports the node kind module {t}"
             for m in MODULES if folder(m) == "nodes"
             for t, _, line in imports(m) if t != m and folder(t) == "nodes" and registers_a_kind(t)]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{MODULES[m].relative_to(REPO)}:{line}: imports {name} from {t}"
             for m in MODULES for t, name, line in imports(m)
             if t != m and any(n.startswith("_") and not n.startswith("__") for n in (name, t.rpartition(".")[2]))]
    assert not wrong, "\n".join(wrong)


def test_no_module_reads_a_private_name_of_an_imported_module():
    wrong = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = defaultdict(str)  # local name -> vlpgraph module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlpgraph"):
                for a in node.names:
                    if resolve(f"{node.module}.{a.name}").endswith(f".{a.name}"):
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("vlpgraph") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)
