"""encoder.vit and encoder.text: backends agree on whole towers, masks, forward_blocks, tokenizer cache,
local checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from tests.helpers import build_ctx
from vlpgraph.engine import registry
from vlpgraph.layers import attention
from vlpgraph.layers import tokenizer as tokmod
from vlpgraph.layers.attention import set_attention_backend
from vlpgraph.errors import UserError
from vlpgraph.engine.ports import PairedData, TextTower, Tokenizer, VisionTower

TOL = 1e-5
CUDA = torch.cuda.is_available()


class FakeData(PairedData):
    def __init__(self, n=200, image_size=32, seed=0):
        r = random.Random(seed)
        cols, shapes = "red green blue yellow purple".split(), "circle square triangle star".split()
        self.captions = [
            f"A {r.choice(cols)} {r.choice(shapes)} left of a {r.choice(cols)} {r.choice(shapes)}." for _ in range(n)
        ]
        self.image_size = image_size

    def train_captions(self):
        return list(self.captions)


def vit_kind():
    return registry.get("encoder.vit")


def text_kind():
    return registry.get("encoder.text")


def build_vit(tmp_path, inputs=None, **params):
    k = vit_kind()
    torch.manual_seed(0)
    return k.build(k.params(**params), inputs or {}, build_ctx("enc", cache=tmp_path / "cache")).eval()


def build_text(tmp_path, data=None, logs=None, **params):
    k = text_kind()
    torch.manual_seed(0)
    ctx = build_ctx("enc", cache=tmp_path / "cache", log=logs)
    return k.build(k.params(**params), {"data": data or FakeData()}, ctx).eval()


def maxdiff(a, b):
    return (a - b).abs().max().item()


TINY_VIT = dict(width=32, depth=2, heads=2)
TINY_TEXT = dict(width=32, depth=2, heads=2, max_len=16)


# ------------------------------------------------------------------------------------------- ViT


def test_vit_registration_and_params():
    k = vit_kind()
    assert issubclass(k.output, VisionTower)
    assert k.inputs["data"].optional
    assert k.summary and "block" in k.doc
    for name, f in k.params.model_fields.items():
        assert f.description, name
    with pytest.raises(ValidationError, match="divisible by heads"):
        k.params(width=100, heads=3)
    with pytest.raises(ValidationError, match="divisible by patch_size"):
        k.params(image_size=30, patch_size=4)
    with pytest.raises(ValidationError):
        k.params(attention="flash")
    with pytest.raises(ValidationError):
        k.params(widht=64)


def test_vit_shapes_and_inherited_image_size(tmp_path):
    v = build_vit(tmp_path, **TINY_VIT)
    assert (v.width, v.patch_size, v.grid_size, v.num_prefix_tokens) == (32, 4, (8, 8), 1)
    assert v(torch.randn(2, 3, 32, 32)).shape == (2, 65, 32)
    v = build_vit(tmp_path, inputs={"data": FakeData(image_size=48)}, patch_size=8, **TINY_VIT)
    assert v.grid_size == (6, 6) and v(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)
    with pytest.raises(UserError, match="48 px"):
        build_vit(tmp_path, inputs={"data": FakeData(image_size=48)}, image_size=32, **TINY_VIT)
    with pytest.raises(UserError, match="patch_size 4 does not divide the image size 30"):
        build_vit(tmp_path, inputs={"data": FakeData(image_size=30)}, **TINY_VIT)


def test_vit_sdpa_and_math_agree_on_whole_tower(tmp_path):
    v = build_vit(tmp_path)  # default size: width 128, depth 4, heads 2
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert set_attention_backend(v, "sdpa") == 4
    a = v(x)
    assert set_attention_backend(v, "math") == 4
    b = v(x)
    d = maxdiff(a, b)
    print(f"ViT whole tower |sdpa - math| max = {d:.2e}")
    assert d <= TOL


def test_vit_matches_plain_timm_forward(tmp_path):
    """The routed attention mirrors timm's own Attention.forward: same weights, same outputs."""
    from timm.models.vision_transformer import VisionTransformer

    v = build_vit(tmp_path, **TINY_VIT)
    plain = VisionTransformer(img_size=32, patch_size=4, num_classes=0, global_pool="", embed_dim=32, depth=2,
                              num_heads=2, qkv_bias=True).eval()
    plain.load_state_dict(v.vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for backend in ("sdpa", "math"):
        set_attention_backend(v, backend)
        assert maxdiff(v(x), plain.forward_features(x)) <= TOL


def test_vit_attention_goes_through_attend(tmp_path, monkeypatch):
    v = build_vit(tmp_path, attention="math", **TINY_VIT)
    seen = []
    real = attention.attend

    def spy(*a, **kw):
        seen.append(a[5] if len(a) > 5 else kw.get("backend"))
        return real(*a, **kw)

    # RoutedAttention (vlpgraph.layers.attention) looks attend up in its own module
    monkeypatch.setattr(attention, "attend", spy)
    v(torch.randn(1, 3, 32, 32))
    assert seen == ["math", "math"]


def test_forward_blocks(tmp_path):
    v = build_vit(tmp_path, depth=3, width=32, heads=2)
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n, blk in enumerate(v.vit.blocks)]
    final = v(x)
    for h in hooks:
        h.remove()
    out, blocks = v.forward_blocks(x, [0, 2, -2])
    assert set(blocks) == {0, 2, -2}
    assert torch.equal(out, final)
    assert torch.equal(blocks[0], captured[0]) and torch.equal(blocks[2], captured[2])
    assert torch.equal(blocks[-2], captured[1])
    assert not torch.equal(blocks[0], blocks[2])
    torch.testing.assert_close(v.vit.norm(blocks[2]), final)  # tokens before the final norm
    with pytest.raises(IndexError, match="0..2"):
        v.forward_blocks(x, [3])


def test_attention_maps(tmp_path):
    v = build_vit(tmp_path, **TINY_VIT)
    maps = v.attention_maps(torch.randn(2, 3, 32, 32), blocks=[0, -1])
    assert maps[0].shape == (2, 2, 65, 65) and maps[-1].shape == (2, 2, 65, 65)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 65))
    assert all(not blk.attn.keep_weights and blk.attn.last_weights is None for blk in v.vit.blocks)


def test_vit_pretrained_round_trip(tmp_path):
    v = build_vit(tmp_path, **TINY_VIT)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.randn(2, 3, 32, 32)
    ref = v(x)
    path = tmp_path / "vit.safetensors"
    save_file({k: t.contiguous() for k, t in v.state_dict().items()}, str(path))  # keys "vit.*"
    torch.manual_seed(123)  # a different random init must be overwritten
    v2 = build_vit(tmp_path, pretrained=str(path), **TINY_VIT)
    assert torch.equal(v2(x), ref)
    pth = tmp_path / "vit.pth"
    torch.save({"state_dict": v.vit.state_dict()}, pth)  # raw timm keys, wrapped
    assert torch.equal(build_vit(tmp_path, pretrained=str(pth), **TINY_VIT)(x), ref)
    with pytest.raises(UserError, match="not found"):
        build_vit(tmp_path, pretrained=str(tmp_path / "missing.safetensors"), **TINY_VIT)
    with pytest.raises(UserError, match="does not fit"):
        build_vit(tmp_path, pretrained=str(path), width=64, depth=2, heads=2)


def test_vit_xformers_needs_cuda_at_build(tmp_path):
    if CUDA:
        pytest.skip("this machine has CUDA")
    k = vit_kind()
    with pytest.raises(UserError, match="needs CUDA"):
        k.build(k.params(attention="xformers", **TINY_VIT), {}, build_ctx("enc", cache=tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ text


def test_text_registration_and_params():
    k = text_kind()
    assert issubclass(k.output, TextTower)
    assert not k.inputs["data"].optional
    assert k.summary
    for name, f in k.params.model_fields.items():
        assert f.description, name
    with pytest.raises(ValidationError, match="divisible by heads"):
        k.params(width=130, heads=4)
    with pytest.raises(ValidationError):
        k.params(max_len=2)


def test_text_sdpa_and_math_agree_and_padding_is_masked(tmp_path):
    t = build_text(tmp_path)  # default size: width 128, depth 4, heads 2, max_len 32
    caps = ["a red circle.", "a blue square left of a green star, then a yellow triangle"]
    batch = t.tokenizer(caps)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # caption 0 is padded
    outs = {}
    for backend in ("sdpa", "math"):
        assert set_attention_backend(t, backend) == 1
        assert t.bert.config._attn_implementation == f"vlpgraph_{backend}"
        outs[backend] = t(batch["input_ids"], batch["attention_mask"])
        alone = t.tokenizer(caps[:1])
        n = alone["input_ids"].shape[1]
        single = t(alone["input_ids"], alone["attention_mask"])
        d_pad = maxdiff(outs[backend][0, :n], single[0])
        print(f"text {backend}: |padded - unpadded| max on real tokens = {d_pad:.2e}")
        assert d_pad <= TOL
        # the mask matters: attending to the pads changes the short caption's tokens
        unmasked = t(batch["input_ids"], torch.ones_like(batch["attention_mask"]))
        assert maxdiff(unmasked[0, :n], single[0]) > 1e-3
    d = maxdiff(outs["sdpa"], outs["math"])
    print(f"text whole tower |sdpa - math| max = {d:.2e}")
    assert d <= TOL
    assert outs["sdpa"].shape == (2, batch["input_ids"].shape[1], 128)


def test_text_matches_transformers_own_attention(tmp_path):
    t = build_text(tmp_path, **TINY_TEXT)
    batch = t.tokenizer(["a red circle.", "a blue square left of a green star"])
    ours = t(batch["input_ids"], batch["attention_mask"])
    t.bert.set_attn_implementation("eager")
    theirs = t.bert(**batch).last_hidden_state
    assert maxdiff(ours, theirs) <= TOL


def test_text_attention_goes_through_attend(tmp_path, monkeypatch):
    t = build_text(tmp_path, attention="sdpa", **TINY_TEXT)
    seen = []
    real = attention.attend

    def spy(q, k, v, mask=None, causal=False, backend="auto", *a, **kw):
        seen.append((backend, None if mask is None else (mask.dtype, tuple(mask.shape))))
        return real(q, k, v, mask, causal, backend, *a, **kw)

    monkeypatch.setattr(attention, "attend", spy)
    batch = t.tokenizer(["a red circle.", "a blue square left of a green star"])
    t(batch["input_ids"], batch["attention_mask"])
    L = batch["input_ids"].shape[1]
    assert seen == [("sdpa", (torch.bool, (2, 1, L, L)))] * 2  # one call per layer, boolean padding mask


def test_tokenizer_contract(tmp_path):
    t = build_text(tmp_path, **TINY_TEXT)
    tok = t.tokenizer
    assert isinstance(tok, Tokenizer)
    assert len({tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id}) == 4
    assert 10 < tok.vocab_size <= 2000 and tok.max_len == 16 and len(tok.content_hash) >= 16
    long = " ".join(["red circle"] * 40)
    b = tok(["A red circle.", long, ""])
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == (3, 16)  # padded to the batch max, which the long caption hits at max_len
    assert torch.all(ids[:, 0] == tok.cls_id)
    assert ids[1, -1] == tok.sep_id and mask[1].sum() == 16  # truncated, SEP kept last
    assert ids[2, :2].tolist() == [tok.cls_id, tok.sep_id] and mask[2].sum() == 2
    assert torch.equal(mask == 0, ids == tok.pad_id)
    assert ids[0, mask[0].sum() - 1] == tok.sep_id
    # lowercase + punctuation split: "A red circle." == "a red circle ."
    assert tok(["A red circle."])["input_ids"].tolist() == tok(["a red circle ."])["input_ids"].tolist()
    b2 = tok(["A red circle."])
    assert b2["input_ids"].shape[1] == int(mask[0].sum())  # no padding for a batch of one
    assert t.bert.config.vocab_size == tok.vocab_size and t.bert.config.max_position_embeddings == 16


def test_tokenizer_trained_once_then_read_from_cache(tmp_path, monkeypatch):
    data = FakeData()
    logs = []
    t1 = build_text(tmp_path, data=data, logs=logs, **TINY_TEXT)
    key = tokmod.training_hash(data.train_captions(), 2000)
    path = tmp_path / "cache" / "tokenizers" / f"{key}.json"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    mtime = path.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokmod, "train_wordpiece", no_training)
    t2 = build_text(tmp_path, data=data, logs=logs, **TINY_TEXT)
    assert path.stat().st_mtime_ns == mtime
    assert any("reused" in m for m in logs)
    caps = ["a purple star left of a red square.", "green"]
    assert torch.equal(t1.tokenizer(caps)["input_ids"], t2.tokenizer(caps)["input_ids"])
    assert t1.tokenizer.content_hash == t2.tokenizer.content_hash
    # other captions or another vocab cap -> another cache entry
    assert tokmod.training_hash(data.train_captions()[1:], 2000) != key
    assert tokmod.training_hash(data.train_captions(), 1000) != key


def test_tokenizer_from_local_file(tmp_path):
    t1 = build_text(tmp_path, **TINY_TEXT)
    f = tmp_path / "tokenizer.json"
    t1.tokenizer.tok.save(str(f))
    t2 = build_text(tmp_path / "other", tokenizer=str(f), **TINY_TEXT)
    caps = ["a red circle left of a blue star"]
    assert torch.equal(t1.tokenizer(caps)["input_ids"], t2.tokenizer(caps)["input_ids"])
    with pytest.raises(UserError, match="tokenizer file not found"):
        build_text(tmp_path, tokenizer=str(tmp_path / "nope.json"), **TINY_TEXT)


def test_text_pretrained_round_trip(tmp_path):
    t = build_text(tmp_path, **TINY_TEXT)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = t.tokenizer(["a red circle.", "a blue square left of a green star"])
    ref = t(**batch)
    path = tmp_path / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(path))  # keys "bert.*"
    torch.manual_seed(7)
    t2 = build_text(tmp_path, pretrained=str(path), **TINY_TEXT)
    assert torch.equal(t2(**batch), ref)
    pth = tmp_path / "bert.pt"
    torch.save(t.bert.state_dict(), pth)  # BertModel keys, no prefix
    assert torch.equal(build_text(tmp_path, pretrained=str(pth), **TINY_TEXT)(**batch), ref)
    with pytest.raises(UserError, match="not found"):
        build_text(tmp_path, pretrained=str(tmp_path / "missing.safetensors"), **TINY_TEXT)
    with pytest.raises(UserError, match="vocabulary"):
        build_text(tmp_path, data=FakeData(seed=5, n=50), vocab_size=40, pretrained=str(path), **TINY_TEXT)


def test_text_training_step_runs(tmp_path):
    t = build_text(tmp_path, dropout=0.1, **TINY_TEXT).train()
    batch = t.tokenizer(["a red circle.", "a blue square left of a green star"])
    t(**batch)[:, 0].square().sum().backward()
    assert all(p.grad is not None for p in t.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none on this machine)")
def test_towers_xformers_vs_sdpa_bf16_cuda(tmp_path):
    if not attention.xformers_available():
        pytest.skip("xformers is not installed (pip install 'vlpgraph[gpu]')")
    v = build_vit(tmp_path, **TINY_VIT).cuda()
    t = build_text(tmp_path, **TINY_TEXT).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    batch = {k: b.cuda() for k, b in t.tokenizer(["a red circle.", "a blue square left of a green star"]).items()}
    res = {}
    for backend in ("xformers", "sdpa"):
        set_attention_backend(v, backend)
        set_attention_backend(t, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res[backend] = (v(x).float(), t(**batch).float())
    assert maxdiff(res["xformers"][0], res["sdpa"][0]) < 5e-2
    n = int(batch["attention_mask"][0].sum())
    assert maxdiff(res["xformers"][1][:, :n], res["sdpa"][1][:, :n]) < 5e-2


def test_trained_tokenizer_is_the_same_every_time():
    """Same captions -> same vocabulary and ids (tokenizers' own trainer tie-breaks differently per run)."""
    from vlpgraph.layers.tokenizer import train_wordpiece

    caps = ["a red circle on the left of a blue square", "two shapes including a big green cross",
            "a tiny yellow triangle at the top"] * 40
    vocabs = {tuple(sorted(train_wordpiece(caps, 2000).get_vocab().items())) for _ in range(5)}
    assert len(vocabs) == 1
    tok = train_wordpiece(caps, 2000)
    assert tok.encode("a red triangle").tokens == ["a", "red", "triangle"]
    assert tok.encode("a purple circle").tokens[1:3] == ["p", "##u"]  # unseen words are spelled
