"""encoder.fusion, objective.itm, objective.mlm, objective.prefixlm: masks, sampling, masking ratios, causality."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_model, save_model
from torch import nn

from tests.helpers import FakeVision, build_ctx
from vlpgraph.engine import ports, registry
from vlpgraph.layers.attention import set_attention_backend
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower, TokenHead
from vlpgraph.nodes.encoders import fusion as fusion_mod
from vlpgraph.nodes.objectives import itc as itc_mod
from vlpgraph.nodes.objectives import itm as itm_mod
from vlpgraph.nodes.objectives import mlm as mlm_mod
from vlpgraph.nodes.objectives import prefixlm as plm_mod

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 40
VISION_WIDTH = 12  # the fake ViT's token width, not the text's


def _kind(name: str) -> registry.NodeKind:
    # the modules above registered their kinds; registry.get() would import every node module
    return registry._KINDS[name]


class FakeTokenizer(ports.Tokenizer):
    vocab_size, max_len, pad_id, cls_id, sep_id, mask_id, content_hash = VOCAB, 16, PAD, CLS, SEP, MASK, "fake"


class FakeText(ports.TextTower):
    """ids [B, L] -> [B, L, width]: own embedding + position + the mean of the attendable tokens
    (so a token sees exactly the keys its mask allows). Counts its calls."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.width = width
        self.tokenizer = FakeTokenizer()
        self.emb = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(16, width) * 0.1)
        self.calls = 0

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        x = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        m = attention_mask[..., None].float()
        context = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        return torch.tanh(x + context)


def make_fusion(text=None, vision=None, **params) -> FusionTower:
    torch.manual_seed(0)
    text, vision = text or FakeText(), vision or FakeVision(VISION_WIDTH)
    p = fusion_mod.FusionParams(**params)
    return fusion_mod.build(p, {"text": text, "vision": vision}, build_ctx("fusion")).eval()


def make_batch(b: int = 4, length: int = 8, seed: int = 0, lengths=None) -> dict:
    """Captions [CLS] w.. [SEP] [PAD].. with words in 5..VOCAB-1 and the given lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [length - (i % 3) for i in range(b)]
    ids = torch.full((b, length), PAD)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = CLS, SEP
    return {
        "images": torch.randn(b, 3, 4, 4, generator=g),
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
    }


# ------------------------------------------------------------------------------- registrations


@pytest.mark.parametrize("name", ["encoder.fusion", "objective.itm", "objective.mlm", "objective.prefixlm"])
def test_kinds_are_documented(name):
    kind = _kind(name)
    assert kind.summary and len(kind.doc) > 300
    for field, info in kind.params.model_fields.items():
        assert info.description, f"{name}.{field}"
    assert issubclass(kind.output, FusionTower if name == "encoder.fusion" else ports.Objective)
    if name != "encoder.fusion":
        assert kind.inputs["fusion"].type_tuple == (FusionTower,)


def test_fusion_params_and_width_check():
    p = fusion_mod.FusionParams()
    assert (p.depth, p.heads, p.mlp_ratio, p.attention, p.dropout) == (2, 2, 4.0, "auto", 0.0)
    with pytest.raises(UserError, match="divisible by heads"):
        make_fusion(heads=3)  # text width 8
    with pytest.raises(ValidationError):
        fusion_mod.FusionParams(attention="flash")


# ------------------------------------------------------------------------------------- fusion


def test_fusion_is_bidirectional_and_reads_the_image():
    fus = make_fusion()
    b = make_batch()
    text = torch.randn(4, 8, 8)
    mask = torch.ones(4, 8, dtype=torch.long)
    out = fus(text, mask, FakeVision(VISION_WIDTH)(b["images"]))
    assert out.shape == (4, 8, 8) and fus.width == 8
    later = text.clone()
    later[:, 5] += 1.0
    assert (fus(later, mask, FakeVision(VISION_WIDTH)(b["images"]))[:, 0] - out[:, 0]).abs().max() > 1e-4  # token 0 sees token 5
    torch.manual_seed(1)
    other = FakeVision(VISION_WIDTH)(b["images"])
    torch.manual_seed(0)
    assert (fus(text, mask, other)[:, 0] - out[:, 0]).abs().max() > 1e-4  # and the image


def test_fusion_padding_does_not_change_real_tokens():
    fus = make_fusion()
    image = torch.randn(2, 5, 12)
    text = torch.randn(2, 5, 8)
    short = fus(text, torch.ones(2, 5, dtype=torch.long), image)
    padded_text = torch.cat([text, torch.randn(2, 3, 8) * 10], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)
    long = fus(padded_text, mask, image)
    assert (long[:, :5] - short).abs().max().item() < 1e-5


@pytest.mark.parametrize("other", ["math", "auto"])
def test_fusion_backends_agree(other):
    fus = make_fusion(attention="sdpa")
    image, text = torch.randn(3, 5, 12), torch.randn(3, 6, 8)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    ref = fus(text, mask, image)
    assert set_attention_backend(fus, other) == 4  # self + cross attention in each of 2 layers
    torch.testing.assert_close(fus(text, mask, image), ref, atol=1e-5, rtol=1e-5)


def test_fuse_memoises_towers_and_fusion():
    text, vision = FakeText(), FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    batch = make_batch()
    fwd = ports.Forward(batch)
    a = fus.fuse(fwd)
    assert fus.fuse(fwd) is a and (text.calls, vision.calls) == (1, 1)
    assert fwd.text_tokens(text) is fwd.text_tokens(text)  # the same memo ITC reads
    assert text.calls == 1
    # towers are references, not submodules (they are their own graph nodes)
    assert not any(k.startswith(("text", "vision", "_towers")) for k in fus.state_dict())


# ---------------------------------------------------------------------------------------- ITM


def make_itm(text=None, vision=None):
    text, vision = text or FakeText(), vision or FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    itc = itc_mod.build(itc_mod.ITCParams(embed_dim=4), {"vision": vision, "text": text}, build_ctx("itc"))
    itm = itm_mod.build(itm_mod.ITMParams(), {"fusion": fus, "itc": itc}, build_ctx("itm"))
    return itm, itc, fus, text, vision


def test_negative_never_the_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.eye(5) * 20 + torch.randn(5, 5, generator=g)  # the positive is by far the most similar
    for _ in range(300):
        assert not (itm_mod.sample_negatives(sim, generator=g) == torch.arange(5)).any()
    two = torch.tensor([[9.0, -9.0], [-9.0, 9.0]])
    draws = torch.stack([itm_mod.sample_negatives(two, generator=g) for _ in range(200)])
    assert (draws == torch.tensor([1, 0])).all()


def test_negative_sampling_follows_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 3.0  # text 2 is a hard negative for image 0
    counts = torch.bincount(torch.stack([itm_mod.sample_negatives(sim, generator=g)[0] for _ in range(2000)]), minlength=4)
    assert counts[0] == 0
    p2 = counts[2].item() / 2000
    expected = (torch.e**3 + 1e-4 * 6) / (torch.e**3 + 2 + 3e-4 * 6)  # ≈ 0.91
    assert abs(p2 - expected) < 0.03 and counts[1] > 0 and counts[3] > 0


def test_duplicate_captions_are_never_negatives():
    ids = torch.tensor([[2, 7, 3, 0], [2, 7, 3, 0], [2, 8, 3, 0], [2, 7, 3, 5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    dup = itm_mod.same_caption(ids, mask)
    assert dup.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, False], [False, False, False, True]]
    g = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = 10.0  # the duplicate looks like the hardest negative
    for _ in range(200):
        neg = itm_mod.sample_negatives(sim, dup, generator=g)
        assert neg[0] not in (0, 1) and neg[1] not in (0, 1)
    # every other caption a duplicate: falls back to any other index rather than failing
    all_dup = torch.ones(2, 2, dtype=torch.bool)
    assert itm_mod.sample_negatives(torch.zeros(2, 2), all_dup, generator=g).tolist() == [1, 0]


def test_itm_pairs_labels_and_gradients():
    itm, itc, fus, text, vision = make_itm()
    batch = make_batch(b=5)
    fwd = ports.Forward(batch)
    logits, labels, neg_text, neg_image = itm.pairs(fwd)
    assert logits.shape == (15, 2) and labels.tolist() == [1] * 5 + [0] * 10
    assert not (neg_text == torch.arange(5)).any() and not (neg_image == torch.arange(5)).any()
    # ITM ran first and computed the embeddings; ITC on the same Forward still trains the towers
    out = {**itm(fwd, batch), **itc(fwd, batch)}
    assert (text.calls, vision.calls) == (1, 1)  # no extra tower pass for negatives or similarity
    (out["itm"] + out["itc"]).backward()
    assert torch.isfinite(out["itm"]) and out["itm"].dim() == 0
    for p in (itm.head.weight, fus.layers[0].cross_attn.key.weight, text.emb.weight, vision.proj.weight,
              itc.vision_proj.weight, itc.temp):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_itm_needs_an_embedder():
    fus = make_fusion()

    class NotEmbedder(ports.Objective):
        pass

    with pytest.raises(UserError, match="image-text embedding"):
        itm_mod.build(itm_mod.ITMParams(), {"fusion": fus, "itc": NotEmbedder()}, build_ctx("itm"))


# ---------------------------------------------------------------------------------------- MLM


def test_masking_ratios_and_special_tokens():
    g = torch.Generator().manual_seed(0)
    batch = make_batch(b=3000, length=12, lengths=[12 - (i % 6) for i in range(3000)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked, labels = mlm_mod.mask_tokens(ids, mask, special_ids=(PAD, CLS, SEP, MASK), mask_id=MASK,
                                         vocab_size=VOCAB, generator=g)
    eligible = mask.bool() & (ids != CLS) & (ids != SEP)
    chosen = labels != -100
    assert not (chosen & ~eligible).any()  # never PAD / CLS / SEP
    assert (masked[~chosen] == ids[~chosen]).all()  # untouched elsewhere
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (masked[chosen] == MASK).sum().item() / n
    kept = (masked[chosen] == ids[chosen]).sum().item() / n
    random = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(random - 0.1) < 0.02
    rnd = masked[chosen & (masked != MASK) & (masked != ids)]
    assert not torch.isin(rnd, torch.tensor([PAD, CLS, SEP, MASK])).any()  # random words are never specials


def test_masking_forces_one_token_per_row_when_none_drawn():
    batch = make_batch(b=6)
    _, labels = mlm_mod.mask_tokens(batch["input_ids"], batch["attention_mask"], special_ids=(PAD, CLS, SEP, MASK),
                                    mask_id=MASK, vocab_size=VOCAB, mask_prob=1e-9,
                                         generator=torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(1) == 1).all()
    assert (labels[:, 0] == -100).all()


def test_mlm_params_validated():
    with pytest.raises(ValidationError, match="exceeds 1"):
        mlm_mod.MLMParams(replace_mask=0.8, replace_random=0.3)
    p = mlm_mod.MLMParams()
    assert (p.weight, p.mask_prob, p.replace_mask, p.replace_random, p.tie_embeddings) == (1.0, 0.15, 0.8, 0.1, True)


def test_mlm_forward_uses_its_own_text_pass_and_a_tied_head():
    text, vision = FakeText(), FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    mlm = mlm_mod.build(mlm_mod.MLMParams(mask_prob=0.5), {"fusion": fus}, build_ctx("mlm"))
    assert mlm.head.decoder.weight is text.emb.weight
    batch = make_batch(b=4)
    fwd = ports.Forward(batch)
    fus.fuse(fwd)  # a clean pass (as ITM would)
    out = mlm(fwd, batch)
    assert "mlm_input_ids" in batch and not torch.equal(batch["mlm_input_ids"], batch["input_ids"])
    assert (text.calls, vision.calls) == (2, 1)  # masked captions: a second text pass; the image pass shared
    assert torch.isfinite(out["mlm"])
    out["mlm"].backward()
    assert text.emb.weight.grad is not None and fus.layers[0].self_attn.query.weight.grad is not None
    untied = mlm_mod.build(mlm_mod.MLMParams(tie_embeddings=False), {"fusion": fus}, build_ctx("mlm"))
    assert untied.head.decoder.weight is not text.emb.weight and untied.head.decoder.out_features == VOCAB


def test_tied_head_round_trips_through_a_checkpoint(tmp_path):
    text, vision = FakeText(), FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    mlm = mlm_mod.build(mlm_mod.MLMParams(), {"fusion": fus}, build_ctx("mlm"))
    modules = nn.ModuleDict({"text": text, "vision": vision, "fusion": fus, "mlm": mlm})
    save_model(modules, str(tmp_path / "m.safetensors"))
    text2, vision2 = FakeText(), FakeVision(VISION_WIDTH)
    fus2 = FusionTower(text2, vision2)
    mlm2 = mlm_mod.MLM(fus2, mlm_mod.MLMParams())
    again = nn.ModuleDict({"text": text2, "vision": vision2, "fusion": fus2, "mlm": mlm2})
    load_model(again, str(tmp_path / "m.safetensors"), strict=True)
    assert mlm2.head.decoder.weight is text2.emb.weight
    torch.testing.assert_close(text2.emb.weight, text.emb.weight)


def test_untied_head_without_exposed_embeddings():
    class Plain(FakeText):
        get_input_embeddings = None

    fus = make_fusion(Plain(), FakeVision(VISION_WIDTH))
    with pytest.raises(UserError, match="tie_embeddings"):
        mlm_mod.build(mlm_mod.MLMParams(), {"fusion": fus}, build_ctx("mlm"))
    assert isinstance(mlm_mod.build(mlm_mod.MLMParams(tie_embeddings=False), {"fusion": fus}, build_ctx("mlm")).head, TokenHead)


# ----------------------------------------------------------------------------------- PrefixLM


def test_prefix_lm_mask():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    m = plm_mod.prefix_lm_mask(mask, torch.tensor([2]))[0].int().tolist()
    assert m == [
        [1, 1, 0, 0, 0],  # prefix: the whole prefix, nothing after
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # suffix: prefix + itself and earlier
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],  # a pad query: never a pad key
    ]


def test_split_points_are_word_starts_in_range():
    batch = make_batch(b=200, length=10)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cont = torch.zeros(VOCAB, dtype=torch.bool)
    cont[20:] = True  # ids >= 20 continue a word
    g = torch.Generator().manual_seed(0)
    splits = torch.cat([plm_mod.split_points(ids, mask, cont, generator=g) for _ in range(5)])
    rows = ids.repeat(5, 1)
    lengths = mask.sum(1).repeat(5)
    assert ((splits >= 1) & (splits <= lengths - 1)).all()
    at = rows.gather(1, splits[:, None]).squeeze(1)
    assert ((at < 20) | (splits == lengths - 1)).all()
    assert len(set(splits.tolist())) > 4  # not stuck at one point
    assert (splits == 1).any() and (splits == lengths - 1).any()


def _real_bert():
    from vlpgraph.nodes.encoders.text import TextParams, build_bert
    from vlpgraph.layers.tokenizer import WordPieceTokenizer, train_wordpiece

    caps = [f"a {c} {s} left of a {c2} {s}" for c in ("red", "blue", "green") for c2 in ("red", "teal") for s in ("circle", "star")]
    tok = WordPieceTokenizer(train_wordpiece(caps, 120), 16)
    torch.manual_seed(0)
    return build_bert(TextParams(width=16, depth=1, heads=2, max_len=16, attention="sdpa"), tok).eval()


@pytest.mark.parametrize("tower", ["fake", "bert"])
def test_prefixlm_logits_do_not_see_later_tokens(tower):
    text = FakeText() if tower == "fake" else _real_bert()
    vision = FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    plm = plm_mod.build(plm_mod.PrefixLMParams(), {"fusion": fus}, build_ctx("prefixlm")).eval()
    vocab = text.tokenizer.vocab_size
    batch = make_batch(b=3, length=10, lengths=[10, 10, 9])
    batch["input_ids"] = batch["input_ids"].clamp_max(vocab - 1)
    split = torch.tensor([3, 1, 4])
    t = 5  # perturb tokens after position t (suffix for every row), keep lengths
    logits, targets, predicted = plm.logits(ports.Forward(dict(batch)), split)
    assert logits.shape == (3, 9, vocab) and targets.shape == (3, 9)
    assert predicted[0].tolist() == [False, False] + [True] * 7 and predicted[2, -1].item() is False
    changed = dict(batch)
    ids = batch["input_ids"].clone()
    real = batch["attention_mask"].bool()
    later = torch.zeros_like(real)
    later[:, t + 1 :] = True
    swap = later & real & (ids != text.tokenizer.sep_id)
    ids[swap] = (ids[swap] + 7 - 5) % (vocab - 5) + 5  # other words
    changed["input_ids"] = ids
    logits2, _, _ = plm.logits(ports.Forward(changed), split)
    assert (logits2[:, : t + 1] - logits[:, : t + 1]).abs().max().item() < 1e-5
    assert (logits2[:, t + 1 :] - logits[:, t + 1 :]).abs().max().item() > 1e-4
    # and the prefix is read bidirectionally: changing a prefix token moves the logit at position 0
    pre = dict(batch)
    ids = batch["input_ids"].clone()
    ids[0, 2] = (ids[0, 2] + 1 - 5) % (vocab - 5) + 5
    pre["input_ids"] = ids
    logits3, _, _ = plm.logits(ports.Forward(pre), split)
    assert (logits3[0, 0] - logits[0, 0]).abs().max().item() > 1e-4


def test_prefixlm_forward_trains():
    text, vision = FakeText(), FakeVision(VISION_WIDTH)
    fus = make_fusion(text, vision)
    plm = plm_mod.build(plm_mod.PrefixLMParams(weight=0.5), {"fusion": fus}, build_ctx("plm"))
    assert plm.weight == 0.5 and plm.head.decoder.weight is text.emb.weight
    batch = make_batch(b=4)
    fwd = ports.Forward(batch)
    fus.fuse(fwd)
    out = plm(fwd, batch)
    assert set(out) == {"prefixlm"} and torch.isfinite(out["prefixlm"])
    assert "plm_attention_mask" in batch and (batch["plm_attention_mask"] <= batch["attention_mask"]).all()
    assert (text.calls, vision.calls) == (2, 1)  # the prefix-only text pass is its own; the image pass shared
    out["prefixlm"].backward()
    assert fus.layers[1].mlp[0].weight.grad is not None and vision.proj.weight.grad is not None
