"""Malformed graphs as a new user writes them: each gets one clear line with file:line, exit 2."""

from __future__ import annotations


import pytest

from tests.helpers import itc, shapes, text, tiny_graph, trainer
from vlpgraph.cli import main

# the tiny graph at validation sizes, with a sweep and a profile (tests edit its text and name its lines)
GOOD = tiny_graph(graph="t", shapes=shapes(caption_noise=0.2), text=text(), itc=itc(), train=trainer("itc"), more="""\
sweep:
  grid: {shapes.train_fraction: [0.5, 1.0]}
  seeds: [0, 1]
profiles:
  gpu: {vision.width: 64}
""")


def errors_of(capsys, tmp_path, text, *extra, verb="validate"):
    path = tmp_path / "g.yaml"
    if text is not None:
        path.write_text(text)
    rc = main([verb, str(path), *extra])
    err = capsys.readouterr().err
    lines = [ln.replace(str(path), "G") for ln in err.strip().splitlines()]
    return rc, lines


def test_good_graph_validates(capsys, tmp_path):
    (tmp_path / "g.yaml").write_text(GOOD)
    assert main(["validate", str(tmp_path / "g.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s)" in out and "shapes.train_fraction" in out


CASES = [
    # (id, edit of GOOD (old, new) or full text, extra CLI args, expected line)
    ("yaml_syntax", ("    params: {epochs: 1, batch_size: 16}", "    params: {epochs: 1, batch_size: 16"), (),
     "vlpgraph: G:21: YAML syntax error: expected ',' or '}', but got ':' (while parsing a flow mapping that starts on line 20)"),
    ("unknown_kind", ("kind: encoder.vit", "kind: encoder.vitt"), (),
     "vlpgraph: G:8: node 'vision': unknown kind 'encoder.vitt' (did you mean 'encoder.vit'?)"),
    ("misspelt_param", ("{epochs: 1, batch_size: 16}", "{epoch: 1, batch_size: 16}"), (),
     "vlpgraph: G:20: node 'train' (trainer): unknown param 'epoch' (did you mean 'epochs'?)"),
    ("wrong_type", ("batch_size: 16}", "batch_size: big}"), (),
     "vlpgraph: G:20: node 'train' (trainer): param 'batch_size': input should be a valid integer, unable to parse string as an integer (got 'big')"),
    ("out_of_range", ("caption_noise: 0.2", "caption_noise: 1.5"), (),
     "vlpgraph: G:6: node 'shapes' (dataset.shapes): param 'caption_noise': input should be less than or equal to 1 (got 1.5)"),
    ("missing_node", ("inputs: {data: shapes}\n    params: {width", "inputs: {data: shapse}\n    params: {width"), (),
     "vlpgraph: G:12: node 'text' (encoder.text): input 'data' refers to node 'shapse', which does not exist (did you mean 'shapes'?)"),
    ("type_mismatch", ("inputs: {vision: vision, text: text}", "inputs: {vision: text, text: text}"), (),
     "vlpgraph: G:16: node 'itc' (objective.itc): input 'vision' expects VisionTower, got TextTower from 'text'"),
    ("duplicate_node", ("  retrieval:\n", "  text:\n    kind: encoder.text\n  retrieval:\n"), (),
     "vlpgraph: G:21: duplicate key 'text' (first given on line 10)"),
    ("empty_file", None, (), "vlpgraph: G: the file is empty (a graph needs at least 'graph:' and 'nodes:')"),
    ("sweep_unknown_param", ("grid: {shapes.train_fraction:", "grid: {shapes.train_fractoin:"), (),
     "vlpgraph: G:25: node 'shapes' (dataset.shapes): unknown param 'train_fractoin' (did you mean 'train_fraction'?)"),
    ("sweep_unknown_node", ("grid: {shapes.train_fraction:", "grid: {shape.train_fraction:"), (),
     "vlpgraph: G:25: sweep grid 'shape.train_fraction': no node 'shape' (did you mean 'shapes'?)"),
    ("sweep_value_out_of_range", ("[0.5, 1.0]", "[0.5, 1.5]"), (),
     "vlpgraph: G:25: node 'shapes' (dataset.shapes): param 'train_fraction': input should be less than or equal to 1 (got 1.5)"),
    ("unknown_profile", None, ("--profile", "gpux"), "vlpgraph: G:27: unknown profile 'gpux' (did you mean 'gpu'?) (profiles: gpu)"),
    ("unknown_top_key", ("nodes:\n", "node:\n"), (), "vlpgraph: G:3: unknown key 'node' (did you mean 'nodes'?)"),
    ("missing_input", ("inputs: {vision: vision, text: text}", "inputs: {vision: vision}"), (),
     "vlpgraph: G:16: node 'itc' (objective.itc): missing input 'text' (TextTower)"),
    ("list_for_single_input", ("inputs: {data: shapes}\n    params: {width", "inputs: {data: [shapes, shapes]}\n    params: {width"), (),
     "vlpgraph: G:12: node 'text' (encoder.text): input 'data' takes one node name, got a list"),
    ("unknown_input", ("inputs: {model: train, data: shapes}", "inputs: {model: train, dataset: shapes}"), (),
     "vlpgraph: G:23: node 'retrieval' (evaluator.retrieval): unknown input 'dataset' (did you mean 'data'?) (inputs of evaluator.retrieval: model, data)"),
    ("bad_node_name", ("  vision:\n", "  Vision:\n"), (),
     "vlpgraph: G:7: bad node name 'Vision': use lower case letters, digits and _, starting with a letter"),
    ("set_unknown_param", None, ("--set", "train.epoch=2"),
     "vlpgraph: --set train.epoch: node 'train' (trainer): unknown param 'epoch' (did you mean 'epochs'?)"),
    ("no_trainer", ("    kind: trainer\n", "    kind: trainer_x\n"), (),
     "vlpgraph: G:18: node 'train': unknown kind 'trainer_x' (did you mean 'trainer'?)"),
    ("cross_field", ("params: {epochs: 1, batch_size: 16}", "params: {epochs: 1, batch_size: 16, max_steps: 5, warmup_steps: 10}"), (),
     "vlpgraph: G:20: node 'train' (trainer): warmup_steps (10) is longer than max_steps (5)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_graph(case, capsys, tmp_path):
    cid, edit, extra, expected = case
    if cid == "empty_file":
        text = ""
    elif edit is None:
        text = GOOD
    else:
        assert edit[0] in GOOD, f"test edit for {cid} does not apply"
        text = GOOD.replace(edit[0], edit[1], 1)
    rc, lines = errors_of(capsys, tmp_path, text, *extra)
    assert rc == 2
    assert expected in lines, "\n".join(lines)
    assert not any("Traceback" in ln for ln in lines)


def test_cycle_is_reported_with_the_loop(capsys, tmp_path):
    text = GOOD.replace("params: {image_size: 32, patch_size: 8", "inputs: {data: train}\n    params: {image_size: 32, patch_size: 8")
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert "vlpgraph: G: cycle: vision -> itc -> train -> vision" in lines, lines


def test_capability_mismatch(capsys, tmp_path):
    nodes_extra = "  zs:\n    kind: evaluator.zeroshot\n    inputs: {model: train, data: coco}\n  coco:\n    kind: dataset.captions\n    params: {annotations: a.jsonl, images: .}\n"
    text = GOOD.replace("sweep:\n", nodes_extra + "sweep:\n")
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert "vlpgraph: G:26: node 'zs' (evaluator.zeroshot): input 'data' needs data with classes, which 'coco' (dataset.captions) does not provide" in lines, lines


def test_file_not_found(capsys, tmp_path):
    rc = main(["validate", str(tmp_path / "nope.yaml")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"vlpgraph: {tmp_path / 'nope.yaml'}: file not found"


def test_all_problems_reported_at_once(capsys, tmp_path):
    text = (GOOD.replace("{epochs: 1, batch_size: 16}", "{epoch: 1, batch_size: 16}")
            .replace("kind: encoder.vit", "kind: encoder.vitt")
            .replace("caption_noise: 0.2", "caption_noise: 1.5"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert len(lines) == 3, lines
    assert sorted(int(ln.split(":")[2]) for ln in lines) == [6, 8, 20]


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "g.yaml").write_text(GOOD.replace("kind: encoder.vit", "kind: encoder.vitt"))
    from vlpgraph.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "validate", str(tmp_path / "g.yaml")])


def test_bad_cli_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2


def test_profile_may_tune_a_node_only_some_variants_have(capsys, tmp_path):
    text = GOOD.replace("  seeds: [0, 1]\n", "  seeds: [0, 1]\n  variants:\n    base: {}\n    zs:\n      nodes:\n        zs: {kind: evaluator.zeroshot, inputs: {model: train, data: shapes}}\n")
    text = text.replace("gpu: {vision.width: 64}", "gpu: {vision.width: 64, zs.batch_size: 8}")
    (tmp_path / "g.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "g.yaml"), "--profile", "gpu"]) == 0
    bad = text.replace("zs.batch_size: 8", "zz.batch_size: 8")
    rc, lines = errors_of(capsys, tmp_path, bad, "--profile", "gpu")
    assert rc == 2 and any("no node 'zz'" in ln for ln in lines), lines
