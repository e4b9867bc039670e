"""docs/reference/nodes.md is the registry's catalog as it stands: regenerated, it is the committed file."""

from __future__ import annotations

from pathlib import Path

from vlpgraph.engine import catalog, registry

ROOT = Path(__file__).resolve().parents[2]


def test_committed_catalog_is_the_generated_one():
    committed = (ROOT / catalog.PATH).read_text(encoding="utf-8")
    generated = catalog.markdown()
    if committed != generated:
        old, new = committed.splitlines(), generated.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        was = old[first] if first < len(old) else "(end of file)"
        now = new[first] if first < len(new) else "(end of file)"
        raise AssertionError(f"{catalog.PATH} is out of date: run {catalog.COMMAND} and commit the result "
                             f"(first difference at line {first + 1}: committed {was!r}, generated {now!r})")


def test_catalog_documents_every_builtin_kind_once():
    text = catalog.markdown()
    kinds = catalog.builtin_kinds()
    assert kinds, "no built-in kinds registered"
    for name in kinds:
        assert text.count(f"\n### `{name}`\n") == 1, name
        assert f"](#{catalog.anchor(name)})" in text, name


def test_catalog_leaves_out_kinds_registered_at_run_time():
    """A kind registered by a script or a test (here: the registry's own duplicate check aside, a
    throwaway kind) is not part of the shipped catalog, so the committed file stays true in any session."""

    class P(registry.Params):
        pass

    name = "objective.catalog_test_throwaway"
    registry.register(name, params=P, output=object)(lambda p, i, c: None)
    try:
        assert name in registry.kinds()
        assert name not in catalog.builtin_kinds()
        assert name not in catalog.markdown()
    finally:
        registry._KINDS.pop(name, None)  # the registry has no public unregister
