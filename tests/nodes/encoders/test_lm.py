"""encoder.lm, the interleaved sequence builder (vlpgraph.layers.interleaved) and the tokenizer's image specials."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import build_ctx
from vlpgraph.engine import registry
from vlpgraph.layers import attention
from vlpgraph.layers import tokenizer as tokmod
from vlpgraph.layers.interleaved import IGNORE, build_sequences, place_visual
from vlpgraph.engine.ports import LanguageModel, PairedData

registry.load_builtin_kinds()

COLS, SHAPES = "red green blue yellow purple".split(), "circle square triangle star".split()


class FakeData(PairedData):
    def __init__(self, n=120, seed=0):
        r = random.Random(seed)
        self.captions = [f"A {r.choice(COLS)} {r.choice(SHAPES)} left of a {r.choice(COLS)} {r.choice(SHAPES)}."
                         for _ in range(n)]

    def train_captions(self):
        return list(self.captions)


def build_lm(tmp_path: Path, **params) -> LanguageModel:
    k = registry.get("encoder.lm")
    ctx = build_ctx("lm", cache=tmp_path / "cache")
    torch.manual_seed(0)
    return k.build(k.params(**params), {"data": FakeData()}, ctx).eval()


TINY_LM = dict(width=32, depth=2, heads=2, max_len=128)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_lm(tmp_path_factory.mktemp("lm"), **TINY_LM)


def random_docs(r: random.Random, n_docs: int, max_images: int = 4, max_words: int = 12):
    """A batch in the interleaved collate's layout: texts, layouts, image_doc, image_index."""
    texts, layouts, image_doc, image_index = [], [], [], []
    for b in range(n_docs):
        m = r.randint(0, max_images) if b else max(1, r.randint(0, max_images))
        t = [" ".join(r.choice(COLS + SHAPES) for _ in range(r.randint(0, max_words))) for _ in range(r.randint(0, m + 1))]
        entries = [("text", k) for k in range(len(t))] + [("image", j) for j in range(m)]
        r.shuffle(entries)
        # images in document order: renumber them as they appear
        order = iter(range(m))
        entries = [(w, next(order)) if w == "image" else (w, k) for w, k in entries]
        texts.append(t)
        layouts.append(entries)
        image_doc += [b] * m
        image_index += list(range(m))
    return texts, layouts, torch.tensor(image_doc, dtype=torch.long), torch.tensor(image_index, dtype=torch.long)


def expected_ids(tok, texts, layout, n):
    """The untruncated sequence of one document, written out independently of build_sequences."""
    ids = [tok.cls_id]
    for w, k in layout:
        ids += tok.pieces([texts[k]])[0] if w == "text" else [tok.soi_id] + [tok.img_id] * n + [tok.eoi_id]
    return ids + [tok.sep_id]


# ---------------------------------------------------------------------------------------- tokenizer


def test_specials_are_single_tokens_never_split_and_never_from_text(lm):
    tok = lm.tokenizer
    ids = {tok.soi_id, tok.img_id, tok.eoi_id}
    assert len(ids) == 3 and not ids & {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id}
    for t, i in zip(tokmod.IMAGE_TOKENS, (tok.soi_id, tok.img_id, tok.eoi_id)):
        assert tok.tok.token_to_id(t) == i and tok.tok.id_to_token(i) == t  # one vocabulary entry each
    # text that spells the specials never yields their ids (through either entry point)
    text = "a red <soi> circle <img><eoi> <SOI> soi img eoi"
    assert not ids & set(tok.pieces([text])[0])
    assert not ids & set(tok([text])["input_ids"][0].tolist())


def test_tokenizer_without_extras_is_unchanged():
    caps = FakeData().train_captions()
    for V in (40, 2000):
        old = tokmod.train_wordpiece(caps, V)
        new = tokmod.train_wordpiece(caps, V, tokmod.IMAGE_TOKENS)
        # no extras: same hash as the standard specials named explicitly (the cache keys of existing files)
        assert tokmod.training_hash(caps, V) == tokmod.training_hash(caps, V, tokmod.SPECIAL_TOKENS)
        assert tokmod.training_hash(caps, V, tokmod.SPECIAL_TOKENS + tokmod.IMAGE_TOKENS) != tokmod.training_hash(caps, V)
        assert not set(tokmod.IMAGE_TOKENS) & set(old.get_vocab())
        # the extras sit after the standard specials and take the room of the least frequent words
        o = sorted(old.get_vocab(), key=old.get_vocab().get)
        n = sorted(new.get_vocab(), key=new.get_vocab().get)
        assert n[:8] == list(tokmod.SPECIAL_TOKENS + tokmod.IMAGE_TOKENS)
        assert set(n[8:]) <= set(o[5:])
        dropped = set(o[5:]) - set(n[8:])
        assert len(dropped) <= 3 and all(len(w) > 1 and not w.startswith("##") for w in dropped)
        assert len(n) - len(o) == 3 - len(dropped)
        old_tok = tokmod.WordPieceTokenizer(old, 16)
        assert old_tok.content_hash == tokmod.WordPieceTokenizer(tokmod.train_wordpiece(caps, V), 16).content_hash
        assert not hasattr(old_tok, "soi_id") and old_tok.special_ids == {}
        assert tokmod.WordPieceTokenizer(new, 16, tokmod.IMAGE_TOKENS).content_hash != old_tok.content_hash


def test_cached_tokenizer_keys_on_the_specials(tmp_path):
    caps = FakeData().train_captions()
    plain, p1 = tokmod.cached_wordpiece(caps, 100, tmp_path, log=lambda m: None)
    special, p2 = tokmod.cached_wordpiece(caps, 100, tmp_path, log=lambda m: None, extra_specials=tokmod.IMAGE_TOKENS)
    assert p1.name == f"{tokmod.training_hash(caps, 100)}.json" and p1 != p2
    assert plain.token_to_id("<soi>") is None and special.token_to_id("<soi>") is not None
    with pytest.raises(Exception, match="lacks the special tokens"):
        tokmod.WordPieceTokenizer(plain, 16, tokmod.IMAGE_TOKENS)
    with pytest.raises(ValueError, match="punctuation"):
        tokmod.train_wordpiece(caps, 100, ("soi",))


# ---------------------------------------------------------------------------------- sequence builder


def test_sequences_match_the_documents_and_labels_skip_placeholders(lm):
    tok, n = lm.tokenizer, 3
    r = random.Random(1)
    texts, layouts, idoc, iidx = random_docs(r, 6)
    s = build_sequences(texts, layouts, idoc, iidx, tok, n, max_len=10_000)
    assert s.kept.all() and len(s.image_row) == len(idoc)
    for b in range(len(texts)):
        want = expected_ids(tok, texts[b], layouts[b], n)
        L = int(s.attention_mask[b].sum())
        assert s.input_ids[b, :L].tolist() == want and (s.input_ids[b, L:] == tok.pad_id).all()
    # each image's <soi> and <img> slots, in the batch's image order
    for k, (b, start, soi) in enumerate(zip(s.image_row, s.image_start, s.soi_pos)):
        assert idoc[k] == b and soi == start - 1
        assert s.input_ids[b, soi] == tok.soi_id and (s.input_ids[b, start:start + n] == tok.img_id).all()
        assert s.input_ids[b, start + n] == tok.eoi_id
        # image j of a document is its j-th block
        assert (s.input_ids[b, :soi] == tok.soi_id).sum() == iidx[k]
    # labels: the next token, -100 exactly where the target is <img>, <eoi> or padding (and at the end)
    target = torch.cat([s.input_ids[:, 1:], torch.full_like(s.input_ids[:, :1], tok.pad_id)], 1)
    tmask = torch.cat([s.attention_mask[:, 1:], torch.zeros_like(s.attention_mask[:, :1])], 1)
    ignored = (target == tok.img_id) | (target == tok.eoi_id) | (tmask == 0)
    assert torch.equal(s.labels == IGNORE, ignored)
    assert torch.equal(s.labels[~ignored], target[~ignored])
    assert (s.labels == tok.soi_id).sum() == len(idoc) and (s.labels == tok.sep_id).sum() == len(texts)


def test_truncation_never_cuts_an_image_block(lm):
    tok = lm.tokenizer
    r = random.Random(0)
    for trial in range(200):
        n = r.randint(1, 6)
        texts, layouts, idoc, iidx = random_docs(r, r.randint(1, 4))
        max_len = r.randint(n + 3, 60)
        s = build_sequences(texts, layouts, idoc, iidx, tok, n, max_len)
        assert s.input_ids.shape[1] <= max_len
        for b in range(len(texts)):
            full = expected_ids(tok, texts[b], layouts[b], n)
            L = int(s.attention_mask[b].sum())
            got = s.input_ids[b, :L].tolist()
            if len(full) <= max_len:
                assert got == full
                continue
            cut = full[:max_len]
            blocks = [i for i, t in enumerate(cut) if t == tok.soi_id]
            # the first block that does not fit whole: the sequence ends right before its <soi>
            partial = [i for i in blocks if i + n + 2 > max_len]  # block = positions i .. i+n+1
            assert got == (cut[: partial[0]] if partial else cut), (trial, b)
            ids = torch.tensor(got)
            # every <soi> kept is followed by its whole block
            for i in (ids == tok.soi_id).nonzero().flatten().tolist():
                assert ids[i + 1:i + 1 + n].eq(tok.img_id).all() and ids[i + 1 + n] == tok.eoi_id
            assert (ids == tok.img_id).sum() == n * (ids == tok.soi_id).sum()
        # kept: exactly the images whose block survived, in order within each document
        for b in range(len(texts)):
            n_blocks = int((s.input_ids[b] == tok.soi_id).sum())
            mine = (idoc == b).nonzero().flatten()
            assert s.kept[mine].tolist() == [j < n_blocks for j in iidx[mine].tolist()]
        assert len(s.image_row) == int(s.kept.sum())
        assert torch.equal(s.image_row, idoc[s.kept])


def test_place_visual_writes_exactly_the_img_slots_and_passes_gradients(lm):
    tok, n, C = lm.tokenizer, 4, lm.width
    texts, layouts, idoc, iidx = random_docs(random.Random(2), 5)
    s = build_sequences(texts, layouts, idoc, iidx, tok, n, max_len=30)
    assert 0 < s.kept.sum() < len(idoc)  # some images dropped by truncation
    visual = torch.randn(int(s.kept.sum()), n, C, requires_grad=True)
    embeds = lm.embed(s.input_ids)
    out = place_visual(embeds, visual, s.image_row, s.image_start)
    slot = s.input_ids == tok.img_id
    assert torch.equal(out[~slot], embeds[~slot])  # everything else untouched
    for k in range(len(visual)):
        b, st = s.image_row[k], s.image_start[k]
        assert torch.equal(out[b, st:st + n], visual[k])
    assert slot.sum() == visual.shape[0] * n  # and no <img> slot left unfilled
    # gradients reach the visual tokens through the LM
    hidden = lm(out, s.attention_mask)
    loss = F.cross_entropy(lm.logits(hidden).flatten(0, 1), s.labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    assert visual.grad is not None and (visual.grad.abs().sum((1, 2)) > 0).all()


# ------------------------------------------------------------------------------------------ the LM


def test_soi_context_does_not_see_what_follows(lm):
    """The hidden state at image k's <soi> is unchanged by any later token or later image."""
    tok, n, C = lm.tokenizer, 3, lm.width
    texts = [["a red circle", "two blue stars left of a square", "a green triangle"]]
    layout = [[("text", 0), ("image", 0), ("text", 1), ("image", 1), ("text", 2)]]
    idoc, iidx = torch.tensor([0, 0]), torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(2, n, C, generator=g)

    def soi_states(texts, visual):
        s = build_sequences(texts, layout, idoc, iidx, tok, n, 128)
        x = place_visual(lm.embed(s.input_ids), visual, s.image_row, s.image_start)
        with torch.no_grad():
            h = lm(x, s.attention_mask)
        return h[s.image_row, s.soi_pos], h

    base, h0 = soi_states(texts, visual)
    later_text = [[texts[0][0], "yellow yellow purple", "blue"]]
    other_second = torch.stack([visual[0], torch.randn(n, C, generator=g)])
    other_first = torch.stack([torch.randn(n, C, generator=g), visual[1]])
    for changed_texts, changed_visual in ((later_text, visual), (texts, other_second)):
        got, _ = soi_states(changed_texts, changed_visual)
        assert torch.allclose(got[0], base[0], atol=1e-6)  # image 0's context is what precedes it
    got, _ = soi_states(texts, other_second)
    assert torch.allclose(got[1], base[1], atol=1e-6)  # image 1's own visual tokens come after its <soi>
    # ...and the context does depend on what precedes it (the check above is not vacuous)
    got, _ = soi_states(texts, other_first)
    assert not torch.allclose(got[1], base[1], atol=1e-4)
    # a padded batch gives each document the same states as alone
    s2 = build_sequences(texts + [["a star"]], layout + [[("text", 0)]], idoc, iidx, tok, n, 128)
    x2 = place_visual(lm.embed(s2.input_ids), visual, s2.image_row, s2.image_start)
    with torch.no_grad():
        h2 = lm(x2, s2.attention_mask)
    assert torch.allclose(h2[0, : h0.shape[1]], h0[0], atol=1e-5)
    s1 = build_sequences([["a star"]], [[("text", 0)]], idoc[:0], iidx[:0], tok, n, 128)
    with torch.no_grad():
        h1 = lm(lm.embed(s1.input_ids), s1.attention_mask)
    assert torch.allclose(h2[1, : h1.shape[1]], h1[0], atol=1e-5)  # the padded row too


def test_lm_attention_goes_through_attend(tmp_path, monkeypatch):
    lm = build_lm(tmp_path, attention="sdpa", **{k: v for k, v in TINY_LM.items()})
    seen = []
    real = attention.attend

    def spy(q, k, v, mask=None, causal=False, backend="auto", *a, **kw):
        seen.append((backend, causal, None if mask is None else (mask.dtype, tuple(mask.shape))))
        return real(q, k, v, mask, causal, backend, *a, **kw)

    monkeypatch.setattr(attention, "attend", spy)
    ids = torch.tensor([[2, 10, 11, 12], [2, 10, 0, 0]])
    mask = (ids != 0).long()
    lm(lm.embed(ids), mask)
    assert seen == [("sdpa", False, (torch.bool, (2, 1, 4, 4)))] * 2  # one call per layer: causal + padding mask
    seen.clear()
    lm(lm.embed(ids[:1]), mask[:1])  # nothing padded: transformers passes no mask, attend runs causal
    assert seen == [("sdpa", True, None)] * 2


def test_lm_logits_tied_and_params(tmp_path, lm):
    k = registry.get("encoder.lm")
    assert issubclass(k.output, LanguageModel) and k.summary
    p = k.params()
    assert (p.width, p.depth, p.heads) == (128, 2, 2) and p.tie_embeddings
    h = torch.randn(2, 3, lm.width)
    assert torch.allclose(lm.logits(h), h @ lm.model.embed_tokens.weight.T, atol=1e-6)
    assert lm.logits(h).shape[-1] == lm.tokenizer.vocab_size
    untied = build_lm(tmp_path, tie_embeddings=False, **TINY_LM)
    assert untied.lm_head is not None and not torch.allclose(untied.logits(h), h @ untied.model.embed_tokens.weight.T)
    with pytest.raises(Exception, match="divisible by heads"):
        k.params(width=30, heads=4)


def test_lm_pretrained_roundtrip(tmp_path, lm):
    from safetensors.torch import save_file

    f = tmp_path / "lm.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in lm.model.state_dict().items()}, str(f))
    tf = tmp_path / "tokenizer.json"
    lm.tokenizer._plain.save(str(tf))
    other = build_lm(tmp_path / "o", pretrained=str(f), tokenizer=str(tf), **TINY_LM)
    ids = torch.tensor([[lm.tokenizer.cls_id, 10, 11]])
    assert torch.allclose(other(other.embed(ids)), lm(lm.embed(ids)), atol=1e-6)
    bad = tmp_path / "plain.json"
    bad.write_text(tokmod.train_wordpiece(FakeData().train_captions(), 100).to_str())
    with pytest.raises(Exception, match="lacks the special tokens"):
        build_lm(tmp_path / "b", tokenizer=str(bad), **TINY_LM)


def test_lm_matches_transformers_own_attention(lm):
    ids = torch.tensor([[2, 10, 11, 12, 13], [2, 14, 15, 0, 0]])
    mask = (ids != 0).long()
    ours = lm(lm.embed(ids), mask)
    try:
        lm.model.set_attn_implementation("eager")
        theirs = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        lm.attention_backend = lm.attention_backend  # back to the routed implementation
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5
