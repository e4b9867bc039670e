"""The node catalog: every kind documented, `vlpgraph nodes` lists them, duplicates refused."""

from __future__ import annotations

import pytest

from vlpgraph.engine import registry
from vlpgraph.cli import main
from vlpgraph.engine.registry import Params, register

EXPECTED = {"dataset.shapes", "dataset.captions", "encoder.vit", "encoder.text", "objective.itc",
            "trainer", "evaluator.retrieval", "evaluator.zeroshot",
            "objective.mae", "decoder.caption", "objective.caption", "evaluator.linear_probe",
            "evaluator.transfer_retrieval", "evaluator.captioning", "evaluator.reconstruction"}


def test_builtin_kinds_are_registered():
    assert EXPECTED <= set(registry.kinds())


@pytest.mark.parametrize("name", sorted(registry.kinds()))
def test_every_kind_and_param_is_documented(name):
    kind = registry.get(name)
    assert kind.summary, f"{name} has no doc"
    undocumented = [p for p, f in kind.params.model_fields.items() if not f.description]
    assert not undocumented, f"{name}: params without a description: {undocumented}"


def test_duplicate_kind_is_refused():
    class P(Params):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register("trainer", params=P, output=object)(lambda p, i, c: None)


def test_unknown_role_is_refused():
    class P(Params):
        pass

    with pytest.raises(ValueError, match="role"):
        register("widget.x", params=P, output=object)


def test_nodes_lists_every_kind(capsys):
    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out


def test_nodes_kind_shows_params(capsys):
    assert main(["nodes", "trainer"]) == 0
    out = capsys.readouterr().out
    assert "batch_size" in out and "warmup_steps" in out and "objectives" in out


def test_nodes_unknown_kind(capsys):
    assert main(["nodes", "encoder.vitt"]) == 2
    assert "unknown kind 'encoder.vitt' (did you mean 'encoder.vit'?)" in capsys.readouterr().err


def test_every_role_has_a_colour_on_the_graph_page():
    from vlpgraph.results.plots import ROLE_COLOURS

    assert set(registry.ROLES) <= set(ROLE_COLOURS)  # a role without a colour is not drawn at all
