"""WebDataset shards (issue 12, item 2): `vlpgraph data pack` writes them, dataset.captions reads them,
giving the folder's samples and batches, skipping and counting bad members, resuming mid-epoch."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.helpers import TINY_TRAIN, build_ctx, itc, node, text, tiny_graph, trainer, vit
from vlpgraph.engine import registry
from vlpgraph.files import shards
from vlpgraph.cli import main
from vlpgraph.engine.compile import compile_trial
from vlpgraph.errors import Interrupted, UserError
from vlpgraph.engine.sweep import load_experiment
from vlpgraph.execution.train import Checkpointer, Hooks, fit

import vlpgraph.nodes.datasets.captions as captions_mod


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # runs are compared bit for bit


def write_folder(root: Path, bad: bool = True) -> Path:
    """20 PNGs (40 x 30) with two captions each, in .jsonl / .csv / COCO .json manifests; with ``bad``
    img_03 is missing and img_07 is not a PNG (as in test_datasets.py)."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    rows = []
    for i in range(20):
        name = f"img_{i:02d}.png"
        if bad and i == 7:
            (imgs / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif not (bad and i == 3):
            Image.new("RGB", (40, 30), (10 * i, 255 - 10 * i, 128)).save(imgs / name)
        for c in range(2):
            boxes = [[0, 0, 20, 15], [30, 20, 40, 30]]
            rows.append({"image": name, "caption": f"picture {i} caption {c}", "boxes": boxes})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "boxes"])
        w.writeheader()
        w.writerows({**r, "boxes": json.dumps(r["boxes"])} for r in rows)
    names = list(dict.fromkeys(r["image"] for r in rows))
    coco = {"images": [{"id": 100 + k, "file_name": n} for k, n in enumerate(names)],
            "annotations": [{"id": j, "image_id": 100 + names.index(r["image"]), "caption": r["caption"],
                             "boxes": r["boxes"]} for j, r in enumerate(rows)]}
    (root / "m.json").write_text(json.dumps(coco))
    return root


def build(root: Path, logs: list | None = None, **params):
    ctx = build_ctx("caps", cache=root / "cache", base_dir=root, log=logs)
    return captions_mod.build(captions_mod.CaptionsParams(**params), {}, ctx)


def pack_cli(source: Path, out: Path, *args: str) -> str:
    """`vlpgraph data pack`, in process; its stdout line (the shards' pattern)."""
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        assert main(["data", "pack", str(source), "--out", str(out), *args]) == 0
    return buf.getvalue().strip()


COMMON = dict(max_bad_fraction=0.2, test_size=6, image_size=24, boxes=True)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_shards_give_the_folders_samples(tmp_path, fmt):
    """Packed into 3 shards of 16 samples, every item (image tensor, caption, boxes, sample id) of both
    splits is the folder's, and the two bad images are skipped with the same warning."""
    root = write_folder(tmp_path)
    pattern = pack_cli(root / f"m.{fmt}", root / "shards", "--shard-size", "16", "--images", str(root / "imgs"))
    assert pattern == str(root / "shards" / "shard-{000000..000002}.tar")
    folder_logs, shard_logs = [], []
    folder = build(root, folder_logs, annotations=f"m.{fmt}", images="imgs", **COMMON)
    sharded = build(root, shard_logs, shards="shards/shard-{000000..000002}.tar", **COMMON)
    tail = lambda line: line.split(": ", 2)[2]  # after "warning: <source>: "
    assert len(folder_logs) == len(shard_logs) == 1
    assert tail(shard_logs[0]) == tail(folder_logs[0])
    assert "skipped 2 of 20 images: img_03.png (missing), img_07.png (unreadable" in shard_logs[0]
    for split in ("train", "test"):
        a, b = getattr(folder, split), getattr(sharded, split)
        assert len(a) == len(b) and a.captions == b.captions
        for i in range(len(a)):
            torch.manual_seed(i)  # the training crop and flip draw from the global generator
            x = a[i]
            torch.manual_seed(i)
            y = b[i]
            assert x.keys() == y.keys() and x["caption"] == y["caption"] and x["sample_id"] == y["sample_id"] == i
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["boxes"], y["boxes"])
    assert len(sharded.train) == 30 and len(sharded.test) == 6


def rewrite_member(shard: Path, name: str, data: bytes | None) -> None:
    """Rewrites ``shard`` with member ``name``'s bytes replaced (None: the member left out)."""
    with tarfile.open(shard) as tar:
        files = [(info, tar.extractfile(info).read()) for info in tar if info.isreg()]
    with tarfile.open(shard, "w") as tar:
        for info, content in files:
            if info.name == name:
                if data is None:
                    continue
                content, info.size = data, len(data)
            tar.addfile(info, io.BytesIO(content))


def test_a_corrupt_member_is_skipped_and_counted(tmp_path):
    """Clean data packed, then one image member corrupted and another removed: both images (each with
    its two captions) are skipped and counted; past max_bad_fraction the folder's error, word for word."""
    root = write_folder(tmp_path, bad=False)
    pack_cli(root / "m.jsonl", root / "sh", "--shard-size", "10", "--images", str(root / "imgs"))
    params = dict(shards="sh/shard-{000000..000003}.tar", test_size=4, image_size=16)
    clean_logs: list[str] = []
    clean = build(root, clean_logs, **params)
    assert not clean_logs and len(clean.train) + len(clean.test) == 40
    rewrite_member(root / "sh" / "shard-000001.tar", "000000012.png", b"not an image at all")  # img_06
    rewrite_member(root / "sh" / "shard-000000.tar", "000000004.png", None)  # img_02's first copy
    logs: list[str] = []
    d = build(root, logs, **params, max_bad_fraction=0.1)
    named = "img_02.png (missing), img_06.png (unreadable: UnidentifiedImageError)"
    assert logs == [f"warning: {root / params['shards']}: skipped 2 of 20 images: {named}"]
    kept = d.train.captions + d.test.captions
    assert len(kept) == 36 and not any(c.startswith(("picture 2 ", "picture 6 ")) for c in kept)
    with pytest.raises(UserError) as e:
        build(root, **params, max_bad_fraction=0.05)
    assert str(e.value) == (f"{root / params['shards']}: 2 of 20 images are missing or unreadable, more than "
                            f"max_bad_fraction=0.05: {named}")


def test_a_truncated_shard_is_an_error_naming_it(tmp_path):
    root = write_folder(tmp_path, bad=False)
    pack_cli(root / "m.jsonl", root / "sh", "--shard-size", "20", "--images", str(root / "imgs"))
    shard = root / "sh" / "shard-000001.tar"
    whole = shard.read_bytes()
    for cut in (5000, 5120):  # inside a member, and at a header: both said, naming the shard
        shard.write_bytes(whole[:cut])
        said = r"shard-000001.tar: (truncated shard|not a readable plain .tar shard \(unexpected end)"
        with pytest.raises(UserError, match=said):
            build(root, shards="sh/shard-{000000..000001}.tar", test_size=4, image_size=16)


def test_shards_of_other_tools_image_and_txt_only(tmp_path):
    """img2dataset-style samples (KEY.jpg + KEY.txt, no manifest row): caption from .txt, each image
    its own (named by the key), so holding out by image holds out samples."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "web-0.tar")) as sink:
        for i in range(6):
            jpg = io.BytesIO()
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(jpg, format="JPEG")
            sink.write({"__key__": f"s{i:03d}", "jpg": jpg.getvalue(), "txt": f"web caption {i}"})
    d = build(tmp_path, shards="web-0.tar", test_size=2, image_size=16)
    assert d.train.captions == [f"web caption {i}" for i in range(4)]
    assert d.test.captions == ["web caption 4", "web caption 5"]
    assert d.test[1]["image"].shape == (3, 16, 16)


def test_brace_patterns_expand_relative_to_the_graph_folder(tmp_path):
    for k in range(3):
        (tmp_path / f"s-{k:02d}.tar").write_bytes(b"")
    (tmp_path / "other.tar").write_bytes(b"")
    got = shards.expand("s-{00..02}.tar::other.tar", tmp_path)
    assert got == [tmp_path / "s-00.tar", tmp_path / "s-01.tar", tmp_path / "s-02.tar", tmp_path / "other.tar"]
    with pytest.raises(UserError, match=r"1 of 4 shard file\(s\) not found: .*s-03.tar"):
        shards.expand("s-{00..03}.tar", tmp_path)
    with pytest.raises(UserError, match="not a .tar file"):
        shards.expand("s-00.tar.gz", tmp_path)


@pytest.mark.parametrize("params, field, says", [
    (dict(annotations="m.jsonl", shards="s.tar"), "annotations", "not both"),
    (dict(), "annotations", "not neither"),
    (dict(shards="s.tar", images="imgs"), "images", "is for annotations"),
    (dict(annotations="m.jsonl", test_shards="t.tar"), "test_shards", "needs shards"),
])
def test_params_either_annotations_or_shards(params, field, says):
    with pytest.raises(ValidationError) as e:
        captions_mod.CaptionsParams(**params)
    (error,) = e.value.errors()
    assert error["loc"] == (field,) and says in error["msg"]
    captions_mod.CaptionsParams(shards="s.tar", test_shards="t.tar")


def test_identity_covers_the_shards_content(tmp_path):
    """A rewritten shard is a new node hash (fingerprint), and facts count the samples from the headers."""
    root = write_folder(tmp_path, bad=False)
    pack_cli(root / "m.jsonl", root / "sh", "--shard-size", "25", "--images", str(root / "imgs"))
    kind = registry.get("dataset.captions")
    p = kind.params(shards="sh/shard-{000000..000001}.tar", test_size=4)
    before = kind.fingerprint(p, root)
    assert before["n_shards"] == 2 and kind.facts(p, root)["train_size"] == 36
    rewrite_member(root / "sh" / "shard-000001.tar", "000000030.txt", b"another caption")
    after = kind.fingerprint(p, root)
    assert after["shards"] != before["shards"]
    assert kind.fingerprint(kind.params(shards="sh/nope.tar"), root) == {"shards": "missing"}


def test_pack_errors_are_one_line_exit_2(tmp_path, capsys):
    root = write_folder(tmp_path, bad=False)
    (root / "bad.jsonl").write_text('{"image": "img_00.png", "text": "no caption column"}\n')
    (root / "m.txt").write_text("x")
    cases = [
        (["data", "pack", str(root / "missing.jsonl"), "--out", str(root / "o")], "missing.jsonl: source not found"),
        (["data", "pack", str(root / "bad.jsonl"), "--out", str(root / "o")], "bad.jsonl: no 'caption' column"),
        (["data", "pack", str(root / "m.txt"), "--out", str(root / "o")], "unsupported annotations format"),
        (["data", "pack", str(root / "m.jsonl"), "--out", str(root / "o"), "--shard-size", "0"], "--shard-size"),
        (["data", "pack", str(root / "m.jsonl"), "--out", str(root / "o"), "--images", str(root / "nope")],
         "images folder not found"),
    ]
    for argv, expect in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (root / "o").exists()  # nothing written for a bad input


def test_pack_interleaved_documents_one_sample_each(tmp_path):
    """An MMC4-style .jsonl packs into one sample per document: the document in .json, its images as
    KEY.0.png, KEY.1.png, its line as KEY.line; a missing image file is left out and counted."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    docs = []
    for d in range(3):
        for i in range(2):
            if (d, i) != (1, 1):
                Image.new("RGB", (8, 8), (50 * d, 40 * i, 0)).save(imgs / f"d{d}_{i}.png")
        docs.append({"text_list": [f"doc {d} first", f"doc {d} second"], "url": f"http://x/{d}",
                     "image_info": [{"image_name": f"d{d}_{i}.png", "matched_text_index": i} for i in range(2)]})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    logs: list[str] = []
    packed = shards.pack(tmp_path / "docs.jsonl", tmp_path / "sh", shard_size=2, images=imgs, log=logs.append)
    assert (packed.samples, packed.shards, packed.missing) == (3, 2, 1)
    assert len(logs) == 1 and "1 of 6 image files are missing" in logs[0]
    import webdataset as wds

    pattern = str(tmp_path / "sh" / "shard-{000000..000001}.tar")
    got = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))
    assert [json.loads(s["json"]) for s in got] == docs
    assert [sorted(k for k in s if not k.startswith("__") and k not in ("json", "line")) for s in got] == [
        ["0.png", "1.png"], ["0.png"], ["0.png", "1.png"]]
    assert [s["line"] for s in got] == [b"1", b"2", b"3"]  # each document's line in the .jsonl
    assert got[2]["1.png"] == (imgs / "d2_1.png").read_bytes()


def test_catalog_documents_the_shard_params(capsys):
    assert main(["nodes", "dataset.captions"]) == 0
    shown = capsys.readouterr().out
    assert "shards" in shown and "test_shards" in shown and "brace pattern" in shown


# ----------------------------------------------------------------------------- training on shards

def run(root: Path, data: dict, checkpoints: Checkpointer | None = None, stop_at: int | None = None):
    """(the sample ids of every batch, {step: loss}) of the tiny graph trained on ``data`` (dataset.captions'
    params saying where its samples are); stopped (Interrupted, after a checkpoint) once ``stop_at`` steps
    are taken."""
    captions = node("dataset.captions", **data, test_size=6, image_size=32, max_bad_fraction=0.2)
    graph = tiny_graph(root, f"g{abs(hash((str(data), stop_at)))}.yaml", graph="shards", nodes={
        "data": captions, "vision": vit(), "text": text("data", max_len=16), "itc": itc(embed_dim=32),
        "train": trainer("itc", data="data", **{**TINY_TRAIN, "epochs": 2, "batch_size": 4, "checkpoint_every": 3})})
    trial = load_experiment(graph).trials[0]
    job = compile_trial(trial, root / "cache", torch.device("cpu"), log=lambda m: None).model
    batches: list[list[int]] = []
    collate = job.data.collate

    def recording_collate(items):
        batches.append([item["sample_id"] for item in items])
        return collate(items)

    job.data.collate = recording_collate
    losses: dict[int, float] = {}
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return stop_at is not None and calls[0] >= stop_at

    hooks = Hooks(on_metrics=lambda rows: losses.update({r["step"]: r["value"] for r in rows if r["name"] == "loss"}),
                  should_stop=should_stop)
    try:
        fit(job, trial.seed, checkpoints, hooks)
    except Interrupted:
        pass
    return batches, losses


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = write_folder(tmp_path_factory.mktemp("train"))
    pack_cli(root / "m.jsonl", root / "sh", "--shard-size", "12", "--images", str(root / "imgs"))
    return root


SHARDS = {"shards": "'sh/shard-{000000..000003}.tar'"}


@pytest.mark.integration
def test_training_on_shards_sees_the_folders_batches(packed):
    """30 training samples, batch 4, 2 epochs: the same 14 batches of sample ids and the same losses
    (so the same images and captions) from the folder and from its shards."""
    folder_batches, folder_losses = run(packed, {"annotations": "m.jsonl", "images": "imgs"})
    shard_batches, shard_losses = run(packed, SHARDS)
    assert len(shard_batches) == 14 and shard_batches == folder_batches
    assert sorted(shard_losses) == list(range(1, 15)) and shard_losses == folder_losses


@pytest.mark.integration
def test_resume_mid_epoch_from_shards_replays_the_same_batches(packed, tmp_path):
    """Stopped at step 5 (epoch 1 has 7 steps), resumed from the checkpoint: steps 6..14 see the
    batches and log the losses of an uninterrupted run."""
    whole_batches, whole_losses = run(packed, SHARDS)
    ckpt = Checkpointer(tmp_path / "ckpt")
    first, _ = run(packed, SHARDS, ckpt, stop_at=5)
    rest, losses = run(packed, SHARDS, ckpt)
    assert len(first) == 5 and first + rest == whole_batches
    assert min(losses) == 6 and all(losses[s] == whole_losses[s] for s in range(6, 15))
