"""dataset.interleaved on WebDataset shards (issue 12, item 2): documents packed by `vlpgraph data pack`
read back as the .jsonl and folder they came from (texts, images bit for bit, placements, splits), bad
image members skipped and counted as a folder's, the params' either/or, the identity, and training."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.helpers import build_ctx, lcl_nodes, node, tiny_graph, trainer
import vlpgraph.nodes.datasets.interleaved as inter_mod
from vlpgraph.engine import registry
from vlpgraph.files import shards
from vlpgraph.cli import main
from vlpgraph.errors import UserError
from vlpgraph.store import Store

PATTERN = "sh/shard-{000000..000002}.tar"  # 8 documents packed 3 to a shard


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # runs are compared bit for bit


def write_docs(root: Path, bad: bool = True) -> Path:
    """8 documents of 3 sentences and 2 images (image k of document d: d{d}_k.png matched to sentence
    2k; document 1 has one image), in docs.jsonl with a blank first line and a blank line after the
    third document (so a document's line is not its position), + test.jsonl (one document of 2
    images). With ``bad``: d0_0.png missing, d0_1.png corrupt, d1_0.png missing (documents 0 and 1
    are left without an image)."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [""]
    for d in range(8):
        info = [{"image_name": f"d{d}_{k}.png", "matched_text_index": 2 * k} for k in range(2 if d != 1 else 1)]
        lines.append(json.dumps({"text_list": [f"doc {d} sentence {k}" for k in range(3)], "image_info": info,
                                 "url": f"http://x/{d}"}))
        lines += [""] if d == 2 else []
        for k in range(len(info)):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(imgs / f"d{d}_{k}.png")
    if bad:
        (imgs / "d0_0.png").unlink()
        (imgs / "d1_0.png").unlink()
        (imgs / "d0_1.png").write_bytes(b"not a png at all")
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    test_info = [{"image_name": f"d{d}_{k}.png", "matched_text_index": k} for d, k in ((5, 0), (6, 1))]
    test_doc = {"text_list": ["a test sentence", "another"], "image_info": test_info}
    (root / "test.jsonl").write_text(json.dumps(test_doc) + "\n")
    return root


def pack(root: Path, source: str = "docs.jsonl", out: str = "sh", shard_size: int = 3) -> shards.Packed:
    return shards.pack(root / source, root / out, shard_size=shard_size, images=root / "imgs", log=lambda m: None)


def build(root: Path, logs: list | None = None, **params):
    ctx = build_ctx("docs", cache=root / "cache", base_dir=root, log=logs)
    return inter_mod.build(inter_mod.InterleavedParams(image_size=16, **params), {}, ctx)


def same_items(a, b, n: int) -> None:
    """Items 0..n-1 of two datasets are equal: every key, tensors bit for bit (the training crop and
    flip draw from the global generator, seeded alike for both)."""
    for i in range(n):
        torch.manual_seed(i)
        x = a[i]
        torch.manual_seed(i)
        y = b[i]
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), (i, key)
            else:
                assert x[key] == y[key], (i, key)


@pytest.mark.parametrize("split", [dict(test_size=2), dict(test_file=True, train_fraction=0.5)])
def test_shards_give_the_jsonl_documents(tmp_path, split):
    """Packed into 3 shards, the documents (texts, images, placement layouts, image ids), the training
    pairs, the test pairs and test documents are those of the .jsonl + folder, and the three bad images
    are skipped with the folder's warning."""
    root = write_docs(tmp_path)
    assert pack(root).pattern == str(root / PATTERN)
    common = dict(max_bad_fraction=0.25, data_seed=3, train_fraction=split.get("train_fraction", 1.0),
                  test_size=split.get("test_size", 20))
    if split.get("test_file"):
        pack(root, "test.jsonl", "test_sh", shard_size=10)
        folder_split, shard_split = dict(test_annotations="test.jsonl"), dict(test_shards="test_sh/shard-000000.tar")
    else:
        folder_split = shard_split = {}
    folder_logs: list[str] = []
    shard_logs: list[str] = []
    folder = build(root, folder_logs, annotations="docs.jsonl", images="imgs", **common, **folder_split)
    sharded = build(root, shard_logs, shards=PATTERN, **common, **shard_split)

    tail = lambda line: line.split(": ", 2)[2]  # after "warning: <source>: "
    skipped = [m for m in shard_logs if "skipped" in m]
    assert len(skipped) == 1 and tail(skipped[0]) == tail(next(m for m in folder_logs if "skipped" in m))
    assert "skipped 3 of 15 images: d0_0.png (missing), d0_1.png (unreadable" in skipped[0]
    assert "dropped 2 of 8 documents" in " ".join(shard_logs)

    n_train = 3 if split.get("test_file") else 4  # 6 usable documents: half of them, or all but the last 2
    assert len(folder.train) == len(sharded.train) == n_train
    same_items(folder.train, sharded.train, n_train)
    for name in ("train_pairs", "test", "test_documents"):
        a, b = getattr(folder, name), getattr(sharded, name)
        assert len(a) == len(b) > 0
        same_items(a, b, len(a))
    assert folder.train_captions() == sharded.train_captions()
    assert [folder.test[i]["caption"] for i in range(len(folder.test))] == (
        ["a test sentence", "another"] if split.get("test_file") else
        ["doc 6 sentence 0", "doc 6 sentence 2", "doc 7 sentence 0", "doc 7 sentence 2"])


def test_a_document_keeps_its_jsonl_line_so_its_placement(tmp_path):
    """The placement draw is keyed by the document's line in the .jsonl: pack records it, the shard
    reader returns it (not the document's position, which differs after a blank line), so every layout
    matches; shards without the line member (other tools) number documents by position."""
    root = write_docs(tmp_path, bad=False)
    pack(root)
    from_jsonl = inter_mod.read_documents(root / "docs.jsonl", root / "imgs")
    from_shards, problems, source = shards.read_shard_documents(PATTERN, root)
    assert not problems and source == root / PATTERN
    lines = [d.line for d in from_jsonl]
    assert [d.line for d in from_shards] == lines == [2, 3, 4, 6, 7, 8, 9, 10]
    assert [d.texts for d in from_shards] == [d.texts for d in from_jsonl]
    assert [[(p.name, k) for p, k in d.images] for d in from_shards] == [
        [(p.name, k) for p, k in d.images] for d in from_jsonl]
    for a, b in zip(from_jsonl, from_shards):
        x, y = inter_mod.arrange(a, 5, 0.5, 6), inter_mod.arrange(b, 5, 0.5, 6)
        assert x.layout == y.layout and x.texts == y.texts and x.matched == y.matched
        assert [m.read() for m in y.images] == [p.read_bytes() for p in x.images]
    # without the .line members: the 1-based position (the line of a .jsonl without blank lines)
    for k in range(3):
        path = root / "sh" / f"shard-{k:06d}.tar"
        rewrite_members(path, lambda name: name.endswith(".line"), None)
    docs, _, _ = shards.read_shard_documents(PATTERN, root)
    assert [d.line for d in docs] == list(range(1, 9))


def rewrite_members(shard: Path, which, data: bytes | None) -> None:
    """Rewrites ``shard`` with the members ``which(name)`` picks replaced by ``data`` (None: left out)."""
    with tarfile.open(shard) as tar:
        files = [(info, tar.extractfile(info).read()) for info in tar if info.isreg()]
    with tarfile.open(shard, "w") as tar:
        for info, content in files:
            if which(info.name):
                if data is None:
                    continue
                content, info.size = data, len(data)
            tar.addfile(info, io.BytesIO(content))


def test_a_corrupt_member_is_skipped_and_counted_as_in_the_folder(tmp_path):
    """Clean documents packed, then one image member corrupted and another left out: both images are
    skipped and counted with the warning the folder gives for the same damage (a corrupt file, a
    missing file); past max_bad_fraction the folder's error, word for word after the source."""
    root = write_docs(tmp_path, bad=False)
    pack(root)
    clean_logs: list[str] = []
    clean = build(root, clean_logs, shards=PATTERN, test_size=2)
    assert not clean_logs and len(clean.train) == 6
    # document 3 (key 000000003, in shard 1): image 1 corrupt; document 4: image 0 gone
    rewrite_members(root / "sh" / "shard-000001.tar", lambda name: name == "000000003.1.png", b"no image here")
    rewrite_members(root / "sh" / "shard-000001.tar", lambda name: name == "000000004.0.png", None)
    (root / "imgs" / "d3_1.png").write_bytes(b"no image here")
    (root / "imgs" / "d4_0.png").unlink()
    shard_logs: list[str] = []
    folder_logs: list[str] = []
    sharded = build(root, shard_logs, shards=PATTERN, test_size=2, max_bad_fraction=0.2)
    folder = build(root, folder_logs, annotations="docs.jsonl", images="imgs", test_size=2, max_bad_fraction=0.2)
    named = "d3_1.png (unreadable: UnidentifiedImageError), d4_0.png (missing)"
    assert shard_logs == [f"warning: {root / PATTERN}: skipped 2 of 15 images: {named}"]
    assert folder_logs == [f"warning: {root / 'docs.jsonl'}: skipped 2 of 15 images: {named}"]
    # both documents keep their other image; the damaged images are in no item
    assert len(sharded.train) == 6 and [len(sharded.train[d]["images"]) for d in range(6)] == [2, 1, 2, 1, 1, 2]
    same_items(folder.train, sharded.train, 6)
    with pytest.raises(UserError) as e:
        build(root, shards=PATTERN, test_size=2, max_bad_fraction=0.1)
    with pytest.raises(UserError) as e_folder:
        build(root, annotations="docs.jsonl", images="imgs", test_size=2, max_bad_fraction=0.1)
    assert str(e.value) == (f"{root / PATTERN}: 2 of 15 images are missing or unreadable, more than "
                            f"max_bad_fraction=0.1: {named}")
    assert str(e.value).split(": ", 1)[1] == str(e_folder.value).split(": ", 1)[1]


@pytest.mark.parametrize("params, field, says", [
    (dict(annotations="docs.jsonl", shards="s.tar"), "annotations", "not both"),
    (dict(), "annotations", "not neither"),
    (dict(shards="s.tar", images="imgs"), "images", "is for annotations"),
    (dict(shards="s.tar", test_annotations="t.jsonl"), "test_annotations", "is for annotations"),
    (dict(annotations="docs.jsonl", test_shards="t.tar"), "test_shards", "needs shards"),
])
def test_params_either_annotations_or_shards(params, field, says):
    with pytest.raises(ValidationError) as e:
        inter_mod.InterleavedParams(**params)
    (error,) = e.value.errors()
    assert error["loc"] == (field,) and says in error["msg"]
    inter_mod.InterleavedParams(shards="s.tar", test_shards="t.tar")
    inter_mod.InterleavedParams(annotations="docs.jsonl", images="imgs", test_annotations="t.jsonl")


def test_validation_names_a_missing_source_at_the_param(tmp_path, capsys):
    path = lcl_graph(tmp_path, "g.yaml", test_size=2)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "docs" in err and "annotations" in err and "not neither" in err and "Traceback" not in err, err


def test_identity_covers_the_shards_and_facts_count_documents(tmp_path):
    """A rewritten shard is a new node hash; facts count the documents from the tar headers; the
    catalog shows the new params."""
    root = write_docs(tmp_path, bad=False)
    pack(root)
    kind = registry.get("dataset.interleaved")
    p = kind.params(shards=PATTERN, test_size=2)
    before = kind.fingerprint(p, root)
    assert before["n_shards"] == 3 and kind.facts(p, root) == {"image_size": 224, "train_size": 6, "at_most": True}
    rewrite_members(root / "sh" / "shard-000002.tar", lambda name: name == "000000007.json",
                    json.dumps({"text_list": ["other"], "image_info": []}).encode())
    assert kind.fingerprint(p, root)["shards"] != before["shards"]
    assert kind.fingerprint(kind.params(shards="sh/nope.tar"), root) == {"shards": "missing"}
    with_test = kind.params(shards=PATTERN, test_shards="sh/shard-000000.tar")
    assert kind.fingerprint(with_test, root)["test_n_shards"] == 1
    assert kind.facts(with_test, root)["train_size"] == 8  # every document trains when test_shards is set


def test_catalog_shows_the_shard_params(capsys):
    assert main(["nodes", "dataset.interleaved"]) == 0
    shown = capsys.readouterr().out
    assert " shards " in shown and " test_shards " in shown and "WebDataset .tar shards of documents" in shown


# ------------------------------------------------------------------------------- training on shards


def lcl_graph(folder: Path, name: str, **docs) -> Path:
    """A tiny LCL graph (2 epochs in batches of 2) on the dataset.interleaved of params ``docs``."""
    data = node("dataset.interleaved", **docs, image_size=32, max_bad_fraction=0.25)
    train = trainer("lcl", data="docs", epochs=2, batch_size=2, warmup_steps=1, log_every=1)
    return tiny_graph(folder, name, graph="lcl_shards", nodes={"docs": data, **lcl_nodes("docs", 64), "train": train})



@pytest.mark.integration
def test_an_lcl_graph_trains_on_shards_as_on_the_jsonl(tmp_path):
    """`vlpgraph run` of a tiny LCL graph whose documents come from shards completes, and logs the
    losses of the same graph on the .jsonl + folder, step for step (same documents, same batches)."""
    root = write_docs(tmp_path)
    pack(root)
    losses = {}
    for name, data in (("jsonl", dict(annotations="docs.jsonl", images="imgs")),
                       ("shards", dict(shards=f"'{PATTERN}'"))):
        path = lcl_graph(root, f"{name}.yaml", **data, test_size=2)
        store = Store(root / f"store_{name}")
        assert main(["run", str(path), "--store", str(store.root)]) == 0
        (run,) = store.runs()
        assert run["status"] == "completed"
        losses[name] = {(m["name"], m["step"]): m["value"] for m in store.metrics(run["run_id"])
                        if m["name"] in ("loss", "lcl_gen", "lcl_con")}
    assert {name for name, _ in losses["shards"]} == {"loss", "lcl_gen", "lcl_con"}
    assert len([1 for name, _ in losses["shards"] if name == "loss"]) == 4  # 4 documents, batch 2, 2 epochs
    assert losses["shards"] == losses["jsonl"]
