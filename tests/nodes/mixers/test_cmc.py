"""mixer.cmc (cross-modal CutMix), BertTower.forward_embeds and objective.mlm on mixed sentences.

The gallery and the unpaired batch here are fakes that follow the issue-11 contract (Gallery: concepts,
regions, region, sample, region_size; a batch with images, captions, input_ids, attention_mask,
sample_ids), so the mixer is tested against the contract, not against one dataset's implementation.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from tests.helpers import build_ctx, make_batch, node, shapes, text, tiny_graph, trainer, vit
from vlpgraph.engine import ports, registry
from vlpgraph.errors import UserError
from vlpgraph.layers.tokenizer import WordPieceTokenizer, train_wordpiece
from vlpgraph.nodes.encoders.text import TextParams, build_bert
from vlpgraph.nodes.encoders.vit import ViTParams, build_vit
from vlpgraph.nodes.mixers import cmc as cmc_mod
from vlpgraph.nodes.objectives import mlm as mlm_mod

COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SHAPES = ("circle", "square", "triangle", "cross")
CONCEPTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SIZES = ("small", "big", "tiny", "large")
PLACES = ("on the left", "at the top", "in the middle", "")


# ------------------------------------------------------------------------------------------ fakes


class FakeGallery:
    """The contract's Gallery: three regions per concept, each a fixed random image of region_size."""

    def __init__(self, concepts=CONCEPTS, per_concept: int = 3, region_size: int = 16):
        self.concepts = list(concepts)
        self.region_size = region_size
        self._regions = {c: [i * per_concept + j for j in range(per_concept)] for i, c in enumerate(self.concepts)}
        self._concept = {r: c for c, rs in self._regions.items() for r in rs}
        self.calls = 0

    def regions(self, concept: str) -> list[int]:
        return list(self._regions.get(concept, []))

    def region(self, rid: int):
        self.calls += 1
        g = torch.Generator().manual_seed(1000 + rid)
        image = torch.randn(3, self.region_size, self.region_size, generator=g)
        return image, self._concept[rid], rid // 2, (0, 0, 4, 4)

    def sample(self, concept: str, generator: torch.Generator) -> int:
        rs = self._regions[concept]
        return rs[int(torch.randint(len(rs), (1,), generator=generator))]


class FakeUnpairedData(ports.PairedData):
    def __init__(self, captions: list[str], gallery: FakeGallery | None = None):
        self.captions = captions
        self.gallery = gallery if gallery is not None else FakeGallery()
        self.capabilities = frozenset({"unpaired", "gallery"})

    def train_captions(self) -> list[str]:
        return self.captions


def phrase(rng: random.Random, plurals: bool = True) -> tuple[str, int]:
    """A noun phrase as the shapes captions write one, and how many concept mentions it has (0 or 1)."""
    c, s = rng.choice(COLOURS), rng.choice(SHAPES)
    kind = rng.random()
    if kind < 0.15 and plurals:
        # "red circles" does not name the concept "red circle"; the tokenizer never saw a plural, so
        # it spells "circles" as circle ##s
        return f"two {c} {s}{'es' if s == 'cross' else 's'}", 0
    if kind < 0.25:
        return f"a {c} shape", 0
    size = rng.choice(SIZES) + " " if rng.random() < 0.6 else ""
    return f"a {size}{c} {s} {rng.choice(PLACES)}".strip(), 1


def make_captions(n: int, seed: int = 0, plurals: bool = True) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    caps, counts = [], []
    for _ in range(n):
        parts = [phrase(rng, plurals) for _ in range(rng.randint(1, 2))]
        caps.append(" and ".join(p for p, _ in parts))
        counts.append(sum(k for _, k in parts))
    return caps, counts


TRAIN_CAPTIONS, _ = make_captions(300, seed=123, plurals=False)


def towers(max_len: int = 24):
    tok = WordPieceTokenizer(train_wordpiece(TRAIN_CAPTIONS, 200), max_len)
    torch.manual_seed(0)
    text = build_bert(TextParams(width=16, depth=1, heads=2, max_len=max_len, attention="sdpa"), tok)
    vision = build_vit(ViTParams(image_size=16, patch_size=8, width=16, depth=1, heads=2), 16)
    return text, vision


def make_mixer(p: float = 0.5, visual_tokens: str = "cls", seed: int = 0, max_len: int = 24, gallery=None):
    text, vision = towers(max_len)
    data = FakeUnpairedData(TRAIN_CAPTIONS, gallery)
    mixer = cmc_mod.build(cmc_mod.CMCParams(p=p, visual_tokens=visual_tokens),
                          {"data": data, "vision": vision, "text": text}, build_ctx("cmc", seed))
    return mixer, text, vision, data


def caption_batch(text, captions: list[str], sample_ids=None, step: int = 0) -> dict:
    """The unpaired batch of ``captions`` (tokenized by ``text``) beside random 16 x 16 images."""
    b = len(captions)
    ids = torch.tensor(sample_ids if sample_ids is not None else range(b))
    return make_batch(b, 16, None, captions=list(captions), sample_ids=ids, step=step, **text.tokenizer(captions))


def mix(mixer, batch):
    return mixer.mix(ports.Forward(batch), batch)


# ------------------------------------------------------------------------------------------ tests


def test_kinds_are_registered_and_documented():
    kind = registry.get("mixer.cmc")
    assert kind.output is cmc_mod.CrossModalCutMix and issubclass(kind.output, ports.TextMixer)
    assert kind.inputs["data"].needs == frozenset({"gallery"})
    assert "longest" in kind.doc and "sample id" in kind.doc
    assert registry.get("objective.mlm").inputs["mixer"].optional


def test_forward_embeds_equals_forward_on_ids():
    text, _ = towers()
    text.eval()
    enc = text.tokenizer(["a big red circle on the left", "a cyan cross", "two blue squares and a tiny green triangle"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()  # padding is part of what is compared
    emb = text.bert.get_input_embeddings()
    with torch.no_grad():
        want = text(ids, mask)
        got = text.forward_embeds(emb(ids), mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-6)


def test_find_spans_longest_first_and_whole_words():
    index = cmc_mod.span_index({"circle": [5], "red circle": [3, 5], "red": [3]})
    assert cmc_mod.find_spans([1, 3, 5, 9, 2], index) == [(1, 2, "red circle")]
    assert cmc_mod.find_spans([1, 3, 9, 5, 2], index) == [(1, 1, "red"), (3, 1, "circle")]
    # followed by a continuation piece (##s): the word goes on, no concept ends there
    assert cmc_mod.find_spans([1, 3, 5, 77, 2], index, frozenset({77})) == [(1, 1, "red")]
    assert cmc_mod.find_spans([1, 5, 77, 2], index, frozenset({77})) == []


def words_of_row(out: ports.CMCBatch, i: int) -> list:
    """Row i of a CMCBatch as a list: word ids, and ("V", span index) once per visual run."""
    n = int(out.attention_mask[i].sum())
    spans = {start: k for k, (_, _, start, _) in enumerate(out.spans[i])}
    row, j = [], 0
    while j < n:
        if out.is_visual[i, j]:
            k = spans[j]  # every visual run starts where a reported span starts
            t = out.spans[i][k][3]
            assert out.is_visual[i, j:j + t].all() and (out.input_ids[i, j:j + t] == -1).all()
            row.append(("V", k))
            j += t
        else:
            row.append(int(out.input_ids[i, j]))
            j += 1
    return row


def check_row(tok, original: list[int], row: list, spans) -> None:
    """The mixed row is the original with each replaced span's words (which spell the span's concept)
    swapped for one visual run, every other token unchanged and in order."""
    i = 0
    for item in row:
        if isinstance(item, tuple):
            concept = spans[item[1]][0]
            pieces = tok.pieces([concept])[0]
            assert original[i:i + len(pieces)] == pieces, (tok.decode(original), concept)
            assert tok.decode(original[i:i + len(pieces)]) == concept
            i += len(pieces)
            # the concept's last word ends there ("red circles" does not name "red circle")
            assert i == len(original) or not tok.tok.id_to_token(original[i]).startswith("##")
        else:
            assert item == original[i]
            i += 1
    assert i == len(original)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_only_concept_spans_are_replaced_at_rate_p(p):
    mixer, text, _, data = make_mixer(p=p)
    tok = text.tokenizer
    captions, counts = make_captions(480, seed=7)
    replaced = 0
    for start in range(0, len(captions), 96):
        caps = captions[start:start + 96]
        batch = caption_batch(text, caps, sample_ids=range(start, start + len(caps)))
        out = mix(mixer, batch)
        assert out is not None
        for i in range(len(caps)):
            n = int(batch["attention_mask"][i].sum())
            original = batch["input_ids"][i, :n].tolist()
            check_row(tok, original, words_of_row(out, i), out.spans[i])
            for concept, rid, _, _ in out.spans[i]:
                assert data.gallery.region(rid)[1] == concept  # the region shows the concept it replaces
            replaced += len(out.spans[i])
        assert out.rate == pytest.approx(sum(map(len, out.spans)) / sum(counts[start:start + 96]))
    mentions = sum(counts)
    assert mentions > 400
    assert abs(replaced / mentions - p) < 0.06, (replaced, mentions)  # ~3.5 binomial standard deviations


@pytest.mark.parametrize("visual_tokens", ["cls", "patches"])
def test_visual_tokens_are_the_projected_region_tokens(visual_tokens):
    mixer, text, vision, data = make_mixer(p=1.0, visual_tokens=visual_tokens, max_len=40)
    captions, _ = make_captions(12, seed=3)
    batch = caption_batch(text, captions)
    out = mix(mixer, batch)
    t = 1 if visual_tokens == "cls" else 4
    checked = 0
    for i, spans in enumerate(out.spans):
        for concept, rid, start, n_visual in spans:
            assert n_visual == t
            image, region_concept, _, _ = data.gallery.region(rid)
            assert region_concept == concept
            with torch.no_grad():
                tokens = vision(image[None])
                tokens = tokens[:, :1] if visual_tokens == "cls" else tokens[:, 1:]
                want = mixer.proj(tokens[0]) + mixer.visual_type
            torch.testing.assert_close(out.inputs_embeds[i, start:start + t].detach(), want, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked >= 8
    # word positions hold the tower's word embeddings of the kept ids
    emb = text.bert.get_input_embeddings()
    words = out.attention_mask.bool() & ~out.is_visual
    torch.testing.assert_close(out.inputs_embeds[words].detach(), emb(out.input_ids[words]).detach())
    # one vision pass for all of the step's regions, through the Forward
    assert batch["cmc_regions/cmc"].shape[0] == sum(map(len, out.spans))


def test_patches_never_overflow_the_text_tower():
    mixer, text, _, _ = make_mixer(p=1.0, visual_tokens="patches", max_len=16)
    batch = caption_batch(text, ["a red circle and a blue square and a green cross"])
    assert int(batch["attention_mask"].sum()) == 13  # one piece per word, [CLS] and [SEP]
    out = mix(mixer, batch)
    # each replacement turns 2 word tokens into 4 patch tokens: the first fits (15), a second would not (17)
    assert [c for c, *_ in out.spans[0]] == ["red circle"] and int(out.attention_mask.sum()) == 15
    with torch.no_grad():
        assert torch.isfinite(text.forward_embeds(out.inputs_embeds, out.attention_mask)).all()


def test_same_seed_step_and_sample_mix_the_same_whatever_the_batch():
    mixer, text, _, _ = make_mixer(p=0.5)
    captions, _ = make_captions(40, seed=11)
    one = mix(mixer, caption_batch(text, captions[:8], sample_ids=range(8), step=5))
    others = [captions[7]] + captions[20:30] + [captions[3]]  # sample 3 elsewhere, among other sentences
    two = mix(mixer, caption_batch(text, others, sample_ids=[7, *range(20, 30), 3], step=5))

    def row(out, i):
        n = int(out.attention_mask[i].sum())
        return out.spans[i], out.input_ids[i, :n].tolist(), out.inputs_embeds[i, :n].detach()

    for i, j in ((3, 11), (7, 0)):
        a, b = row(one, i), row(two, j)
        assert a[0] == b[0] and a[1] == b[1]
        torch.testing.assert_close(a[2], b[2], rtol=1e-4, atol=1e-5)
    # another step or another trial seed draws again
    later = mix(mixer, caption_batch(text, captions[:8], sample_ids=range(8), step=6))
    reseeded, *_ = make_mixer(p=0.5, seed=1)
    again = mix(reseeded, caption_batch(text, captions[:8], sample_ids=range(8), step=5))
    assert later.spans != one.spans and again.spans != one.spans


def test_none_when_not_training_or_nothing_replaced():
    mixer, text, _, data = make_mixer(p=1.0)
    batch = caption_batch(text, ["a red circle", "a blue square on the left"])
    mixer.eval()
    assert mix(mixer, batch) is None
    mixer.train()
    assert mix(mixer, batch) is not None
    never, *_ = make_mixer(p=0.0)
    assert mix(never, batch) is None
    calls = data.gallery.calls
    assert mix(mixer, caption_batch(text, ["two red circles", "a cyan shape"])) is None  # no concept named
    assert data.gallery.calls == calls  # and no region was read for it


def test_mix_is_memoised_per_forward():
    mixer, text, _, data = make_mixer(p=1.0)
    batch = caption_batch(text, ["a red circle", "a blue square on the left"])
    fwd = ports.Forward(batch)
    first = mixer.mix(fwd, batch)
    calls = data.gallery.calls
    assert mixer.mix(fwd, batch, text) is first and data.gallery.calls == calls


def test_build_refuses_what_it_cannot_mix_with():
    text, vision = towers()
    with pytest.raises(UserError, match="no gallery"):
        cmc_mod.build(cmc_mod.CMCParams(), {"data": _no_gallery(), "vision": vision, "text": text}, build_ctx("cmc"))

    class NoEmbeds(ports.TextTower):
        def __init__(self):
            super().__init__()
            self.width, self.tokenizer = 16, text.tokenizer

    with pytest.raises(UserError, match="forward_embeds"):
        cmc_mod.build(cmc_mod.CMCParams(), {"data": FakeUnpairedData(TRAIN_CAPTIONS), "vision": vision,
                                            "text": NoEmbeds()}, build_ctx("cmc"))


def _no_gallery():
    data = FakeUnpairedData(TRAIN_CAPTIONS)
    data.gallery = None
    return data


def test_unknown_concepts_and_concepts_without_regions_are_left_out():
    gallery = FakeGallery(concepts=CONCEPTS + ["zebra"])
    gallery._regions["blue cross"] = []
    mixer, text, _, _ = make_mixer(gallery=gallery)
    # no 'z' in the captions the WordPiece was trained on: "zebra" is [UNK], which would match any unknown word
    assert text.tokenizer.tok.token_to_id("[UNK]") in text.tokenizer.pieces(["zebra"])[0]
    assert "zebra" not in mixer.concepts and "blue cross" not in mixer.concepts and "red circle" in mixer.concepts
    out = mix(mixer, caption_batch(text, ["a blue cross and a red circle"] * 8))
    assert out is not None and all(c == "red circle" for spans in out.spans for c, *_ in spans)


# ------------------------------------------------------------------------------- MLM on mixed text


def make_mlm(p: float = 1.0, **params):
    mixer, text, vision, data = make_mixer(p=p)
    mlm = mlm_mod.build(mlm_mod.MLMParams(**params), {"mixer": mixer}, build_ctx("mlm"))
    return mlm, mixer, text


def test_mlm_on_mixed_sentences_never_predicts_visual_positions():
    mlm, mixer, text = make_mlm(p=1.0, mask_prob=1.0)
    captions, _ = make_captions(16, seed=5)
    batch = caption_batch(text, captions)
    fwd = ports.Forward(batch)
    labels, hidden = mlm.mixed(fwd)
    cmc = mixer.mix(fwd, batch)  # the memoised view the MLM masked
    assert cmc.is_visual.any()
    assert (labels[cmc.is_visual] == -100).all()
    tok = text.tokenizer
    words = cmc.attention_mask.bool() & ~cmc.is_visual & ~torch.isin(
        cmc.input_ids, torch.tensor([tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id]))
    assert (labels[words] == cmc.input_ids[words]).all()  # mask_prob 1: every remaining word is predicted
    assert hidden.shape[:2] == cmc.input_ids.shape
    fresh = caption_batch(text, captions)
    out = mlm(ports.Forward(fresh), fresh)
    assert torch.isfinite(out["mlm"])
    out["mlm"].backward()
    # the visual tokens are read by the tower: the projection and the vision tower learn from MLM
    assert mixer.proj.weight.grad is not None and mixer.proj.weight.grad.abs().sum() > 0
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in mixer.vision.parameters())


def test_mlm_visual_positions_keep_their_tokens_and_words_are_masked():
    mlm, mixer, text = make_mlm(p=1.0, mask_prob=1.0, replace_mask=1.0, replace_random=0.0)
    batch = caption_batch(text, ["a big red circle on the left", "a cyan cross and a blue square"])
    fwd = ports.Forward(batch)
    seen = {}
    real = text.forward_embeds

    def spy(embeds, mask):
        seen["embeds"] = embeds
        return real(embeds, mask)

    text.forward_embeds = spy
    labels, _ = mlm.mixed(fwd)
    cmc = mixer.mix(fwd, batch)
    mask_vec = text.bert.get_input_embeddings().weight[text.tokenizer.mask_id]
    torch.testing.assert_close(seen["embeds"][cmc.is_visual], cmc.inputs_embeds[cmc.is_visual])
    chosen = labels != -100
    torch.testing.assert_close(seen["embeds"][chosen], mask_vec.expand(int(chosen.sum()), -1))


def test_mlm_without_replacements_is_text_only_mlm():
    mlm, mixer, text = make_mlm(p=0.0, mask_prob=0.5)
    batch = caption_batch(text, ["a big red circle on the left", "a cyan cross"])
    out = mlm(ports.Forward(batch), batch)
    assert torch.isfinite(out["mlm"])
    assert mlm.head.decoder.weight is text.bert.get_input_embeddings().weight


def test_mlm_takes_fusion_or_mixer():
    mixer, *_ = make_mixer()
    kind = registry.get("objective.mlm")
    assert kind.check(mlm_mod.MLMParams(), {"mixer": [{}]}) == []
    assert kind.check(mlm_mod.MLMParams(), {"fusion": [{}]}) == []
    assert "not both" in kind.check(mlm_mod.MLMParams(), {"fusion": [{}], "mixer": [{}]})[0]
    assert "not neither" in kind.check(mlm_mod.MLMParams(), {})[0]
    with pytest.raises(UserError, match="not neither"):
        mlm_mod.build(mlm_mod.MLMParams(), {"fusion": None, "mixer": None}, build_ctx("mlm"))  # as compile passes them
    with pytest.raises(UserError, match="not both"):
        mlm_mod.build(mlm_mod.MLMParams(), {"fusion": object(), "mixer": mixer}, build_ctx("mlm"))


def test_mixer_is_a_trainable_module_of_the_trial():
    mixer, text, vision, _ = make_mixer()
    names = {n for n, _ in mixer.named_parameters()}
    assert names == {"proj.weight", "proj.bias", "visual_type"}  # the towers are held by reference
    assert isinstance(mixer, nn.Module)


VLMIXER = tiny_graph(graph="t", nodes={
    "shapes": shapes(), "vision": vit(), "text": text(),
    "fusion": node("encoder.fusion", {"text": "text", "vision": "vision"}),
    "cmc": node("mixer.cmc", {"data": "shapes", "vision": "vision", "text": "text"}),
    "mlm": node("objective.mlm", {"mixer": "cmc", "fusion": "fusion"}),
    "cmcl": node("objective.cmcl", {"text": "text", "mixer": "cmc"}),
    "train": trainer("mlm", "cmcl")})


def test_validation_of_the_wiring(tmp_path, capsys):
    from vlpgraph.cli import main

    path = tmp_path / "g.yaml"
    path.write_text(VLMIXER)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    # paired shapes data has no gallery; an MLM wired to both a fusion encoder and a mixer is refused
    assert "input 'data' needs data with gallery, which 'shapes' (dataset.shapes) does not provide" in err
    assert "wire 'fusion'" in err and "not both" in err


def test_sample_rows_show_the_mixed_sentence_and_its_regions():
    import io

    from PIL import Image

    mixer, text, _, data = make_mixer(p=1.0)
    captions = ["a cyan shape", "a big red circle on the left and a blue square"]
    batch = caption_batch(text, captions, sample_ids=[40, 41])
    out = mix(mixer, batch)
    rows = mixer.sample_rows(batch, cmc=out)
    mixer.eval()  # an evaluator's call: mixed anyway, the same draws
    assert mixer.sample_rows(batch) == rows
    assert len(rows) == 1  # the first sentence names no concept: nothing to show
    row = rows[0]
    (_, r1, _, _), (_, r2, _, _) = out.spans[1]
    assert row["kind"] == "cmc" and row["sample_id"] == 41 and row["reference"] == captions[1]
    assert row["text"] == f"a big [red circle #{r1}] on the left and a [blue square #{r2}]"
    assert [s["concept"] for s in row["info"]["spans"]] == ["red circle", "blue square"]
    assert Image.open(io.BytesIO(row["image"])).size == (2 * 16, 16)  # the two regions side by side
