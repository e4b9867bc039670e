"""Frozen-transfer evaluators (evaluator.linear_probe, evaluator.transfer_retrieval) and class labels on
real data (dataset.captions' label_column): fake towers whose tokens encode (or ignore) the label or the
caption, a real encoder.vit for the frozen-weights check, and a tiny graph through the runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.helpers import build_ctx, captions_itc_nodes, evaluator, tiny_graph
from vlpgraph.engine import ports
from vlpgraph.cli import main
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.nodes.datasets import captions as captions_mod
from vlpgraph.nodes.datasets import shapes as shapes_mod
from vlpgraph.nodes.encoders import vit as vit_mod
from vlpgraph.nodes.evaluators import linear_probe as probe_mod
from vlpgraph.nodes.evaluators import transfer_retrieval as transfer_mod
from vlpgraph.store import Store

K = 6  # classes of the fake data
C = 16  # token width of the fake tower
P = 4  # patch tokens of the fake tower


# ------------------------------------------------------------------------------------------ fakes


class TokenSplit(torch.utils.data.Dataset):
    """Item i: an "image" that is just its key (a pixel value the fake tower looks up), a caption, a label."""

    def __init__(self, keys: list[int], captions: list[str], labels: list[int]):
        self.keys, self.captions, self.labels = keys, captions, labels

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 2, 2), float(self.keys[i])), "caption": self.captions[i],
                "sample_id": i, "label": int(self.labels[i])}


class TokenData(ports.PairedData):
    def __init__(self, train: TokenSplit, test: TokenSplit, class_names: list[str]):
        self.train, self.test, self.class_names = train, test, class_names
        self.capabilities = frozenset({ports.PAIRED, ports.LABELS})
        self.zeroshot = None

    def train_captions(self) -> list[str]:
        return list(self.train.captions)


class TableTower(ports.VisionTower):
    """A fake frozen encoder: the image with key k gets the tokens ``table[k]`` [1 + P, C]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.weight = nn.Parameter(torch.zeros(1))  # so "its weights" exist
        self.width, self.num_prefix_tokens, self.patch_size, self.grid_size = table.shape[-1], 1, 1, (2, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()] + 0 * self.weight


class FakeModel(ports.Model):
    def __init__(self):
        self.modules, self.objectives, self.tokenizer, self.device = nn.ModuleDict(), {}, None, torch.device("cpu")


def label_data(n_train: int, n_test: int, where: str | None, seed: int = 0) -> tuple[TokenData, TableTower]:
    """Items with random labels (a sixth of the training items unlabelled, -1) and tokens that carry a
    noisy one-hot of the label ``where`` = "cls" (the CLS token), "patches" (every patch token), "patch"
    (one patch token) or None (pure noise: features independent of the label)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    labels = torch.randint(0, K, (n,), generator=g)
    tokens = torch.randn(n, 1 + P, C, generator=g)
    signal = 6.0 * F.one_hot(labels, C).float()
    if where == "cls":
        tokens[:, 0] += signal
    elif where == "patches":
        tokens[:, 1:] += signal[:, None]
    elif where == "patch":
        tokens[:, 2] += 2 * signal
    train_labels = labels[:n_train].clone()
    train_labels[::6] = -1
    train = TokenSplit(list(range(n_train)), [f"train {i}" for i in range(n_train)], train_labels.tolist())
    test = TokenSplit(list(range(n_train, n)), [f"test {i}" for i in range(n_test)], labels[n_train:].tolist())
    return TokenData(train, test, [f"class {k}" for k in range(K)]), TableTower(tokens)


def probe(data, tower, tmp_path, **params) -> dict[str, float]:
    ev = probe_mod.build(probe_mod.LinearProbeParams(**params), {"model": FakeModel(), "data": data, "encoder": tower},
                         build_ctx("ev", cache=tmp_path / "cache"))
    return ev.evaluate(FakeModel(), build_ctx("ev", cache=tmp_path / "cache")).metrics


# ------------------------------------------------------------------------------------- linear probe


@pytest.mark.parametrize("pool", ["cls", "mean", "attentive"])
def test_probe_reads_the_label_where_its_pool_looks(tmp_path, pool):
    """Each pool reaches ~100% when its feature carries the label; cls and mean see only their own tokens."""
    where = {"cls": "cls", "mean": "patches", "attentive": "patch"}[pool]
    data, tower = label_data(300, 120, where)
    m = probe(data, tower, tmp_path, pool=pool, steps=150, batch_size=64)
    assert m["top1"] >= 0.95 and m["top5"] == 1.0
    assert set(m) == {"top1", "top5"}


def test_cls_and_mean_pools_see_only_their_tokens(tmp_path):
    """The label in the patches is invisible to the CLS pool; in the CLS token, invisible to the mean of
    the patches (the prefix is excluded)."""
    data, tower = label_data(300, 120, "patches")
    assert probe(data, tower, tmp_path, pool="cls", steps=150, batch_size=64)["top1"] < 0.4
    data, tower = label_data(300, 120, "cls")
    assert probe(data, tower, tmp_path, pool="mean", steps=150, batch_size=64)["top1"] < 0.4


def test_probe_on_random_features_is_at_chance(tmp_path):
    """Features independent of the labels: the probe's test predictions are independent of the test labels,
    so top1 ~ Binomial(n, 1/K) / n: mean 1/6, std sqrt((1/6)(5/6)/600) = 0.015; 0.06 is 4 std."""
    data, tower = label_data(300, 600, None)
    m = probe(data, tower, tmp_path, pool="cls", steps=150, batch_size=64)
    assert abs(m["top1"] - 1 / K) < 0.06
    assert abs(m["top5"] - 5 / K) < 0.07  # std sqrt((5/6)(1/6)/600) = 0.015 as well


def test_probe_is_seeded_and_trains_only_on_labelled_items(tmp_path):
    data, tower = label_data(120, 60, "patch", seed=3)
    a = probe(data, tower, tmp_path, steps=40, batch_size=32)
    assert a == probe(data, tower, tmp_path, steps=40, batch_size=32)
    # an item whose label is -1 is never read: its tokens are NaN and the metrics stay finite
    tower.table[0] = float("nan")
    assert data.train.labels[0] == -1
    assert probe(data, tower, tmp_path, steps=40, batch_size=32) == a


def test_probe_refuses_one_class_and_no_labelled_test_items(tmp_path):
    data, tower = label_data(60, 30, "cls")
    data.train.labels = [0 if lb >= 0 else -1 for lb in data.train.labels]
    with pytest.raises(TrialFailed, match="at least 2 classes"):
        probe(data, tower, tmp_path, steps=5)
    data, tower = label_data(60, 30, "cls")
    data.test.labels = [-1] * len(data.test.labels)
    with pytest.raises(TrialFailed, match="no labelled items"):
        probe(data, tower, tmp_path, steps=5)


# -------------------------------------------------------------------------------- transfer retrieval

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "pink"]
SHAPES = ["circle", "square", "triangle", "cross", "star", "heart", "moon", "ring"]


def caption_data(n_train: int, encode: bool, seed: int = 0) -> tuple[TokenData, TableTower]:
    """Captions "a <colour> <shape>" (64 kinds); the test split has each kind once. With ``encode`` patch 0
    carries a noisy one-hot of the colour and patch 1 of the shape; else every token is noise."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.cat([torch.randint(0, 64, (n_train,), generator=g), torch.randperm(64, generator=g)])
    n = len(kinds)
    tokens = torch.randn(n, 1 + P, C, generator=g)
    if encode:
        tokens[:, 1] += 3 * F.one_hot(kinds // 8, C).float()
        tokens[:, 2] += 3 * F.one_hot(8 + kinds % 8, C).float()
    caps = [f"a {COLOURS[k // 8]} {SHAPES[k % 8]}" for k in kinds.tolist()]
    train = TokenSplit(list(range(n_train)), caps[:n_train], [-1] * n_train)
    test = TokenSplit(list(range(n_train, n)), caps[n_train:], [-1] * 64)
    return TokenData(train, test, []), TableTower(tokens)


def transfer(data, tower, tmp_path, **params) -> dict[str, float]:
    params = {"steps": 150, "batch_size": 64, "width": 32, "depth": 1, "embed_dim": 32, "lr": 3e-3} | params
    ev = transfer_mod.build(transfer_mod.TransferRetrievalParams(**params),
                            {"model": FakeModel(), "data": data, "encoder": tower},
                            build_ctx("ev", cache=tmp_path / "cache"))
    return ev.evaluate(FakeModel(), build_ctx("ev", cache=tmp_path / "cache")).metrics


# chance on 64 distinct test pairs: R@k = k/64 each way, so rsum = 2 (1 + 5 + 10) / 64 = 0.5
CHANCE_RSUM = 2 * (1 + 5 + 10) / 64


def test_transfer_retrieval_finds_captions_the_patches_encode(tmp_path):
    data, tower = caption_data(600, encode=True)
    m = transfer(data, tower, tmp_path)
    assert set(m) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "n"}
    assert m["n"] == 64
    # the noise (std 1 against a signal of 3 in 16 dims) keeps it well below 6; chance is 0.5 and 0.16
    assert m["rsum"] > 4 * CHANCE_RSUM and m["i2t_r10"] > 0.5 and m["t2i_r10"] > 0.5


def test_transfer_retrieval_on_random_features_is_near_chance(tmp_path):
    """Image embeddings independent of the test captions rank them at random: R@10 ~ Binomial(64, 10/64)/64
    (std 0.045), R@5 (0.034), R@1 (0.016); even fully correlated, rsum's std is below 0.2, so 1.0 is
    chance + 2.5 std."""
    data, tower = caption_data(600, encode=False)
    m = transfer(data, tower, tmp_path)
    assert m["rsum"] < CHANCE_RSUM + 0.5


def test_transfer_retrieval_is_seeded(tmp_path):
    data, tower = caption_data(200, encode=True, seed=1)
    assert transfer(data, tower, tmp_path, steps=20) == transfer(data, tower, tmp_path, steps=20)


def test_transfer_retrieval_refuses_ks_as_large_as_the_test_split(tmp_path):
    data, tower = caption_data(50, encode=True)
    with pytest.raises(UserError, match=r"ks \[64\] reach the size of the test split"):
        transfer(data, tower, tmp_path, ks=[1, 64])


# ----------------------------------------------------------------------- the encoder stays frozen


def test_both_evaluators_leave_a_real_vit_bit_identical(tmp_path):
    c = build_ctx("ev", cache=tmp_path / "cache")
    data = shapes_mod.build(shapes_mod.ShapesParams(train_size=96, test_size=48), {}, c)
    encoder = vit_mod.build(vit_mod.ViTParams(width=32, depth=1, heads=2, patch_size=8), {"data": data}, c)
    encoder.train()  # as mid-training: the evaluators must also give back its train flags
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = FakeModel()
    for ev in (probe_mod.build(probe_mod.LinearProbeParams(steps=5, batch_size=16),
                               {"model": model, "data": data, "encoder": encoder}, c),
               transfer_mod.build(transfer_mod.TransferRetrievalParams(steps=5, batch_size=16, width=32, depth=1),
                                  {"model": model, "data": data, "encoder": encoder}, c)):
        metrics = ev.evaluate(model, c).metrics
        assert all(math.isfinite(v) for v in metrics.values())
        after = encoder.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in encoder.parameters())
        assert all(m.training for m in encoder.modules())


# ------------------------------------------------------------------- labels on real data (captions)


def write_captions(folder: Path, rows: list[tuple[str, str, str]], name: str) -> Path:
    """A CSV manifest (image, caption, kind) with tiny PNGs next to it."""
    folder.mkdir(exist_ok=True)
    lines = ["image,caption,kind"]
    for i, (img, caption, kind) in enumerate(rows):
        if not (folder / img).exists():
            Image.new("RGB", (8, 8), (40 * i % 255, 20, 90)).save(folder / img)
        lines.append(f"{img},{caption},{kind}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def captions_data(tmp_path, test_rows, **params):
    train_rows = [("a.png", "a cat", "cat"), ("b.png", "a dog", "dog"), ("c.png", "a thing", ""),
                  ("d.png", "an ant", "ant"), ("e.png", "a dog again", "dog")]
    write_captions(tmp_path / "data", train_rows, "train.csv")
    write_captions(tmp_path / "data", test_rows, "test.csv")
    p = captions_mod.CaptionsParams(annotations=str(tmp_path / "data" / "train.csv"),
                                    test_annotations=str(tmp_path / "data" / "test.csv"), image_size=16, **params)
    return captions_mod.build(p, {}, build_ctx("ev", cache=tmp_path / "cache"))


def test_captions_label_column_gives_labels(tmp_path):
    data = captions_data(tmp_path, [("f.png", "a dog", "dog"), ("g.png", "a cat", "cat"), ("h.png", "x", "")],
                         label_column="kind")
    assert data.class_names == ["ant", "cat", "dog"]  # sorted names of the training split
    assert ports.LABELS in data.capabilities
    assert ports.LABELS in captions_mod._provides(captions_mod.CaptionsParams(annotations="x.csv", label_column="kind"))
    assert [data.train[i]["label"] for i in range(5)] == [1, 2, -1, 0, 2]
    assert [data.test[i]["label"] for i in range(3)] == [2, 1, -1]
    assert list(data.train.labels) == [1, 2, -1, 0, 2]
    # without label_column: no labels at all
    plain = captions_data(tmp_path, [("f.png", "a dog", "dog")])
    assert ports.LABELS not in plain.capabilities and "label" not in plain.train[0]


def test_captions_refuses_test_labels_unseen_in_training(tmp_path):
    with pytest.raises(UserError, match=r"2 test label\(s\) never seen in training: 'bird', 'cow'"):
        captions_data(tmp_path, [("f.png", "a cow", "cow"), ("g.png", "a bird", "bird"), ("h.png", "a cat", "cat")],
                      label_column="kind")
    with pytest.raises(UserError, match="no training sample has a value in that column"):
        captions_data(tmp_path, [("f.png", "a dog", "dog")], label_column="species")


def test_coco_labels_on_images_and_integer_labels_sort_by_value(tmp_path):
    """COCO: a label on the image entry applies to each of its captions, one on an annotation overrides it;
    integer labels keep their order by value (2 before 10), not by text."""
    folder = tmp_path / "coco"
    write_captions(folder, [(f"{i}.png", "x", "") for i in range(4)], "unused.csv")
    doc = {"images": [{"id": 0, "file_name": "0.png", "kind": 10}, {"id": 1, "file_name": "1.png", "kind": 2},
                      {"id": 2, "file_name": "2.png"}, {"id": 3, "file_name": "3.png", "kind": 2}],
           "annotations": [{"image_id": 0, "caption": "a"}, {"image_id": 0, "caption": "b", "kind": 2},
                           {"image_id": 1, "caption": "c"}, {"image_id": 2, "caption": "d"},
                           {"image_id": 3, "caption": "e"}]}
    (folder / "coco.json").write_text(json.dumps(doc))
    p = captions_mod.CaptionsParams(annotations=str(folder / "coco.json"), test_size=1, image_size=16,
                                    label_column="kind")
    data = captions_mod.build(p, {}, build_ctx("ev", cache=tmp_path / "cache"))
    assert data.class_names == ["2", "10"]
    assert list(data.train.labels) == [1, 0, 0, -1] and list(data.test.labels) == [0]


def test_validation_refuses_a_probe_on_data_without_labels(tmp_path, capsys):
    write_captions(tmp_path / "data", [("a.png", "a cat", "cat"), ("b.png", "a dog", "dog"), ("c.png", "a cow", "cow"),
                                       ("d.png", "a dog", "dog")], "train.csv")
    graph = tiny_graph(tmp_path, "g.yaml", graph="t", seed=None, nodes={
        **captions_itc_nodes(), "probe": evaluator("linear_probe", data="data", inputs={"encoder": "vision"})})
    assert main(["validate", str(graph)]) == 2
    err = capsys.readouterr().err
    assert "input 'data' needs data with labels, which 'data' (dataset.captions) does not provide" in err
    graph.write_text(graph.read_text().replace("image_size: 16}", "image_size: 16, label_column: kind}"))
    assert main(["validate", str(graph)]) == 0


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.integration
def test_tiny_graph_runs_both_evaluators_and_stores_their_metrics(tmp_path):
    frozen = {"encoder": "vision"}
    graph = tiny_graph(tmp_path, probe=evaluator("linear_probe", inputs=frozen, steps=20, batch_size=32),
                       transfer=evaluator("transfer_retrieval", inputs=frozen, steps=10, batch_size=32, width=32,
                                          depth=1))
    assert main(["run", str(graph), "--store", str(tmp_path / "store")]) == 0
    store = Store(tmp_path / "store")
    [run] = store.runs()
    assert run["status"] == "completed"
    rows = store.evals([run["run_id"]])
    got = {(r["evaluator"], r["metric"]) for r in rows}
    assert {("probe", "top1"), ("probe", "top5")} <= got
    assert {("transfer", f"{d}_r{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)} | {("transfer", "rsum")} <= got
    headline = {r["evaluator"]: r["metric"] for r in rows if r.get("headline")}
    assert headline["probe"] == "top1" and headline["transfer"] == "rsum"


def test_max_train_samples_caps_what_the_heads_train_on(tmp_path):
    """Items past the cap are never read: poisoning them (NaN tokens) changes nothing with the cap, and
    breaks the result without it."""
    data, tower = label_data(120, 60, "patch", seed=4)
    probe_capped = probe(data, tower, tmp_path, steps=40, batch_size=16, max_train_samples=60)
    pairs, ptower = caption_data(200, encode=True)
    transfer_capped = transfer(pairs, ptower, tmp_path, steps=20, max_train_samples=100)
    tower.table[60:120] = float("nan")  # the training items past the cap (keys 60..119)
    ptower.table[100:200] = float("nan")
    assert probe(data, tower, tmp_path, steps=40, batch_size=16, max_train_samples=60) == probe_capped
    assert transfer(pairs, ptower, tmp_path, steps=20, max_train_samples=100) == transfer_capped
    assert probe(data, tower, tmp_path, steps=40, batch_size=16) != probe_capped
    assert transfer(pairs, ptower, tmp_path, steps=20) != transfer_capped
