"""The caption decoder (layers.decoder), decoder.caption, objective.caption and evaluator.captioning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import TINY_TRAIN, build_ctx, evaluator, make_batch, node, shapes, tiny_graph, trainer, vit
from vlpgraph.engine import ports
from vlpgraph.cli import main
from vlpgraph.layers.decoder import CaptionTransformer, caption_loss
from vlpgraph.layers.tokenizer import WordPieceTokenizer, train_wordpiece
from vlpgraph.nodes.evaluators import captioning as captioning_mod
from vlpgraph.nodes.objectives import caption as caption_mod
from vlpgraph.store import Store

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow star near a circle"]
IMAGE_WIDTH = 12


def tokenizer(max_len: int = 16) -> WordPieceTokenizer:
    return WordPieceTokenizer(train_wordpiece(CAPTIONS, 200), max_len)


def decoder(seed: int = 0, **kw) -> CaptionTransformer:
    torch.manual_seed(seed)
    kw = dict(width=32, heads=2, uni_depth=1, multi_depth=1) | kw
    return CaptionTransformer(tokenizer(), IMAGE_WIDTH, **kw).eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, IMAGE_WIDTH, generator=torch.Generator().manual_seed(seed))


def trained_decoder(steps: int = 120) -> tuple[CaptionTransformer, torch.Tensor]:
    """A decoder that learnt to caption 4 random 'images' with CAPTIONS (so it emits EOS at different
    lengths: generation then pads finished rows of a batch)."""
    dec, img = decoder(), images()
    text = dec.tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    dec.train()
    for _ in range(steps):
        loss = caption_loss(dec(text["input_ids"], text["attention_mask"], img), text["input_ids"], text["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval(), img


# ------------------------------------------------------------------------------------------ decoder


def test_logits_at_t_depend_only_on_tokens_up_to_t_and_on_the_image():
    dec, img = decoder(), images(2)
    ids = torch.randint(5, dec.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = dec.tokenizer.cls_id
    base = dec(ids, torch.ones_like(ids), img)
    for t in (0, 3, 8):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(5, dec.vocab_size, changed[:, t + 1:].shape)
        out = dec(changed, torch.ones_like(ids), img)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)
    other = dec(ids, torch.ones_like(ids), images(2, seed=7))
    assert (other - base).abs().amax(-1).min() > 1e-4  # every position reads the image


def test_every_attention_goes_through_attend():
    from vlpgraph.layers.attention import set_attention_backend

    dec, img = decoder(), images(2)
    ids = dec.tokenizer(CAPTIONS[:2])
    assert set_attention_backend(dec, "math") == 3  # uni layer: self; multimodal layer: self + cross
    math = dec(ids["input_ids"], ids["attention_mask"], img)
    set_attention_backend(dec, "sdpa")
    assert torch.allclose(dec(ids["input_ids"], ids["attention_mask"], img), math, atol=1e-5)


def test_output_projection_is_tied_to_the_token_embedding():
    dec = decoder()
    assert dec.head.weight is dec.token_embedding.weight
    assert decoder(tie_embeddings=False).head.weight is not decoder(tie_embeddings=False).token_embedding.weight


def test_greedy_generation_is_the_argmax_of_the_teacher_forced_logits_on_its_own_output():
    dec, img = trained_decoder()
    tok = dec.tokenizer
    generated = dec.generate(img, beams=1)
    assert [tok.decode(g) for g in generated] == CAPTIONS  # it learnt them; rows end at different steps
    steps = dec.max_len - 1
    for i, g in enumerate(generated):
        ids = torch.tensor([[tok.cls_id] + g])
        argmax = dec(ids, torch.ones_like(ids), img[i : i + 1]).argmax(-1)[0].tolist()
        assert argmax[: len(g)] == g
        if len(g) < steps:
            assert argmax[len(g)] == tok.sep_id  # it stopped because EOS was the argmax
    # also on an untrained decoder (no EOS: generation runs to the length limit)
    # (argmax over the tokens generation may emit: padding, BOS and [MASK] are never generated)
    dec, img = decoder(seed=3), images(3, seed=5)
    for i, g in enumerate(dec.generate(img, max_len=6)):
        ids = torch.tensor([[dec.tokenizer.cls_id] + g])
        logits = dec(ids, None, img[i : i + 1])
        logits[..., dec.never_generated()] = float("-inf")
        assert logits.argmax(-1)[0].tolist()[: len(g)] == g and len(g) == 6
        assert not set(g) & set(dec.never_generated())


def test_beam_search_with_one_beam_is_greedy_and_more_beams_score_at_least_as_high():
    for dec, img in (trained_decoder(40), (decoder(seed=4), images(6, seed=2))):
        steps = dec._steps(None)
        greedy = dec.generate(img, beams=1)
        assert dec._beam(img, steps, 1, 0.0) == greedy  # the beam code itself with one beam
        beam = dec.generate(img, beams=4, length_penalty=0.0)
        lp_beam, lp_greedy = dec.sequence_logprob(img, beam), dec.sequence_logprob(img, greedy)
        assert (lp_beam >= lp_greedy - 1e-4).all()
    # the log-prob the check relies on is the teacher-forced one
    dec, img = decoder(seed=4), images(1)
    g = dec.generate(img, max_len=3)
    ids = torch.tensor([[dec.tokenizer.cls_id] + g[0]])
    logits = dec(ids, None, img)
    logits[..., dec.never_generated()] = float("-inf")
    logp = F.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).sum()
    assert torch.allclose(dec.sequence_logprob(img, g, max_len=3), logp, atol=1e-5)


# -------------------------------------------------------------------------------------- objective


def test_caption_loss_ignores_padding():
    dec, img = decoder(), images()
    text = dec.tokenizer(CAPTIONS)
    ids, mask = text["input_ids"], text["attention_mask"]
    assert (mask == 0).any()  # the batch is padded
    logits = dec(ids, mask, img)
    loss = caption_loss(logits, ids, mask)
    garbage = torch.where(mask.bool(), ids, torch.full_like(ids, 7))
    noisy = torch.where(mask.bool()[..., None], logits, torch.randn_like(logits) * 50)
    assert torch.allclose(caption_loss(noisy, garbage, mask), loss)
    # = mean over every real target after BOS, one caption at a time
    nll, count = 0.0, 0
    for i, cap in enumerate(CAPTIONS):
        one = dec.tokenizer([cap])
        lg = dec(one["input_ids"], one["attention_mask"], img[i : i + 1])
        nll += F.cross_entropy(lg[0, :-1], one["input_ids"][0, 1:], reduction="sum").item()
        count += one["input_ids"].shape[1] - 1
    assert abs(loss.item() - nll / count) < 1e-4
    smoothed = caption_loss(logits, ids, mask, label_smoothing=0.1)
    assert smoothed.item() != loss.item()


class CountingVision(ports.VisionTower):
    width = IMAGE_WIDTH

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, IMAGE_WIDTH)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.proj(images.flatten(2).transpose(1, 2))


class FakeMAE(ports.MaskedImageModel):
    """Stands in for objective.mae: a masked encoding memoised in fwd, counting its computations."""

    def __init__(self, vision):
        super().__init__()
        self._refs = (vision,)
        self.computed = 0

    @property
    def vision(self):
        return self._refs[0]

    def masked_encoding(self, fwd):
        def compute():
            self.computed += 1
            tokens = self.vision.proj(fwd.batch["images"].flatten(2).transpose(1, 2)[:, :2])  # 'visible' pixels
            return ports.MaskedEncoding(tokens, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 4))

        return fwd.memo(("mae", id(self)), compute)

    def forward(self, fwd, batch, group=None):
        return {"mae": self.masked_encoding(fwd).tokens.pow(2).mean()}


def test_objective_caption_on_the_masked_encoding_shares_one_masked_forward():
    ctx = build_ctx("cap")
    dec, vision = decoder(), CountingVision()
    mae = FakeMAE(vision)
    obj = caption_mod.build(caption_mod.CaptionParams(weight=0.1), {"decoder": dec, "vision": vision, "masked": mae}, ctx)
    assert obj.weight == 0.1
    batch = make_batch(4, 2, None, **dec.tokenizer(CAPTIONS))
    fwd = ports.Forward(batch)
    mae(fwd, batch)
    loss = obj(fwd, batch)["caption"]
    assert mae.computed == 1 and vision.calls == 0  # the MAE's masked forward, not a full-image one
    expected = caption_loss(dec(batch["input_ids"], batch["attention_mask"], mae.masked_encoding(fwd).tokens),
                            batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert vision.proj.weight.grad is not None  # the text loss trains the encoder through the masked tokens
    obj(ports.Forward(batch), batch)
    assert mae.computed == 2  # a new Forward (a new step) encodes again
    # without 'masked': the full image's tokens, memoised per Forward
    full = caption_mod.build(caption_mod.CaptionParams(), {"decoder": dec, "vision": vision}, ctx)
    fwd = ports.Forward(batch)
    full(fwd, batch)
    fwd.image_tokens(vision)
    assert vision.calls == 1


# ------------------------------------------------------------------------------------------ scores


def test_bleu_and_cider_are_pycocoevalcaps_on_our_tokenisation():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    candidates = ["A red circle, left of a blue square.", "two green triangles", "a big yellow star", ""]
    references = [["a red circle left of a blue square"], ["Two green triangles near a circle", "two triangles"],
                  ["a small yellow star"], ["a blue circle"]]
    got = captioning_mod.caption_scores(candidates, references)
    res = {i: [" ".join(c.lower().replace(",", " ").replace(".", " ").split())] for i, c in enumerate(candidates)}
    gts = {i: [" ".join(r.lower().split()) for r in refs] for i, refs in enumerate(references)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    assert got["bleu4"] == bleu[3] and got["cider"] == cider
    assert got["bleu4_each"] == list(bleu_each[3]) and got["cider_each"] == list(cider_each)
    # hand-checkable: identical captions (up to case and punctuation) are a perfect BLEU-4
    same = captioning_mod.caption_scores(["A red circle on the left."], [["a red circle on the left"]])
    assert abs(same["bleu4"] - 1.0) < 1e-6 and abs(same["bleu4_each"][0] - 1.0) < 1e-6
    assert captioning_mod.caption_scores(["two green things"], [["a red circle on the left"]])["bleu4"] < 1e-6


# --------------------------------------------------------------------------------------- evaluator


def _shapes_and_vit(ctx):
    from vlpgraph.nodes.datasets import shapes as shapes_mod
    from vlpgraph.nodes.encoders import vit as vit_mod

    data = shapes_mod.build(shapes_mod.ShapesParams(train_size=64, test_size=16, image_size=16), {}, ctx)
    torch.manual_seed(0)
    vision = vit_mod.build(vit_mod.ViTParams(patch_size=8, width=16, depth=1, heads=2), {"data": data}, ctx)
    return data, vision


def test_fresh_captioning_leaves_the_encoder_bit_identical(tmp_path):
    ctx = build_ctx("captioning", cache=tmp_path)
    data, vision = _shapes_and_vit(ctx)
    vision.train()
    before = {k: v.clone() for k, v in vision.state_dict().items()}

    class Model(ports.Model):
        modules = nn.ModuleDict({"vision": vision})
        objectives = {}
        tokenizer = None
        device = torch.device("cpu")

    params = captioning_mod.CaptioningParams(width=16, steps=5, batch_size=8, num_samples=3)
    ev = captioning_mod.build(params, {"model": Model(), "data": data, "encoder": vision}, ctx)
    assert ev.mode == "fresh"
    result = ev.evaluate(Model(), ctx)
    after = vision.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert vision.training  # its train flag restored
    m = result.metrics
    assert {"bleu4", "cider", "token_accuracy", "perplexity", "n"} <= set(m) and m["n"] == 16
    assert 0.0 <= m["token_accuracy"] <= 1.0 and m["perplexity"] > 1.0
    assert [r["kind"] for r in result.samples] == ["caption"] * 3
    assert result.samples[0]["image"][:4] == b"\x89PNG" and result.samples[0]["info"]["mode"] == "fresh"
    # the head's draws come from (trial seed, node): the same evaluation twice gives the same numbers
    assert ev.evaluate(Model(), ctx).metrics == m


CAPTION_GRAPH = tiny_graph(graph="tinycap", nodes={
    "shapes": shapes(train_size=128, image_size=16), "vision": vit(image_size=16),
    "decoder": node("decoder.caption", {"data": "shapes", "vision": "vision"}, width=32, heads=2, max_len=24),
    "caption": node("objective.caption", {"decoder": "decoder", "vision": "vision"}),
    "train": trainer("caption", **{**TINY_TRAIN, "checkpoint_every": 0}),
    "captioning": evaluator("captioning", inputs={"encoder": "vision", "decoder": "decoder"}, num_samples=4,
                            max_samples=16),
    "captioning_fresh": evaluator("captioning", inputs={"encoder": "vision"}, width=32, steps=4, batch_size=16,
                                  max_samples=8, num_samples=2)})


@pytest.mark.integration
def test_caption_graph_trains_end_to_end_and_stores_caption_samples(tmp_path):
    graph = tmp_path / "cap.yaml"
    graph.write_text(CAPTION_GRAPH)
    assert main(["run", str(graph), "--store", str(tmp_path / "store")]) == 0
    store = Store(tmp_path / "store")
    [run] = store.runs()
    assert run["status"] == "completed"
    assert {"caption"} <= {r["name"] for r in store.metrics(run["run_id"])}
    evals = {(r["evaluator"], r["metric"]): r["value"] for r in store.evals([run["run_id"]])}
    assert {("captioning", "cider"), ("captioning", "perplexity"), ("captioning_fresh", "bleu4")} <= set(evals)
    rows = store.samples(run["run_id"], kind="caption")
    own = [r for r in rows if r["evaluator"] == "captioning"]
    assert len(own) == 4 and len([r for r in rows if r["evaluator"] == "captioning_fresh"]) == 2
    assert all(r["image"][:4] == b"\x89PNG" and r["reference"] for r in own)
    assert '"own"' in own[0]["info"]


def test_own_mode_needs_a_decoder_and_a_decoder_must_read_the_encoders_width(tmp_path):
    import pytest
    from vlpgraph.errors import UserError

    ctx = build_ctx("captioning", cache=tmp_path)
    own = captioning_mod.CaptioningParams(decoder_mode="own")
    assert captioning_mod.check(own, {"model": [{}], "data": [{}], "encoder": [{}]})  # refused at validation
    assert not captioning_mod.check(own, {"decoder": [{"node": "decoder"}]})
    data, vision = _shapes_and_vit(ctx)
    with pytest.raises(UserError, match="needs the 'decoder' input"):
        captioning_mod.build(own, {"model": None, "data": data, "encoder": vision}, ctx)
    with pytest.raises(UserError, match="width 12"):  # decoder() reads width 12, this ViT makes 16
        captioning_mod.build(own, {"model": None, "data": data, "encoder": vision, "decoder": decoder()}, ctx)
    fresh = captioning_mod.build(captioning_mod.CaptioningParams(decoder_mode="fresh"),
                                 {"model": None, "data": data, "encoder": vision, "decoder": decoder()}, ctx)
    assert fresh.mode == "fresh"
    with pytest.raises(UserError, match="width 12"):
        caption_mod.build(caption_mod.CaptionParams(), {"decoder": decoder(), "vision": vision}, ctx)
