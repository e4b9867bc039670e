"""What an encoder reads is part of its identity: a pretrained checkpoint or tokenizer file replaced
at the same path is a new trial (and `vlpgraph run` says so), the same files reached from another
folder are the same trial, and relative paths follow the graph file. And every cross-param problem
of a node is reported at once, each at its param's line."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import build_ctx, itc, shapes, text, tiny_graph, trainer, vit
from vlpgraph.engine import registry
from vlpgraph.layers import tokenizer as tokmod
from vlpgraph.cli import main
from vlpgraph.store import Store

VIT = {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2}
TEXT = {"width": 16, "depth": 1, "heads": 2, "max_len": 12}

GRAPH = tiny_graph(graph="enc", nodes={
    "shapes": shapes(train_size=32, test_size=16, image_size=16),
    "vision": vit(**VIT, pretrained="ckpt/vit.safetensors"),
    "text": text(**TEXT, tokenizer="ckpt/tokenizer.json", pretrained="ckpt/bert.safetensors"), "itc": itc(embed_dim=16),
    "train": trainer("itc", warmup_steps=1, checkpoint_every=0)})

CAPTIONS = ["a red circle left of a blue square", "a green star above a yellow triangle", "a purple circle"]


def write_vit(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A tiny ViT's random weights (seeded) as safetensors; returns them."""
    kind = registry.get("encoder.vit")
    torch.manual_seed(seed)
    tower = kind.build(kind.params(**VIT), {}, build_ctx("enc", cache=path.parent / "cache", base_dir=path.parent))
    sd = {k: t.contiguous() for k, t in tower.state_dict().items()}
    save_file(sd, str(path))
    return sd


def write_bert(path: Path, tokenizer: Path, seed: int) -> dict[str, torch.Tensor]:
    kind = registry.get("encoder.text")
    torch.manual_seed(seed)
    ctx = build_ctx("enc", cache=path.parent / "cache", base_dir=path.parent)
    tower = kind.build(kind.params(tokenizer=str(tokenizer), **TEXT), {}, ctx)
    sd = {k: t.contiguous() for k, t in tower.state_dict().items()}
    save_file(sd, str(path))
    return sd


@pytest.fixture
def project(tmp_path):
    """proj/g.yaml naming proj/ckpt/{vit.safetensors, tokenizer.json, bert.safetensors} by relative paths."""
    ckpt = tmp_path / "proj" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "tokenizer.json").write_text(tokmod.train_wordpiece(CAPTIONS, 64).to_str())
    write_vit(ckpt / "vit.safetensors", seed=1)
    write_bert(ckpt / "bert.safetensors", ckpt / "tokenizer.json", seed=2)
    (tmp_path / "proj" / "g.yaml").write_text(GRAPH)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "proj"


def run_ids(capsys, graph: Path) -> list[str]:
    assert main(["run", str(graph), "--dry-run"]) == 0
    ids = re.findall(r"run_id=(\S+)", capsys.readouterr().out)
    assert ids
    return ids


def replace_keeping_size_and_mtime(path: Path, write) -> None:
    """Replace ``path``'s content by ``write(path)``; the new file has the old one's size and mtime,
    so only its content tells them apart."""
    st = path.stat()
    write(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("name", ["vit.safetensors", "bert.safetensors", "tokenizer.json"])
def test_a_file_replaced_at_the_same_path_is_a_new_trial(project, capsys, monkeypatch, name):
    monkeypatch.chdir(project.parent / "elsewhere")
    before = run_ids(capsys, project / "g.yaml")
    ckpt = project / "ckpt"
    if name == "vit.safetensors":
        replace_keeping_size_and_mtime(ckpt / name, lambda p: write_vit(p, seed=3))
    elif name == "bert.safetensors":
        replace_keeping_size_and_mtime(ckpt / name, lambda p: write_bert(p, ckpt / "tokenizer.json", seed=4))
    else:  # one letter of a token changed: same size, another vocabulary
        text = (ckpt / name).read_text()
        assert '"circle"' in text
        replace_keeping_size_and_mtime(ckpt / name, lambda p: p.write_text(text.replace('"circle"', '"cirkle"')))
    assert run_ids(capsys, project / "g.yaml") != before


def test_the_same_files_from_another_folder_are_the_same_trial(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "elsewhere")
    here = run_ids(capsys, project / "g.yaml")
    monkeypatch.chdir(project)
    assert run_ids(capsys, Path("g.yaml")) == here
    # a plain copy (new mtimes, as on another machine) holds the same bytes: the same trial
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, copy_function=shutil.copyfile)
    assert (copy / "ckpt" / "vit.safetensors").stat().st_mtime_ns != (project / "ckpt" / "vit.safetensors").stat().st_mtime_ns
    assert run_ids(capsys, copy / "g.yaml") == here
    # a graph without pretrained files keeps the hash it had before files were fingerprinted
    registry.load_builtin_kinds()
    assert registry.get("encoder.vit").fingerprint(registry.get("encoder.vit").params(**VIT), project) is None


def test_relative_paths_are_read_from_the_graph_files_folder(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    vit_sd = write_vit(project / "ckpt" / "vit.safetensors", seed=5)
    bert_sd = write_bert(project / "ckpt" / "bert.safetensors", project / "ckpt" / "tokenizer.json", seed=6)
    vit, text = registry.get("encoder.vit"), registry.get("encoder.text")
    torch.manual_seed(0)
    ctx = build_ctx("enc", cache=tmp_path / "cache", base_dir=project)
    v = vit.build(vit.params(pretrained="ckpt/vit.safetensors", **VIT), {}, ctx)
    assert all(torch.equal(v.state_dict()[k], t) for k, t in vit_sd.items())
    t = text.build(text.params(tokenizer="ckpt/tokenizer.json", pretrained="ckpt/bert.safetensors", **TEXT), {},
                   build_ctx("enc", cache=tmp_path / "cache", base_dir=project))
    assert all(torch.equal(t.state_dict()[k], w) for k, w in bert_sd.items())
    assert t.tokenizer.vocab_size == tokmod.train_wordpiece(CAPTIONS, 64).get_vocab_size()


@pytest.mark.integration
def test_a_replaced_checkpoint_trains_again_and_says_so(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths follow the graph file, not the shell
    store, graph = tmp_path / "store", project / "g.yaml"
    assert main(["run", str(graph), "--store", str(store)]) == 0
    capsys.readouterr()
    [first] = Store(store).runs()
    assert first["status"] == "completed"
    write_vit(project / "ckpt" / "vit.safetensors", seed=7)
    assert main(["run", str(graph), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert (f"node 'vision' (encoder.vit): pretrained changed since run {first['run_id']}; "
            "its trials train again") in err, err
    runs = Store(store).runs()
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs)


# ---------------------------------------------------------------------- every problem of a node


# params one a line, so that each problem is reported at its own line
PROBLEMS = tiny_graph(graph="p", nodes={"shapes": shapes(), "vision": vit()}) + """\
  text:
    kind: encoder.text
    inputs: {data: shapes}
    params:
      width: 32
      depth: 1
      heads: 2
  fusion:
    kind: encoder.fusion
    inputs: {text: text, vision: vision}
    params:
      depth: 1
      heads: 2
  itc:
    kind: objective.itc
    inputs: {vision: vision, text: text, mixer: mix}
    params: {embed_dim: 32}
  itm:
    kind: objective.itm
    inputs: {fusion: fusion, itc: itc}
  mlm:
    kind: objective.mlm
    inputs: {fusion: fusion}
    params:
      replace_mask: 0.8
      replace_random: 0.1
  tpp:
    kind: head.tpp
    inputs: {vision: vision, text: text}
  pta:
    kind: objective.pta
    inputs: {tpp: tpp, data: shapes}
  mix:
    kind: mixer.timix
    inputs: {scorer: tpp}
    params:
      min_ratio: 0.35
      max_ratio: 0.75
  train:
    kind: trainer
    inputs: {data: shapes, objectives: [pta, itc, itm, mlm]}
    params: {epochs: 1, batch_size: 16}
"""


def errors_of(capsys, tmp_path, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    rc = main(["validate", str(path)])
    return rc, [ln.replace(str(path), "G") for ln in capsys.readouterr().err.strip().splitlines()]


def edited(*edits: tuple[str, str]) -> str:
    text = PROBLEMS
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def line_of(text: str, line: str) -> int:
    """1-based number of the line of ``text`` that equals ``line``."""
    return text.splitlines().index(line) + 1


def test_two_problems_of_the_text_encoder_are_reported_together(capsys, tmp_path):
    (tmp_path / "tok.json").write_text(tokmod.train_wordpiece(CAPTIONS, 64).to_str())
    text = edited(("      width: 32\n      depth: 1\n      heads: 2\n",
                   "      width: 30\n      depth: 1\n      heads: 4\n      tokenizer: tok.json\n      vocab_size: 500\n"))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == [
        f"vlpgraph: G:{line_of(text, '      width: 30')}: node 'text' (encoder.text): width (30) must be divisible by heads (4)",
        f"vlpgraph: G:{line_of(text, '      vocab_size: 500')}: node 'text' (encoder.text): vocab_size (500) caps the "
        "WordPiece trained on the data, but tokenizer (tok.json) is given: it would have no effect (leave one of them out)",
    ], lines


@pytest.mark.parametrize("old, new, param, message", [
    ("      replace_random: 0.1", "      replace_random: 0.3", "      replace_random: 0.3",
     "node 'mlm' (objective.mlm): replace_mask + replace_random (0.8 + 0.3) exceeds 1"),
    ("      min_ratio: 0.35", "      min_ratio: 0.8", "      min_ratio: 0.8",
     "node 'mix' (mixer.timix): min_ratio (0.8) is larger than max_ratio (0.75)"),
    # the fusion's heads against the text tower's width, before anything is built
    ("      depth: 1\n      heads: 2\n  itc:", "      depth: 1\n      heads: 3\n  itc:", "      heads: 3",
     "node 'fusion' (encoder.fusion): heads (3) must divide the width (32) of its text tower 'text'"),
])
def test_a_cross_param_problem_is_reported_at_its_params_line(capsys, tmp_path, old, new, param, message):
    assert errors_of(capsys, tmp_path, PROBLEMS) == (0, [])  # the graph as written is valid
    text = edited((old, new))
    rc, lines = errors_of(capsys, tmp_path, text)
    assert rc == 2
    assert lines == [f"vlpgraph: G:{line_of(text, param)}: {message}"], lines
