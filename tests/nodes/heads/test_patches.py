"""Patch labels, head.tpp, head.patch_similarity, objective.pta and evaluator.grounding."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import duckdb
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from torch import nn

from tests.helpers import FakeText, build_ctx, evaluator, make_batch, node, tiny_graph
from vlpgraph.engine import ports, registry
from vlpgraph.errors import UserError
from vlpgraph.nodes.encoders.vit import ViTParams, build_vit
from vlpgraph.nodes.evaluators import grounding as grounding_mod
from vlpgraph.nodes.heads import patch_similarity as sim_mod
from vlpgraph.nodes.heads import tpp as tpp_mod
from vlpgraph.nodes.objectives import pta as pta_mod
from vlpgraph.layers.patches import (
    batch_patch_labels,
    chance_pointing,
    patch_labels,
    png_bytes,
    pointing_hits,
    resolve_topk,
    topk_iou,
    znormalize,
)

CTX = build_ctx()


def _kind(name: str) -> registry.NodeKind:
    # Importing the module registered the kind; registry.get() would import every node module.
    return registry._KINDS[name]


def grid(labels: torch.Tensor, s: int) -> list[str]:
    """A bool [S*S] label map as rows of '#' and '.' (easy to check by eye)."""
    return ["".join("#" if v else "." for v in row) for row in labels.reshape(s, s).tolist()]


def box(*xyxy: float) -> torch.Tensor:
    return torch.tensor([list(xyxy)], dtype=torch.float32)


# ---------------------------------------------------------------------------------- patch labels


def test_labels_at_two_patch_sizes():
    b = box(2, 3, 10, 9)  # x 2..10, y 3..9 in a 32 px image
    assert grid(patch_labels(b, None, 32, 8), 4) == ["##..", "##..", "....", "...."]
    assert grid(patch_labels(b, None, 32, 4), 8) == [
        "###.....", "###.....", "###.....", "........", "........", "........", "........", "........",
    ]


def test_box_on_patch_edges_stays_inside():
    b = box(8, 8, 16, 16)  # exactly patch (1, 1) at p=8: its edges do not reach the neighbours
    assert grid(patch_labels(b, None, 32, 8), 4) == ["....", ".#..", "....", "...."]
    assert grid(patch_labels(b, None, 32, 4), 8)[1:5] == ["........", "..##....", "..##....", "........"]
    # float32 rounding of an edge does not leak into the next patch
    b32 = torch.tensor([[8.0000005, 7.9999995, 15.9999995, 16.0000005]], dtype=torch.float32)
    assert grid(patch_labels(b32, None, 32, 8), 4) == ["....", ".#..", "....", "...."]


def test_one_pixel_touch_labels_the_patch():
    b = box(0, 0, 9, 8)  # one pixel column (x 8..9) inside patch column 1
    assert grid(patch_labels(b, None, 32, 8), 4) == ["##..", "....", "....", "...."]
    b = box(23, 23, 24.5, 24.5)  # a tiny box straddling the corner of four patches
    assert grid(patch_labels(b, None, 32, 8), 4) == ["....", "....", "..##", "..##"]


def test_mentioned_filter_and_empty_rule():
    boxes = torch.tensor([[0, 0, 8, 8], [24, 24, 32, 32]], dtype=torch.float32)
    assert grid(patch_labels(boxes, torch.tensor([False, True]), 32, 8), 4) == ["....", "....", "....", "...#"]
    none = torch.tensor([False, False])
    assert patch_labels(boxes, none, 32, 8).all()  # whole-image rule
    assert not patch_labels(boxes, none, 32, 8, empty="none").any()
    assert patch_labels(torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), 32, 8).all()
    with pytest.raises(ValueError, match="mentioned"):
        patch_labels(boxes, torch.tensor([True]), 32, 8)


def test_batch_labels_match_single_labels():
    g = torch.Generator().manual_seed(0)
    boxes, mentioned = [], []
    for i in range(20):
        k = int(torch.randint(0, 5, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * 28
        wh = torch.rand(k, 2, generator=g) * 12
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=32)], 1))
        mentioned.append(torch.rand(k, generator=g) < 0.6)
    for p in (4, 8):
        for empty in ("all", "none"):
            labels, has = batch_patch_labels(boxes, mentioned, 32, p, empty=empty)
            for i in range(20):
                assert torch.equal(labels[i], patch_labels(boxes[i], mentioned[i], 32, p, empty=empty))
                assert bool(has[i]) == bool(mentioned[i].any())


# ---------------------------------------------------------------------------------- metrics, PNG


def test_pointing_and_iou_on_constructed_maps():
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [0, 1, 4, 5]] = True
    masks[1, [15]] = True
    masks[2, [6, 7]] = True
    perfect = masks.float() + 0.01 * torch.rand(3, 16)  # noise only within each class
    inverted = -perfect
    assert pointing_hits(perfect, masks).tolist() == [1.0, 1.0, 1.0]
    assert pointing_hits(inverted, masks).tolist() == [0.0, 0.0, 0.0]
    assert topk_iou(perfect[:1], masks[:1], 4).item() == 1.0  # k = |mask|
    assert topk_iou(perfect[1:2], masks[1:2], 1).item() == 1.0
    assert topk_iou(inverted, masks, 3).tolist() == [0.0, 0.0, 0.0]
    assert topk_iou(perfect[:1], masks[:1], 2).item() == pytest.approx(0.5)  # 2 of 4 target patches
    assert chance_pointing(masks).tolist() == pytest.approx([4 / 16, 1 / 16, 2 / 16])
    # a constant map: tied maxima earn exactly the chance share; [B, S, S] input works too
    flat = torch.zeros(3, 4, 4)
    assert pointing_hits(flat, masks.reshape(3, 4, 4)).tolist() == pytest.approx(chance_pointing(masks).tolist())
    # seeded tie-break: deterministic, and not always the first patches
    gen = lambda: torch.Generator().manual_seed(3)
    a = topk_iou(torch.zeros(50, 16), masks[:1].expand(50, 16), 4, generator=gen())
    b = topk_iou(torch.zeros(50, 16), masks[:1].expand(50, 16), 4, generator=gen())
    assert torch.equal(a, b) and a.min() < 1.0
    assert resolve_topk(3, masks).tolist() == [3, 3, 3] and resolve_topk(0.1, masks).tolist() == [2, 2, 2]
    assert resolve_topk(100, masks).tolist() == [16] * 3 and resolve_topk("target", masks).tolist() == [4, 1, 2]
    assert topk_iou(perfect, masks, resolve_topk("target", masks)).tolist() == [1.0, 1.0, 1.0]
    assert topk_iou(inverted, masks, resolve_topk("target", masks)).tolist() == [0.0, 0.0, 0.0]


def test_znormalize():
    x = torch.randn(4, 64) * 5 + 3
    z = znormalize(x, dim=1)
    assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(1, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.isfinite(znormalize(torch.ones(2, 8))).all()


def test_png_bytes_decode_to_the_right_size():
    img = torch.zeros(3, 12, 20)
    img[0, :, :10] = 1.0  # left half red
    im = Image.open(io.BytesIO(png_bytes(img)))
    assert im.size == (20, 12) and im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((19, 11)) == (0, 0, 0)


# ------------------------------------------------------------------------------------ the heads


def make_vit(depth: int = 3, width: int = 32, patch: int = 8):
    return build_vit(ViTParams(image_size=32, patch_size=patch, width=width, depth=depth, heads=2), 32)


def box_batch(b: int = 4, seed: int = 0) -> dict:
    """``b`` random 32 x 32 images, captions of 6 random tokens, each image with the same two boxes, the
    second mentioned in every other caption."""
    boxes = torch.tensor([[2.0, 3.0, 10.0, 9.0], [20.0, 20.0, 30.0, 30.0]])
    return make_batch(b, 32, seed, text_len=6, boxes=[boxes] * b,
                      mentioned=[torch.tensor([True, i % 2 == 0]) for i in range(b)])


def make_tpp(depth: int = 3, **params):
    vision, text = make_vit(depth), FakeText(32, pooled=False)
    head = tpp_mod.build(tpp_mod.TPPParams(**params), {"vision": vision, "text": text}, CTX)
    return head, vision, text


def test_tpp_shapes_and_znormalisation():
    head, _, _ = make_tpp()
    assert head.block == 1 and head.grid_size == (4, 4)  # middle of 3 blocks
    fwd = ports.Forward(box_batch())
    logp = head.patch_logits(fwd)
    assert logp.shape == (4, 16, 2)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(4, 16), atol=1e-5)
    scores = head.patch_scores(fwd)
    assert scores.shape == (4, 4, 4)
    flat = scores.reshape(4, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(4), atol=1e-3)
    assert head.patch_scores(fwd) is scores  # memoised
    # architecture: LN -> Linear(C, C) -> split -> (C + Ct) -> C/2 -> C/4 -> 2
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [16, 8, 2]
    assert head.mlp[0].in_features == 64
    assert make_tpp(depth=12)[0].block == 6 and make_tpp(block=0)[0].block == 0
    with pytest.raises(UserError, match="block 3 does not exist"):
        make_tpp(block=3)


def test_tpp_shares_the_vision_pass():
    head, vision, text = make_tpp()
    calls = {"forward": 0, "blocks": 0}
    orig_fwd, orig_blocks = vision.forward, vision.forward_blocks

    def counting_forward(x):
        calls["forward"] += 1
        return orig_fwd(x)

    def counting_blocks(x, blocks):
        calls["blocks"] += 1
        return orig_blocks(x, blocks)

    vision.forward, vision.forward_blocks = counting_forward, counting_blocks
    batch = box_batch()
    fwd = ports.Forward(batch)
    head.patch_scores(fwd)
    final = fwd.image_tokens(vision)  # the final tokens of the same pass
    assert calls == {"forward": 0, "blocks": 1} and text.calls == 1
    assert torch.allclose(final, orig_fwd(batch["images"]), atol=1e-5)
    # under no_grad in training mode the final tokens are not shared (they would carry no gradient)
    fwd2 = ports.Forward(batch)
    with torch.no_grad():
        head.patch_scores(fwd2)
    fwd2.image_tokens(vision)
    assert calls == {"forward": 1, "blocks": 2}


def test_pta_gradient_reaches_tpp_vision_block_and_text():
    head, vision, text = make_tpp()
    pta = pta_mod.build(pta_mod.PTAParams(), {"tpp": head, "data": None}, CTX)
    out = pta(ports.Forward(box_batch()), box_batch())
    assert set(out) == {"pta"} and out["pta"].ndim == 0
    out["pta"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    blocks = vision.vit.blocks
    assert blocks[1].mlp.fc2.weight.grad.abs().sum() > 0  # the block the TPP reads
    assert blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # and every block before it
    assert vision.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert blocks[2].mlp.fc2.weight.grad is None  # blocks after it are not on PTA's path
    assert text.emb.weight.grad.abs().sum() > 0
    head2, _, text2 = make_tpp(detach_text=True)
    pta2 = pta_mod.build(pta_mod.PTAParams(), {"tpp": head2, "data": None}, CTX)
    pta2(ports.Forward(box_batch()), box_batch())["pta"].backward()
    assert text2.emb.weight.grad is None


def test_pta_labels_loss_and_unmentioned_rows():
    head, _, _ = make_tpp()
    batch = box_batch()
    batch["mentioned"][1] = torch.tensor([False, False])  # a caption that mentions nothing
    labels_by = {}
    for mode in ("skip", "all", "none"):
        pta = pta_mod.build(pta_mod.PTAParams(unmentioned=mode), {"tpp": head, "data": None}, CTX)
        labels, rows = pta.labels(batch)
        labels_by[mode] = labels
        assert rows.tolist() == ([True, False, True, True] if mode == "skip" else [True] * 4)
    assert grid(labels_by["skip"][0], 4) == ["##..", "##..", "..##", "..##"]
    assert grid(labels_by["skip"][3], 4) == ["##..", "##..", "....", "...."]
    assert labels_by["all"][1].all() and not labels_by["none"][1].any()
    # the loss is the 2-way cross-entropy over the used rows' patches
    pta = pta_mod.build(pta_mod.PTAParams(), {"tpp": head, "data": None}, CTX)
    fwd = ports.Forward(batch)
    loss = pta(fwd, batch)["pta"]
    logp = head.patch_logits(fwd)
    labels, rows = pta.labels(batch)
    expect = F.cross_entropy(logp[rows].reshape(-1, 2), labels[rows].reshape(-1).long())  # log_softmax is idempotent
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # a batch with nothing to learn gives a zero that still backpropagates
    batch["mentioned"] = [torch.tensor([False, False])] * 4
    zero = pta(ports.Forward(batch), batch)["pta"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_pta_step_groups_and_build_checks():
    head, vision, text = make_tpp()
    assert pta_mod.build(pta_mod.PTAParams(), {"tpp": head, "data": None}, CTX).step_groups == ("main",)
    assert pta_mod.build(pta_mod.PTAParams(separate_step=True), {"tpp": head, "data": None}, CTX).step_groups == ("pta",)
    sim = sim_mod.build(sim_mod.PatchSimilarityParams(), {"vision": vision, "text": text}, CTX)
    with pytest.raises(UserError, match="no patch_logits"):
        pta_mod.build(pta_mod.PTAParams(), {"tpp": sim, "data": None}, CTX)
    kind = _kind("objective.pta")
    assert kind.inputs["data"].needs == frozenset({ports.BOXES})
    assert kind.inputs["tpp"].type_tuple == (ports.PatchScorer,)
    assert issubclass(_kind("head.tpp").output, ports.PatchScorer)
    assert issubclass(_kind("head.patch_similarity").output, ports.PatchScorer)
    assert _kind("evaluator.grounding").inputs["data"].needs == frozenset({ports.BOXES})
    for name in ("head.tpp", "head.patch_similarity", "objective.pta", "evaluator.grounding"):
        k = _kind(name)
        assert k.summary, name
        assert all(f.description for f in k.params.model_fields.values()), name


def test_patch_similarity_scores():
    vision, text = make_vit(), FakeText(32, pooled=False)
    head = sim_mod.build(sim_mod.PatchSimilarityParams(), {"vision": vision, "text": text}, CTX)
    assert list(head.parameters()) == []  # training-free
    batch = box_batch()
    fwd = ports.Forward(batch)
    scores = head.patch_scores(fwd)
    assert scores.shape == (4, 4, 4)
    patches = vision(batch["images"])[:, 1:]
    caption = text(batch["input_ids"], batch["attention_mask"]).mean(1)
    cos = F.cosine_similarity(patches, caption[:, None], dim=-1)
    assert torch.allclose(scores.reshape(4, -1), znormalize(cos, dim=1), atol=1e-4)
    with pytest.raises(UserError, match="equal widths"):
        sim_mod.build(sim_mod.PatchSimilarityParams(), {"vision": vision, "text": FakeText(16, pooled=False)}, CTX)


# ------------------------------------------------------------------------------ grounding evaluator


class WordTokenizer(ports.Tokenizer):
    max_len, pad_id, cls_id, sep_id, mask_id, content_hash = 4, 0, 0, 0, 0, "fake"

    def __call__(self, captions):
        ids = torch.tensor([[len(c) % 50] for c in captions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class BoxSplit(torch.utils.data.Dataset):
    """Item i: a 16 px image, one mentioned box that moves with i, one unmentioned box; every 5th caption
    mentions nothing."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        x = float(4 * (i % 4))
        boxes = torch.tensor([[x, x, x + 3.5, x + 3.5], [12.0, 0.0, 16.0, 4.0]])
        mentioned = torch.tensor([i % 5 != 4, False])
        return {"image": torch.full((3, 16, 16), i / 23.0), "caption": f"caption {i}", "sample_id": 100 + i,
                "boxes": boxes, "mentioned": mentioned, "label": -1}


class BoxData(ports.PairedData):
    def __init__(self):
        self.train = self.test = BoxSplit()
        self.capabilities = frozenset({ports.PAIRED, ports.BOXES})
        self.image_size = 16
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


class OracleScorer(ports.PatchScorer):
    """Scores the target patches (from the batch's boxes) high, or low when ``invert``; records modes."""

    def __init__(self, invert: bool = False, blind: bool = False):
        super().__init__()
        self.blind = blind  # text-blind: every object's box scores high, mentioned or not
        self.grid_size = (4, 4)
        self.patch_size = 4
        self.invert = invert
        self.dropout = nn.Dropout(0.1)
        self.modes: list[tuple[bool, bool]] = []

    def patch_scores(self, fwd, images_key="images"):
        self.modes.append((self.training, torch.is_grad_enabled()))
        b = fwd.batch
        mentioned = [torch.ones_like(m) for m in b["mentioned"]] if self.blind else b["mentioned"]
        labels, _ = batch_patch_labels(b["boxes"], mentioned, 16, 4, empty="none")
        s = labels.float() * (-1 if self.invert else 1)
        return znormalize(s, dim=1).reshape(-1, 4, 4)


class FakeModel(ports.Model):
    def __init__(self, data):
        self.modules = nn.ModuleDict({"net": nn.Linear(2, 2)})
        self.objectives = {}
        self.tokenizer = WordTokenizer()
        self.data = data
        self.device = torch.device("cpu")
        self.params = None


def run_grounding(scorer, **params):
    data = BoxData()
    model = FakeModel(data)
    ev = grounding_mod.build(grounding_mod.GroundingParams(**params), {"model": model, "data": data, "scorer": scorer}, CTX)
    return ev.evaluate(model, CTX), model


def test_grounding_metrics_and_heatmaps():
    scorer = OracleScorer()
    result, model = run_grounding(scorer, batch_size=5, heatmaps=6)  # topk: the target's size (1 patch)
    m = result.metrics
    assert set(m) == {"pointing", "topk_iou", "chance_pointing", "n", "pointing_distractor", "wrong_object",
                      "n_distractor"}
    assert (m["pointing_distractor"], m["wrong_object"], m["n_distractor"]) == (1.0, 0.0, 19.0)
    assert m["n"] == 19.0  # 23 samples, 4 mention nothing
    assert m["pointing"] == 1.0 and m["topk_iou"] == 1.0  # each target is one patch
    assert m["chance_pointing"] == pytest.approx(1 / 16)
    assert grounding_mod.GroundingEvaluator.headline == "pointing"
    assert grounding_mod.GroundingParams().topk == "target" and grounding_mod.GroundingParams(topk=0.25).topk == 0.25
    for bad in (0, -1, "all"):
        with pytest.raises(ValidationError):
            grounding_mod.GroundingParams(topk=bad)
    assert scorer.modes and all(mode == (False, False) for mode in scorer.modes)
    assert scorer.training and model.modules.training  # modes restored
    rows = result.patch_scores
    assert [r["sample_id"] for r in rows] == [100, 101, 102, 103, 105, 106]  # 104 mentions nothing
    r = rows[1]
    assert r["caption"] == "caption 1" and (r["grid_h"], r["grid_w"]) == (4, 4)
    assert len(r["scores"]) == 16 and max(range(16), key=r["scores"].__getitem__) == 5
    assert json.loads(r["boxes"]) == [[4.0, 4.0, 7.5, 7.5]]  # mentioned boxes only
    im = Image.open(io.BytesIO(r["image"]))
    assert im.size == (16, 16) and im.getpixel((0, 0)) == (round(255 / 23),) * 3

    inverted, _ = run_grounding(OracleScorer(invert=True), topk=1, heatmaps=0, max_samples=10)
    assert inverted.metrics["pointing"] == 0.0 and inverted.metrics["topk_iou"] == 0.0
    assert inverted.metrics["n"] == 8.0 and inverted.patch_scores == []
    blind, _ = run_grounding(OracleScorer(blind=True), topk=1, heatmaps=0)
    assert blind.metrics["pointing_distractor"] == 0.5 and blind.metrics["wrong_object"] == 0.5  # a tie of two
    # the inverted map's top patches are every non-target patch, one of 15 on the unmentioned object
    assert inverted.metrics["wrong_object"] == pytest.approx(1 / 15)


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.integration
@pytest.mark.slow
def test_tpp_pta_grounding_graph_runs(tmp_path, cli_env):
    path = tiny_graph(tmp_path, train={"inputs": {"objectives": ["pta", "itc"]}, "checkpoint_every": 0, "max_steps": 6},
                      tpp=node("head.tpp", {"vision": "vision", "text": "text"}),
                      pta=node("objective.pta", {"tpp": "tpp", "data": "shapes"}),
                      grounding=evaluator("grounding", inputs={"scorer": "tpp"}, heatmaps=5))
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "vlpgraph.cli", "run", str(path), "--store", str(store)],
                          env=cli_env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    con = duckdb.connect(str(store / "vlpgraph.duckdb"), read_only=True)
    try:
        n, cells = con.execute("SELECT count(*), min(len(scores)) FROM patch_scores").fetchone()
        metrics = dict(con.execute("SELECT metric, value FROM evals WHERE evaluator = 'grounding'").fetchall())
        terms = {r[0] for r in con.execute("SELECT DISTINCT name FROM metrics").fetchall()}
    finally:
        con.close()
    assert n == 5 and cells == 16
    assert {"pointing", "topk_iou", "chance_pointing", "n"} <= set(metrics)
    assert {"pta", "itc"} <= terms
