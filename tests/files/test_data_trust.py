"""Data you can trust: an edited manifest trains again (and says so), relative paths follow the graph
file, images of every mode keep their range, empty captions are counted, degenerate retrieval ks are
refused or flagged."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import build_ctx, evaluator, itc, node, text, tiny_graph, trainer, vit
import vlpgraph.nodes.datasets.captions as captions_mod
import vlpgraph.nodes.evaluators.retrieval as retrieval_mod
from vlpgraph.cli import main
from vlpgraph.errors import UserError
from vlpgraph.store import Store

GRAPH = tiny_graph(graph="caps", nodes={
    "coco": node("dataset.captions", annotations="data/m.jsonl", test_size=8, image_size=16),
    "vision": vit("coco", width=16), "text": text("coco", width=16, max_len=12), "itc": itc(embed_dim=16),
    "train": trainer("itc", data="coco", batch_size=4, warmup_steps=1, checkpoint_every=0),
    "retrieval": evaluator("retrieval", data="coco", ks=[1, 2])})

COLOURS = ["red", "green", "blue", "white", "black", "grey"]


def write_manifest(path: Path, n: int, word: str = "a") -> None:
    path.write_text("".join(json.dumps({"image": f"imgs/{i:02d}.png", "caption": f"{word} {COLOURS[i % 6]} square {i}"}) + "\n"
                            for i in range(n)))


@pytest.fixture
def project(tmp_path):
    """proj/g.yaml reading proj/data/m.jsonl (32 rows, one 20 x 20 PNG each) by a relative path."""
    data = tmp_path / "proj" / "data"
    (data / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / "imgs" / f"{i:02d}.png")
    write_manifest(data / "m.jsonl", 32)
    (tmp_path / "proj" / "g.yaml").write_text(GRAPH)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "proj"


def run_ids(capsys, graph: Path) -> list[str]:
    assert main(["run", str(graph), "--dry-run"]) == 0
    return re.findall(r"run_id=(\S+)", capsys.readouterr().out)


@pytest.mark.integration
def test_edited_manifest_trains_again_and_says_so(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths follow the graph file, not the shell
    store = tmp_path / "store"
    graph = project / "g.yaml"
    assert main(["run", str(graph), "--store", str(store)]) == 0
    capsys.readouterr()
    [first] = Store(store).runs()
    assert first["status"] == "completed"

    assert main(["run", str(graph), "--store", str(store)]) == 0  # unchanged: skipped
    err = capsys.readouterr().err
    assert f"already completed ({first['run_id']}), skipped" in err and "changed since" not in err

    write_manifest(project / "data" / "m.jsonl", 20, word="the")  # fewer rows, new captions
    assert main(["run", str(graph), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert (f"node 'coco' (dataset.captions): annotations, images changed since run {first['run_id']} "
            f"(rows 32 -> 20, n_images 32 -> 20); its trials train again") in err, err
    assert "skipped" not in err
    runs = {r["run_id"]: r for r in Store(store).runs()}
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs.values())
    [second] = [r for r in runs if r != first["run_id"]]
    doc = json.loads(runs[second]["params"])
    assert doc["data"]["coco"]["rows"] == 20 and doc["nodes"]["coco"]["params"]["annotations"] == "data/m.jsonl"

    assert main(["run", str(graph), "--store", str(store)]) == 0  # announced once, then skipped
    err = capsys.readouterr().err
    assert "changed since" not in err and f"already completed ({second}), skipped" in err


def test_images_replaced_is_new_data(project, capsys, monkeypatch):
    monkeypatch.chdir(project.parent / "elsewhere")
    before = run_ids(capsys, project / "g.yaml")
    Image.new("RGB", (24, 24), (1, 2, 3)).save(project / "data" / "imgs" / "05.png")  # same name, new content
    assert run_ids(capsys, project / "g.yaml") != before


def test_same_data_from_another_folder_is_the_same_trial(project, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "elsewhere")
    here = run_ids(capsys, project / "g.yaml")
    monkeypatch.chdir(project)
    assert run_ids(capsys, Path("g.yaml")) == here
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)  # copytree keeps mtimes: the same files are the same data
    assert run_ids(capsys, copy / "g.yaml") == here


def test_annotations_directory_is_named_as_such(tmp_path):
    ctx = build_ctx("coco", cache=tmp_path / "cache")
    with pytest.raises(UserError) as e:
        captions_mod.build(captions_mod.CaptionsParams(annotations=str(tmp_path)), {}, ctx)
    assert str(e.value) == f"{tmp_path}: is a directory, expected an annotations file (.json, .jsonl or .csv)"


def test_ks_refused_against_the_manifest_size(project, capsys, monkeypatch):
    monkeypatch.chdir(project.parent / "elsewhere")
    (project / "g.yaml").write_text(GRAPH.replace("ks: [1, 2]", "ks: [1, 8]"))
    assert main(["validate", str(project / "g.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlpgraph: {project / 'g.yaml'}:26: node 'retrieval' (evaluator.retrieval): ks [8] reach the size "
                   "of the test split searched ('coco' has at most 8 samples): R@k is 1 for any model once k >= the "
                   "number of pairs (use smaller ks, or a larger test split)"], err


# ------------------------------------------------------------------------------- retrieval ks


class _Data:
    def __init__(self, n):
        self.test = list(range(n))


def test_retrieval_refuses_ks_at_build_and_warns_when_degenerate():
    logs: list[str] = []
    ctx = build_ctx("ev", log=logs)
    with pytest.raises(UserError) as e:
        retrieval_mod.build(retrieval_mod.RetrievalParams(ks=[1, 8, 500]), {"data": _Data(8)}, ctx)
    assert str(e.value) == ("node 'ev' (evaluator.retrieval): ks [8, 500] reach the size of the test split searched "
                            "(8 pairs): R@k is 1 for any model once k >= the number of pairs (use smaller ks, or a "
                            "larger test split)")
    retrieval_mod.build(retrieval_mod.RetrievalParams(ks=[1, 5, 7]), {"data": _Data(8)}, ctx)
    assert logs == ["warning: node 'ev' (evaluator.retrieval): on 8 test pairs, recall at k >= n/2 says little "
                    "(chance level: R@5 0.62, R@7 0.88); rsum is inflated by it"]
    logs.clear()
    retrieval_mod.build(retrieval_mod.RetrievalParams(ks=[1, 5, 10]), {"data": _Data(64)}, ctx)
    assert logs == []


# --------------------------------------------------------------------------------- image modes


def test_16bit_png_loads_with_its_real_range(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) through dataset.captions: 8-bit values = round(v / 257), not
    clipped to 255 as convert("RGB") does."""
    (tmp_path / "imgs").mkdir()
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    for i in range(4):
        Image.fromarray(ramp).save(tmp_path / "imgs" / f"{i}.png")
    assert Image.open(tmp_path / "imgs" / "0.png").mode == "I;16"
    write = "".join(json.dumps({"image": f"imgs/{i}.png", "caption": f"ramp {i}"}) + "\n" for i in range(4))
    (tmp_path / "m.jsonl").write_text(write)
    ctx = build_ctx("coco", cache=tmp_path / "cache")
    d = captions_mod.build(captions_mod.CaptionsParams(annotations=str(tmp_path / "m.jsonl"), test_size=1,
                                                       image_size=16), {}, ctx)
    img = d.test[0]["image"]  # [3, 16, 16] normalised; resize and crop to 16 px change nothing
    mean, std = torch.tensor(captions_mod.MEAN).view(3, 1, 1), torch.tensor(captions_mod.STD).view(3, 1, 1)
    pixels = ((img * std + mean) * 255).round()
    expected = torch.from_numpy(np.rint(ramp / 257.0)).float()
    assert torch.equal(pixels, expected.expand(3, 16, 16))
    assert pixels.min() == 0 and pixels.max() == 255 and (pixels == 255).float().mean() < 0.01


def _grey(im: Image.Image) -> np.ndarray:
    out = np.asarray(captions_mod.to_rgb(im))
    assert out.dtype == np.uint8 and out.shape[-1] == 3
    return out[..., 0].astype(int)


def test_to_rgb_scales_every_high_bit_depth_mode():
    v16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert _grey(Image.fromarray(v16)).tolist() == [[0, 1, 128, 255]]  # I;16
    assert _grey(Image.fromarray(v16.astype(np.int32))).tolist() == [[0, 1, 128, 255]]  # I holding 16-bit values
    assert _grey(Image.fromarray(np.array([[0, 10, 255]], dtype=np.int32))).tolist() == [[0, 10, 255]]  # I, 8-bit values
    assert _grey(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))).tolist() == [[0, 128, 255]]  # F in [0, 1]
    assert _grey(Image.fromarray(np.array([[-3.0, 100.0, 300.0]], dtype=np.float32))).tolist() == [[0, 100, 255]]  # F, 0..255


def test_to_rgb_composites_transparency_onto_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8), mode="LA")
    assert _grey(la).tolist() == [[255, 0, 177]]  # transparent -> white, opaque black stays, half-transparent blends
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(captions_mod.to_rgb(pal)).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(captions_mod.to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]


# -------------------------------------------------------------------------------- empty captions


def test_empty_captions_are_counted_and_skipped(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(40):
        Image.new("RGB", (16, 16), (i, i, i)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": {3: "", 8: "   "}.get(i, f"caption {i}")})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs: list[str] = []
    ctx = build_ctx("coco", cache=tmp_path / "cache", log=logs)
    params = dict(annotations=str(tmp_path / "m.jsonl"), test_size=4, image_size=16)
    d = captions_mod.build(captions_mod.CaptionsParams(**params, max_bad_fraction=0.05), {}, ctx)
    assert logs == [f"warning: {tmp_path / 'm.jsonl'}: skipped 2 of 40 samples whose caption is empty: line 4, line 9"]
    assert len(d.train) + len(d.test) == 38 and all(c.strip() for c in d.train.captions + d.test.captions)
    with pytest.raises(UserError) as e:
        captions_mod.build(captions_mod.CaptionsParams(**params, max_bad_fraction=0.0), {}, ctx)
    assert str(e.value) == (f"{tmp_path / 'm.jsonl'}: 2 of 40 captions are empty, more than max_bad_fraction=0.0: "
                            "line 4, line 9")
