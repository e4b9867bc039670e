"""evaluator.retrieval and evaluator.zeroshot on fake data and fake models with known embeddings."""

from __future__ import annotations

import re
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tests.helpers import build_ctx
from vlpgraph.nodes.evaluators import evaluation
from vlpgraph.engine import ports, registry
from vlpgraph.errors import TrialFailed
from vlpgraph.nodes.evaluators import retrieval as retrieval_mod
from vlpgraph.nodes.evaluators import zeroshot as zeroshot_mod

CTX = build_ctx("ev")
CLASSES = ["red circle", "blue square", "green triangle", "red square", "blue circle", "green circle"]


def _kind(name: str) -> registry.NodeKind:
    # Importing the module registered the kind; registry.get() would import every node module,
    # some of which are written concurrently.
    return registry._KINDS[name]


# ------------------------------------------------------------------------------------------ fakes


class FakeTokenizer(ports.Tokenizer):
    """Each distinct string is one token id (in order of first sight, or of ``vocab``)."""

    max_len = 4
    pad_id, cls_id, sep_id, mask_id = 0, 0, 0, 0
    content_hash = "fake"

    def __init__(self, vocab: list[str] | None = None):
        self.ids: dict[str, int] = {}
        self.seen: list[str] = []
        for text in vocab or []:
            self.ids.setdefault(text, len(self.ids))

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    def text(self, token: int) -> str:
        return next(t for t, i in self.ids.items() if i == token)

    def __call__(self, captions):
        self.seen.extend(captions)
        ids = torch.tensor([self.ids.setdefault(c, len(self.ids)) for c in captions])
        return {"input_ids": ids[:, None], "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


class FakeSplit(torch.utils.data.Dataset):
    """Item i: an image whose pixels all equal i, caption ``captions[i]``, sample_id 100 + i."""

    def __init__(self, captions: list[str]):
        self.captions = captions
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        self.reads.append(i)
        return {"image": torch.full((3, 2, 2), float(i)), "caption": self.captions[i], "sample_id": 100 + i}


class FakeData(ports.PairedData):
    def __init__(self, captions: list[str], zeroshot: ports.ZeroShotSet | None = None):
        self.train = FakeSplit(captions)
        self.test = FakeSplit(captions)
        self.zeroshot = zeroshot
        self.capabilities = frozenset({ports.PAIRED, ports.CLASSES} if zeroshot else {ports.PAIRED})


class FakeEmbedder(ports.Embedder):
    """Embeds an image by its index (its pixel value) and a text by its string, through given functions;
    records the mode it was called in."""

    def __init__(self, tokenizer: FakeTokenizer, image_fn: Callable[[int], torch.Tensor],
                 text_fn: Callable[[str], torch.Tensor], probe: nn.Module):
        self.tokenizer, self.image_fn, self.text_fn, self.probe = tokenizer, image_fn, text_fn, probe
        self.image_calls: list[list[int]] = []
        self.modes: list[tuple[bool, bool, bool]] = []

    def _record(self, t: torch.Tensor) -> None:
        self.modes.append((self.probe.training, torch.is_grad_enabled(), t.device.type == "cpu"))

    def embed_images(self, fwd: ports.Forward) -> torch.Tensor:
        images = fwd.batch["images"]
        self._record(images)
        idx = images[:, 0, 0, 0].long().tolist()
        self.image_calls.append(idx)
        return F.normalize(torch.stack([self.image_fn(i).float() for i in idx]), dim=-1)

    def embed_texts(self, fwd: ports.Forward) -> torch.Tensor:
        ids = fwd.batch["input_ids"]
        self._record(ids)
        return F.normalize(torch.stack([self.text_fn(self.tokenizer.text(int(t))).float() for t in ids[:, 0]]), dim=-1)


class FakeModel(ports.Model):
    def __init__(self, data, image_fn, text_fn, tokenizer=None):
        self.modules = nn.ModuleDict({"net": nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))})
        self.modules.net[1].eval()  # a submodule deliberately in eval mode: must stay so
        self.tokenizer = tokenizer or FakeTokenizer()
        self.objectives = {"itc": FakeEmbedder(self.tokenizer, image_fn, text_fn, self.modules.net[0])}
        self.data = data
        self.device = torch.device("cpu")
        self.params = None


def one_hot(i: int, n: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), n).float()


def caption_index(text: str) -> int:
    return int(re.search(r"\d+", text).group())


def retrieval(data, model, **params) -> dict[str, float]:
    ev = retrieval_mod.build(retrieval_mod.RetrievalParams(**params), {"model": model, "data": data}, CTX)
    return ev.evaluate(model, CTX).metrics


N = 12
CAPTIONS = [f"caption {i}" for i in range(N)]


# ------------------------------------------------------------------------------------- retrieval


def test_retrieval_kind_declaration():
    kind = _kind("evaluator.retrieval")
    assert issubclass(kind.output, ports.Evaluator)
    assert kind.inputs["model"].type_tuple == (ports.Model,)
    assert kind.inputs["data"].type_tuple == (ports.PairedData,)
    p = retrieval_mod.RetrievalParams()
    assert (p.batch_size, p.ks, p.max_samples) == (256, [1, 5, 10], None)
    with pytest.raises(ValidationError):
        retrieval_mod.RetrievalParams(ks=[0, 5])
    with pytest.raises(ValidationError):
        retrieval_mod.RetrievalParams(k=[1])


def test_perfect_embeddings_give_recall_one():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: one_hot(i, N), lambda t: one_hot(caption_index(t), N))
    m = retrieval(data, model, batch_size=5)  # 3 batches, the last one short
    assert m == {"i2t_r1": 1.0, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0, "t2i_r10": 1.0,
                 "rsum": 6.0, "n": 12.0}
    assert [len(c) for c in model.objectives["itc"].image_calls] == [5, 5, 2]


def test_swapped_pairs_miss_at_one_and_hit_at_five():
    """Image i sits closest to caption partner(i) (pairs swapped), next to its own caption."""
    partner = lambda i: i ^ 1  # 0<->1, 2<->3, ...
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: 2 * one_hot(partner(i), N) + one_hot(i, N),
                      lambda t: one_hot(caption_index(t), N))
    m = retrieval(data, model)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (0.0, 1.0, 1.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (0.0, 1.0, 1.0)
    assert m["rsum"] == 4.0


def test_recall_matches_brute_force_on_random_embeddings():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(N, 8, generator=g)
    txt = img + 1.2 * torch.randn(N, 8, generator=g)  # noisy matches: some hits at 1, more at 5
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: img[i], lambda t: txt[caption_index(t)])
    m = retrieval(data, model, ks=[1, 2, 3, 5], batch_size=4)
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    i2t_rank = (sim.argsort(dim=1, descending=True) == torch.arange(N)[:, None]).float().argmax(1)
    t2i_rank = (sim.T.argsort(dim=1, descending=True) == torch.arange(N)[:, None]).float().argmax(1)
    for k in (1, 2, 3, 5):
        assert m[f"i2t_r{k}"] == pytest.approx((i2t_rank < k).float().mean().item())
        assert m[f"t2i_r{k}"] == pytest.approx((t2i_rank < k).float().mean().item())
    assert 0 < m["i2t_r1"] < m["i2t_r5"]  # the check above is not vacuous
    assert m["rsum"] == pytest.approx(sum(v for k, v in m.items() if k.startswith(("i2t", "t2i"))))


def test_identical_captions_count_as_hits():
    """Captions 0 and 1 are the same text, so they embed identically; a model cannot tell them apart."""
    captions = ["a red circle", "a red circle"] + CAPTIONS[2:]
    text_fn = lambda t: one_hot(0 if t == "a red circle" else caption_index(t), N)

    def image_fn(i):
        if i == 1:  # closest to the shared caption, but less so than image 0
            return F.normalize(one_hot(0, N) + 0.5 * one_hot(N - 1, N), dim=0)
        return one_hot({2: 3, 3: 2}.get(i, i), N)  # images 2 and 3 swapped: distinct captions, misses

    data = FakeData(captions)
    m = retrieval(data, FakeModel(data, image_fn, text_fn), ks=[1])
    # image 1 ties captions 0 and 1, caption 1 ranks image 0 first: hits by the duplicate rule
    # (without it, images 0 and 1 and caption 1 would miss as well)
    assert m["i2t_r1"] == pytest.approx((N - 2) / N)
    assert m["t2i_r1"] == pytest.approx((N - 2) / N)


def test_ties_count_against_the_model():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: torch.ones(4), lambda t: torch.ones(4))  # a collapsed embedding
    m = retrieval(data, model)
    assert m["rsum"] == 0.0


def test_nan_embeddings_are_misses():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: torch.full((N,), float("nan")), lambda t: one_hot(caption_index(t), N))
    assert retrieval(data, model)["rsum"] == 0.0


def test_max_samples_caps_the_test_split():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: 2 * one_hot(i ^ 1, N) + one_hot(i, N), lambda t: one_hot(caption_index(t), N))
    m = retrieval(data, model, max_samples=5, ks=[1, 2])
    assert m["n"] == 5.0
    assert sorted(data.test.reads) == [0, 1, 2, 3, 4]
    # among 5 samples, image 4's partner (5) is absent, so only it hits at 1
    assert m["i2t_r1"] == pytest.approx(1 / 5) and m["i2t_r2"] == 1.0


def test_evaluation_mode_is_entered_and_restored():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: one_hot(i, N), lambda t: one_hot(caption_index(t), N))
    model.modules.train()
    model.modules.net[1].eval()
    retrieval(data, model)
    modes = model.objectives["itc"].modes
    assert modes and all(m == (False, False, True) for m in modes)  # eval, no grad, on model.device
    assert model.modules.training and model.modules.net[0].training
    assert not model.modules.net[1].training  # its own flag, not the parent's

    def boom(i):
        raise RuntimeError("boom")

    model.objectives["itc"].image_fn = boom
    with pytest.raises(RuntimeError, match="boom"):
        retrieval(data, model)
    assert model.modules.net[0].training and not model.modules.net[1].training


def test_model_without_tokenizer_is_a_clear_failure():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: one_hot(i, N), lambda t: one_hot(0, N))
    model.tokenizer = None
    with pytest.raises(TrialFailed, match="no tokenizer"):
        retrieval(data, model)


# ------------------------------------------------------------------------------------- zero-shot


ZS_INDICES = [0, 2, 3, 5, 7, 8, 10]
ZS_LABELS = [0, 1, 2, 3, 4, 5, 1]


def zs_data(class_names=CLASSES, labels=ZS_LABELS) -> FakeData:
    return FakeData(CAPTIONS, ports.ZeroShotSet(indices=ZS_INDICES, labels=labels, class_names=class_names,
                                                prompt="a {}"))


def class_of_prompt(text: str, class_names=CLASSES) -> int:
    # longest match first, so "red circle" is not found inside some longer name
    return next(i for i, c in sorted(enumerate(class_names), key=lambda x: -len(x[1])) if text.endswith(c))


def zeroshot(data, model, **params) -> dict[str, float]:
    ev = zeroshot_mod.build(zeroshot_mod.ZeroShotParams(**params), {"model": model, "data": data}, CTX)
    return ev.evaluate(model, CTX).metrics


def test_zeroshot_kind_declaration():
    kind = _kind("evaluator.zeroshot")
    assert issubclass(kind.output, ports.Evaluator)
    assert kind.inputs["data"].needs == frozenset({ports.CLASSES})
    assert kind.inputs["model"].type_tuple == (ports.Model,)
    assert zeroshot_mod.ZeroShotParams().prompt is None and zeroshot_mod.ZeroShotParams().batch_size == 256
    for bad in ("a photo", "a {0} {1}", "a {name}"):
        with pytest.raises(ValidationError):
            zeroshot_mod.ZeroShotParams(prompt=bad)


def test_zeroshot_perfect_embedder_scores_one():
    data = zs_data()
    label_of = dict(zip(ZS_INDICES, ZS_LABELS))
    model = FakeModel(data, lambda i: one_hot(label_of[i], 6), lambda t: one_hot(class_of_prompt(t), 6))
    m = zeroshot(data, model, batch_size=3)
    assert m == {"top1": 1.0, "top5": 1.0, "n": 7.0, "chance": pytest.approx(1 / 6)}
    assert sorted(data.test.reads) == ZS_INDICES  # only the zero-shot images are read
    assert model.tokenizer.seen == [f"a {c}" for c in CLASSES]  # the dataset's prompt


def test_zeroshot_wrong_embedder_gives_expected_accuracy():
    """Images at even positions embed as their class; odd ones closest to the next class, their own second."""
    data = zs_data()
    pos_of = {idx: p for p, idx in enumerate(ZS_INDICES)}

    def image_fn(i):
        p, y = pos_of[i], ZS_LABELS[pos_of[i]]
        return one_hot(y, 6) if p % 2 == 0 else 2 * one_hot((y + 1) % 6, 6) + one_hot(y, 6)

    model = FakeModel(data, image_fn, lambda t: one_hot(class_of_prompt(t), 6))
    m = zeroshot(data, model)
    assert m["top1"] == pytest.approx(4 / 7) and m["top5"] == 1.0

    fully_wrong = FakeModel(data, lambda i: one_hot((ZS_LABELS[pos_of[i]] + 1) % 6, 6),
                            lambda t: one_hot(class_of_prompt(t), 6))
    m = zeroshot(data, fully_wrong)
    assert m["top1"] == 0.0 and m["top5"] == 0.0  # the true class ties with 4 others at 0: ties count against


def test_zeroshot_prompt_param_overrides_the_dataset():
    data = zs_data()
    label_of = dict(zip(ZS_INDICES, ZS_LABELS))
    model = FakeModel(data, lambda i: one_hot(label_of[i], 6), lambda t: one_hot(class_of_prompt(t), 6))
    assert zeroshot(data, model, prompt="a photo of a {}")["top1"] == 1.0
    assert model.tokenizer.seen == [f"a photo of a {c}" for c in CLASSES]


def test_zeroshot_without_top5_below_five_classes():
    names = CLASSES[:3]
    labels = [y % 3 for y in ZS_LABELS]
    data = zs_data(names, labels)
    label_of = dict(zip(ZS_INDICES, labels))
    model = FakeModel(data, lambda i: one_hot(label_of[i], 3), lambda t: one_hot(class_of_prompt(t, names), 3))
    m = zeroshot(data, model)
    assert "top5" not in m and m["top1"] == 1.0 and m["chance"] == pytest.approx(1 / 3)


def test_zeroshot_without_classes_is_a_clear_failure():
    data = FakeData(CAPTIONS)
    model = FakeModel(data, lambda i: one_hot(0, 2), lambda t: one_hot(0, 2))
    with pytest.raises(TrialFailed, match="zero-shot"):
        zeroshot(data, model)


# ------------------------------------------------------------------------------ helpers directly


def test_first_hit_ranks_counts_ties_against_and_handles_chunks():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    keys_q, keys_g = torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2])
    # q0: relevant g0 scores 1, g2 (irrelevant) ties -> rank 1; q1: relevant g0 scores 0, g1 beats it
    # and g2 ties -> 2; q2: relevant g2 scores 1, ties with g0 and g1 -> rank 2
    expected = torch.tensor([1, 2, 2])
    assert torch.equal(evaluation.first_hit_ranks(q, g, keys_q, keys_g), expected)
    assert torch.equal(evaluation.first_hit_ranks(q, g, keys_q, keys_g, chunk=2), expected)
    assert evaluation.recall_at(expected, [1, 2, 3]) == {1: 0.0, 2: pytest.approx(1 / 3), 3: 1.0}


def test_to_device_moves_tensors_and_tensor_lists():
    batch = {"a": torch.ones(2), "boxes": [torch.ones(1, 4)], "captions": ["x"]}
    out = evaluation.to_device(batch, "meta")
    assert out["a"].device.type == "meta" and out["boxes"][0].device.type == "meta"
    assert out["captions"] == ["x"] and batch["a"].device.type == "cpu"


def test_retrieval_end_to_end_with_the_itc_objective():
    """objective.itc's embedding over identity-projection towers is perfect, so R@1 = 1."""
    from vlpgraph.nodes.objectives import itc as itc_mod

    class Vision(ports.VisionTower):
        width = N

        def forward(self, images):  # CLS = one-hot of the pixel value
            cls = F.one_hot(images[:, 0, 0, 0].long(), N).float()
            return torch.stack([cls, torch.zeros_like(cls)], dim=1)

    class Text(ports.TextTower):
        width = N

        def forward(self, input_ids, attention_mask):
            return F.one_hot(input_ids, N).float()

    vision, text = Vision(), Text()
    obj = itc_mod.build(itc_mod.ITCParams(embed_dim=N), {"vision": vision, "text": text}, CTX)
    with torch.no_grad():
        for proj in (obj.vision_proj, obj.text_proj):
            proj.weight.copy_(torch.eye(N))
            proj.bias.zero_()
    data = FakeData(CAPTIONS)

    class Model(ports.Model):
        modules = nn.ModuleDict({"vision": vision, "text": text, "itc": obj})
        objectives = {"itc": obj}
        tokenizer = FakeTokenizer(vocab=CAPTIONS)
        device = torch.device("cpu")

    model = Model()
    model.modules.train()
    m = retrieval(data, model, batch_size=5)
    assert m["rsum"] == 6.0
    assert obj.training and vision.training
