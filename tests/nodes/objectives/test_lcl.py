"""head.attentive_pool and objective.lcl on small fakes that follow the ports: a fake LanguageModel
(embedding + GRU + final norm) and a word-level fake tokenizer with soi_id / img_id / eoi_id and
``pieces``; sequences come from the real builder, vlpgraph.layers.interleaved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import ROOT, build_ctx
from vlpgraph.engine import ports, registry
from vlpgraph.layers import interleaved as seqs
from vlpgraph.layers.interleaved import Sequences
from vlpgraph.nodes.heads import attentive_pool as pool_mod
from vlpgraph.nodes.objectives import lcl as lcl_mod

WIDTH, LM_WIDTH = 16, 24

# ------------------------------------------------------------------------------------------- fakes


class FakeTokenizer(ports.Tokenizer):
    """Word-level tokenizer with the Tokenizer port's interface plus the LM's image-block specials."""

    def __init__(self, words: list[str], max_len: int = 64):
        specials = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "<soi>", "<img>", "<eoi>", "[UNK]"]
        self.vocab = {t: i for i, t in enumerate(specials + sorted(set(words)))}
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = 0, 1, 2, 3
        self.soi_id, self.img_id, self.eoi_id = 4, 5, 6
        self.vocab_size, self.max_len, self.content_hash = len(self.vocab), max_len, "fake"

    def __call__(self, captions):
        rows = [[self.cls_id] + [self.vocab.get(w, 7) for w in c.lower().split()][: self.max_len - 2] + [self.sep_id]
                for c in captions]
        n = max(map(len, rows))
        ids = torch.tensor([r + [self.pad_id] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    def pieces(self, texts):
        """Each text's ids without [CLS]/[SEP] (what the sequence builder asks of an LM's tokenizer)."""
        return [[self.vocab.get(w, 7) for w in t.lower().split()] for t in texts]

    def decode(self, ids):
        return " ".join(self.inverse[int(i)] for i in ids)


class FakeLM(ports.LanguageModel):
    """A causal LM by the contract: embed(ids), forward(inputs_embeds, mask) -> final-normed hidden, logits."""

    def __init__(self, tokenizer: FakeTokenizer, width: int = LM_WIDTH):
        super().__init__()
        self.tokenizer, self.width = tokenizer, width
        self.emb = nn.Embedding(tokenizer.vocab_size, width)
        self.rnn = nn.GRU(width, width, batch_first=True)  # causal by construction
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, tokenizer.vocab_size)

    def embed(self, input_ids):
        return self.emb(input_ids)

    def forward(self, inputs_embeds, attention_mask):
        return self.norm(self.rnn(inputs_embeds)[0])

    def logits(self, hidden):
        return self.head(hidden)


class FakeVision(ports.VisionTower):
    """[M, 3, 8, 8] -> [M, 1 + 4, WIDTH]: CLS then a 2x2 grid of 4x4 patches."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.width, self.patch_size, self.grid_size = width, 4, (2, 2)
        self.proj = nn.Linear(48, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width))

    def forward(self, images):
        patches = F.unfold(images, 4, stride=4).transpose(1, 2)  # [M, 4, 48]
        return torch.cat([self.cls.expand(images.shape[0], -1, -1), self.proj(patches)], dim=1)


@pytest.fixture
def interleaved():
    """The sequence-builder module objective.lcl calls through (tests patch its functions)."""
    return seqs


# ------------------------------------------------------------------------------------------ helpers

WORDS = "a red circle blue square green triangle on the left of and small big".split()
# documents: (sentences, layout); image j of a document is its j-th image in reading order
DOCS = [
    (["a red circle", "big blue square"], [("image", 0), ("text", 0), ("image", 1), ("text", 1)]),
    (["small green triangle", "a blue circle on the left"], [("text", 0), ("image", 0), ("text", 1)]),
    (["the red square", "a big circle", "and a triangle"],
     [("text", 0), ("image", 0), ("text", 1), ("text", 2), ("image", 1)]),
]


def make_batch(docs=DOCS, seed: int = 0) -> dict:
    """The data's collate of documents, by the contract."""
    g = torch.Generator().manual_seed(seed)
    n_images = [sum(w == "image" for w, _ in layout) for _, layout in docs]
    return {
        "images": torch.randn(sum(n_images), 3, 8, 8, generator=g),
        "image_doc": torch.cat([torch.full((n,), b) for b, n in enumerate(n_images)]),
        "image_index": torch.cat([torch.arange(n) for n in n_images]),
        "doc_texts": [list(t) for t, _ in docs],
        "doc_layout": [list(layout) for _, layout in docs],
        "sample_ids": torch.arange(len(docs)),
    }


def make_lcl(seed: int = 0, **params):
    """(objective, vision, pool, lm) built through the registered kinds, the same weights for a seed."""
    torch.manual_seed(seed)
    vision, lm = FakeVision(), FakeLM(FakeTokenizer(WORDS))
    ctx = build_ctx("lcl")
    pool = pool_mod.build(pool_mod.AttentivePoolParams(heads=2), {"vision": vision}, ctx)
    obj = lcl_mod.build(lcl_mod.LCLParams(embed_dim=8, **params), {"vision": vision, "pool": pool, "lm": lm}, ctx)
    return obj, vision, pool, lm


def terms(obj, batch) -> dict[str, torch.Tensor]:
    return obj(ports.Forward(batch), batch)


# ------------------------------------------------------------------------------ head.attentive_pool


def test_visual_tokens_are_the_value_and_output_projections_per_patch():
    pool = pool_mod.AttentivePooler(WIDTH, heads=4)
    patches = torch.randn(3, 5, WIDTH)
    z, visual = pool(patches)
    attn = pool.pool.attn
    assert z.shape == (3, WIDTH) and visual.shape == (3, 5, WIDTH)
    torch.testing.assert_close(visual, attn.out(attn.value(patches)))
    # ... which is what the block's attention gives with that patch as its only key
    query = pool.pool.query.expand(3, -1, -1)
    for p in range(5):
        torch.testing.assert_close(visual[:, p], attn(query, context=patches[:, p : p + 1])[:, 0])
    # no mixing across patches: changing patch 0 leaves the other patches' tokens as they were
    changed = patches.clone()
    changed[:, 0] += 1.0
    _, visual2 = pool(changed)
    torch.testing.assert_close(visual2[:, 1:], visual[:, 1:])
    assert not torch.allclose(visual2[:, 0], visual[:, 0])


def test_z_is_a_convex_combination_of_the_projected_values():
    torch.manual_seed(0)
    pool = pool_mod.AttentivePooler(WIDTH, heads=2).double()
    attn = pool.pool.attn
    patches = torch.randn(4, 6, WIDTH, dtype=torch.float64)
    z, visual = pool(patches)
    # undo the output projection: each head's slice is Σ_p a_hp · value_h(p) with a_h a softmax
    mixed = torch.linalg.solve(attn.out.weight, (z - attn.out.bias).T).T.view(4, 2, WIDTH // 2)  # [M, H, Dh]
    q = attn.query(pool.pool.query).view(1, 2, WIDTH // 2)  # [1, H, Dh]
    k = attn.key(patches).view(4, 6, 2, WIDTH // 2)
    v = attn.value(patches).view(4, 6, 2, WIDTH // 2)
    a = torch.softmax(torch.einsum("hd,mphd->mhp", q[0], k) / (WIDTH // 2) ** 0.5, dim=-1)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(mixed, torch.einsum("mhp,mphd->mhd", a, v))
    # with equal scores (no key signal) z is the plain mean of the visual tokens, whatever the heads
    with torch.no_grad():
        attn.key.weight.zero_(), attn.key.bias.zero_()
    z, visual = pool(patches)
    torch.testing.assert_close(z, visual.mean(1))


def test_pool_refuses_heads_that_do_not_divide_the_width():
    from vlpgraph.errors import UserError

    ctx = build_ctx("pool")
    with pytest.raises(UserError, match="heads"):
        pool_mod.build(pool_mod.AttentivePoolParams(heads=3), {"vision": FakeVision()}, ctx)


# ------------------------------------------------------------------------------------ objective.lcl


def shift_z(obj, row: int):
    """The objective with the pooler's z of batch image ``row`` moved (its visual tokens unchanged)."""
    pool = obj.pool
    forward = type(pool).forward

    def shifted(patches):
        z, visual = forward(pool, patches)
        return z + F.one_hot(torch.tensor(row), z.shape[0]).to(z.dtype)[:, None], visual

    pool.forward = shifted
    return obj


def con_with_z_shifted(obj, batch, row: int) -> float:
    shift_z(obj, row)
    try:
        return terms(obj, batch)["lcl_con"].item()
    finally:
        del obj.pool.forward


def test_images_without_context_are_left_out_of_the_contrastive_term(interleaved, monkeypatch):
    """Image 0 (document 0's first image) opens its document: right after [CLS] it is left out
    (exclude_bos_only), and read literally, a <soi> at position 0 (sequences without a [CLS]) is left
    out: moving its z changes nothing, moving the z of image 2 (after its sentence) does."""
    batch = make_batch()
    obj, *_ = make_lcl()
    con = terms(obj, batch)["lcl_con"].item()
    assert con_with_z_shifted(obj, batch, 0) == pytest.approx(con, abs=1e-7)
    assert con_with_z_shifted(obj, batch, 2) != pytest.approx(con, abs=1e-4)
    step = obj.step(ports.Forward(batch))
    assert step.soi_pos.tolist()[0] == 1 and step.has_context.tolist() == [False, True, True, True, True]

    # read literally (exclude_bos_only False), a <soi> after [CLS] counts
    literal, *_ = make_lcl(exclude_bos_only=False)
    base = terms(literal, batch)["lcl_con"].item()
    assert con_with_z_shifted(literal, batch, 0) != pytest.approx(base, abs=1e-4)

    # sequences without a [CLS]: the builder's output with its first column cut off puts that <soi> at 0
    build = interleaved.build_sequences

    def no_bos(*args, **kwargs):
        seq = build(*args, **kwargs)
        return Sequences(seq.input_ids[:, 1:], seq.attention_mask[:, 1:], seq.labels[:, 1:], seq.kept,
                         seq.image_row, seq.image_start - 1, seq.soi_pos - 1)

    monkeypatch.setattr(interleaved, "build_sequences", no_bos)
    step = literal.step(ports.Forward(batch))
    assert step.soi_pos.tolist()[0] == 0 and step.has_context.tolist() == [False, True, True, True, True]
    base = terms(literal, batch)["lcl_con"].item()
    assert con_with_z_shifted(literal, batch, 0) == pytest.approx(base, abs=1e-7)
    assert con_with_z_shifted(literal, batch, 2) != pytest.approx(base, abs=1e-4)


def test_contrastive_term_is_symmetric_infonce_over_soi_states():
    obj, *_ = make_lcl(con_weight=1.0)
    batch = make_batch()
    step = obj.step(ports.Forward(batch))
    keep = step.has_context
    img = F.normalize(obj.image_proj(step.z[keep]), dim=-1)
    ctx = F.normalize(obj.context_proj(step.hidden[step.image_row[keep], step.soi_pos[keep]]), dim=-1)
    logits = img @ ctx.T / 0.07
    labels = torch.arange(len(img))
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert terms(obj, batch)["lcl_con"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_generation_is_cross_entropy_on_the_labels():
    obj, _, _, lm = make_lcl()
    batch = make_batch()
    step = obj.step(ports.Forward(batch))
    assert (step.labels != -100).sum() > 0
    logits = lm.logits(step.hidden)
    mask = step.labels != -100
    ref = -torch.log_softmax(logits, -1)[mask].gather(1, step.labels[mask][:, None]).mean()
    assert terms(obj, batch)["lcl_gen"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_gen_only_and_con_only_are_weights_of_the_same_node():
    batch = make_batch()
    full = terms(make_lcl(gen_weight=1.0, con_weight=0.1)[0], batch)
    gen_only_obj = make_lcl(con_weight=0.0)[0]
    con_only_obj = make_lcl(gen_weight=0.0, con_weight=0.5)[0]
    assert type(gen_only_obj) is type(con_only_obj) is lcl_mod.LCL
    # a term of weight 0 is not computed at all
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lcl_mod.LCL, "contrastive_loss", lambda self, step: pytest.fail("computed at weight 0"))
        gen_only = terms(gen_only_obj, batch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lcl_mod.LCL, "generation_loss", lambda self, step: pytest.fail("computed at weight 0"))
        con_only = terms(con_only_obj, batch)
    assert set(gen_only) == {"lcl_gen"} and set(con_only) == {"lcl_con"} and set(full) == {"lcl_gen", "lcl_con"}
    assert gen_only["lcl_gen"].item() == pytest.approx(full["lcl_gen"].item(), rel=1e-6)
    assert con_only["lcl_con"].item() == pytest.approx(5 * full["lcl_con"].item(), rel=1e-5)


def test_contrastive_gradient_reaches_the_pool_the_lm_and_the_tower():
    obj, vision, pool, lm = make_lcl(gen_weight=0.0)
    batch = make_batch()
    terms(obj, batch)["lcl_con"].backward()
    for name, module in (("pool", pool), ("lm", lm), ("vision", vision)):
        grads = {n: p.grad for n, p in module.named_parameters()}
        assert any(g is not None and g.abs().sum() > 0 for g in grads.values()), name
    assert pool.pool.query.grad.abs().sum() > 0  # z's own query
    assert lm.rnn.weight_hh_l0.grad.abs().sum() > 0  # through the <soi> states
    assert obj.temp.grad is not None and obj.temp.grad.abs() > 0
    # the LM's head only predicts tokens: no contrastive gradient there
    assert lm.head.weight.grad is None


def test_temperature_is_clamped_into_its_range():
    obj, *_ = make_lcl(temperature=0.07, temperature_min=0.05)
    with torch.no_grad():
        obj.temp.fill_(0.001)
    obj.train()
    terms(obj, make_batch())
    assert obj.temp.item() == pytest.approx(0.05)


def test_kinds_are_registered_with_their_ports():
    kind = registry._KINDS["objective.lcl"]
    assert kind.inputs["pool"].types is ports.ImagePooler and kind.inputs["data"].optional
    assert "interleaved" in kind.inputs["data"].needs
    assert registry._KINDS["head.attentive_pool"].output is pool_mod.AttentivePooler
    assert issubclass(pool_mod.AttentivePooler, ports.ImagePooler)


# ------------------------------------------------------------------------------------------ torchrun

# each rank's documents: rank 0 holds DOCS[:2] (one of its 3 images has no context), rank 1 holds
# DOCS[2:] + one more (every image has context): different numbers of images per rank
RANK_DOCS = [DOCS[:2], DOCS[2:] + [(["a big blue triangle"], [("text", 0), ("image", 0)])]]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_contrastive_term_sees_the_global_batch(tmp_path):
    """Under torchrun (2 gloo ranks) 'lcl_con' on each rank equals the single-process term over the
    concatenated batch, and the ranks' averaged gradients equal its gradient (_lcl_dist_job.py beside it)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "tests.nodes.objectives._lcl_dist_job", str(tmp_path)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    obj, vision, pool, lm = make_lcl(gen_weight=0.0, con_weight=1.0)
    batch = make_batch(RANK_DOCS[0] + RANK_DOCS[1])
    local = [make_batch(docs, seed=r) for r, docs in enumerate(RANK_DOCS)]
    batch["images"] = torch.cat([b["images"] for b in local])  # each rank's own images
    loss = terms(obj, batch)["lcl_con"]
    loss.backward()
    assert [int(r["n_context"]) for r in ranks] == [2, 3]  # rank 0 left one image out
    for r in ranks:
        assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    grads = named_grads(obj, vision, pool, lm)
    assert set(grads) == set(ranks[0]["grads"]) == set(ranks[1]["grads"])
    for n, g in grads.items():  # the trainer averages the ranks' gradients
        torch.testing.assert_close((ranks[0]["grads"][n] + ranks[1]["grads"][n]) / 2, g, rtol=1e-4, atol=1e-6)


def named_grads(obj, vision, pool, lm) -> dict[str, torch.Tensor]:
    """Every gradient the contrastive term leaves, by module and parameter name."""
    modules = {"obj": obj, "vision": vision, "pool": pool, "lm": lm}
    return {f"{m}.{n}": p.grad.clone() for m, module in modules.items()
            for n, p in module.named_parameters() if p.grad is not None}


def test_truncated_images_leave_the_step_and_errors_are_clear():
    from vlpgraph.errors import TrialFailed, UserError

    obj, *_ = make_lcl(max_len=14)  # [CLS] + one block of 4 visual tokens (6) + a few words
    batch = make_batch()
    step = obj.step(ports.Forward(batch))
    kept = step.seq.kept
    assert 0 < int(kept.sum()) < len(kept)  # some blocks did not fit whole
    assert step.z.shape[0] == step.image_row.shape[0] == step.has_context.shape[0] == int(kept.sum())
    assert all(torch.isfinite(v) for v in terms(obj, batch).values())
    big = FakeVision()
    big.grid_size = (3, 3)  # 9 visual tokens per image: a block needs 9 + 4 tokens
    pool = pool_mod.AttentivePooler(WIDTH, heads=2)
    ctx = build_ctx("lcl")
    with pytest.raises(UserError, match="cannot hold one image block"):
        lcl_mod.build(lcl_mod.LCLParams(max_len=12), {"vision": big, "pool": pool, "lm": FakeLM(FakeTokenizer(WORDS))}, ctx)
    lcl_mod.build(lcl_mod.LCLParams(max_len=13), {"vision": big, "pool": pool, "lm": FakeLM(FakeTokenizer(WORDS))}, ctx)
    with pytest.raises(ValueError, match="both 0"):
        lcl_mod.LCLParams(gen_weight=0, con_weight=0)
    with pytest.raises(TrialFailed, match="no documents"):
        paired = {"images": batch["images"], "captions": ["a red circle"] * 5}
        terms(obj, paired)
