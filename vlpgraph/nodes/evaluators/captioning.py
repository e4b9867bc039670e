"""evaluator.captioning: captions generated from a frozen vision encoder's tokens, scored against the
references (BLEU-4 and CIDEr by pycocoevalcap, token accuracy and perplexity); the captioning column of
LCL's frozen-transfer protocol."""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import evaluation_mode, frozen_image_tokens, seeded, tokenizer_for
from vlpgraph.layers.attention import resolve_backend
from vlpgraph.layers.decoder import CaptionTransformer, caption_loss
from vlpgraph.layers.patches import png_bytes
from vlpgraph.engine.registry import In, Params, register

Backend = Literal["auto", "sdpa", "math", "xformers"]


class CaptioningParams(Params):
    decoder_mode: Literal["auto", "own", "fresh"] = Field(
        "auto", description="own: the model's decoder (the 'decoder' input) generates; fresh: a small decoder is "
        "trained on the frozen encoder's tokens; auto: own when 'decoder' is wired, else fresh")
    # the fresh decoder's size and budget: the same for every method compared
    uni_depth: int = Field(1, ge=0, le=16, description="fresh decoder: uni-modal (text-only) causal layers")
    multi_depth: int = Field(1, ge=1, le=16, description="fresh decoder: multimodal layers (cross-attention to the image)")
    width: int = Field(128, ge=8, le=2048, description="fresh decoder: hidden size; divisible by heads")
    heads: int = Field(2, ge=1, le=32, description="fresh decoder: attention heads")
    steps: int = Field(300, ge=1, description="fresh decoder: optimiser steps on the train split's frozen tokens")
    batch_size: int = Field(64, ge=1, description="fresh decoder: captions per training step")
    lr: float = Field(1e-3, gt=0, description="fresh decoder: AdamW learning rate (cosine decay to 0 over `steps`)")
    weight_decay: float = Field(0.01, ge=0, description="fresh decoder: AdamW weight decay")
    max_train_samples: int | None = Field(None, ge=1, description="fresh decoder: train on the first N train samples "
                                          "only (None: all)")
    attention: Backend = Field("auto", description="fresh decoder: attention backend")
    beams: int = Field(1, ge=1, le=16, description="1: greedy generation; more: beam search with this many beams")
    length_penalty: float = Field(1.0, ge=0.0, description="beam search ranks finished captions by sum log-prob / "
                                  "length ** length_penalty (0: plain sum)")
    max_len: int | None = Field(None, ge=1, description="generate at most this many tokens, EOS included (None: as "
                                "many as the decoder has positions)")
    max_samples: int | None = Field(None, ge=1, description="score only the first N test samples (None: all)")
    eval_batch_size: int = Field(256, ge=1, description="images encoded / captioned per forward pass")
    num_samples: int = Field(8, ge=0, description="write the first N test samples' generated and reference "
                             "captions (with the image) to the samples table")

    def problems(self) -> list[tuple[str, str]]:
        if self.width % self.heads:
            return [("width", f"width ({self.width}) must be divisible by heads ({self.heads})")]
        return []


def check(p: CaptioningParams, inputs: dict) -> list[tuple[str, str]]:
    """decoder_mode 'own' needs the 'decoder' input."""
    if p.decoder_mode == "own" and not inputs.get("decoder"):
        return [("decoder_mode", "decoder_mode 'own' needs the model's decoder wired as the 'decoder' input")]
    return []


# ----------------------------------------------------------------------------------------- scoring


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation removed, words joined by single spaces: the tokenisation both the generated
    and the reference captions get before scoring (what coco-caption's PTBTokenizer does, which needs Java)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap's Bleu(4) and Cider) of ``candidates`` (one per image)
    against ``references`` (one or more per image), after :func:`normalize_caption`.

    Returns {"bleu4": float, "cider": float, "bleu4_each": [float], "cider_each": [float]}; CIDEr's
    document frequencies come from these references, so it is a corpus-level score."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if not candidates:
        return {"bleu4": float("nan"), "cider": float("nan"), "bleu4_each": [], "cider_each": []}
    res = {i: [normalize_caption(c)] for i, c in enumerate(candidates)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "bleu4_each": [float(v) for v in bleu_each[3]],
            "cider_each": [float(v) for v in cider_each]}


# --------------------------------------------------------------------------------------- evaluator


class CaptioningEvaluator(ports.Evaluator):
    """Captioning on a frozen encoder; see :func:`build`."""

    headline = "cider"

    def __init__(self, params: CaptioningParams, data: ports.PairedData, encoder: ports.VisionTower,
                 decoder: ports.CaptionDecoder | None):
        self.params = params
        self.data = data
        self.encoder = encoder
        self.decoder = decoder
        own = params.decoder_mode == "own" or (params.decoder_mode == "auto" and decoder is not None)
        self.mode = "own" if own else "fresh"

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, data = self.params, self.data
        n = len(data.test) if p.max_samples is None else min(len(data.test), p.max_samples)
        test = frozen_image_tokens(self.encoder, data, data.test, range(n), device=model.device,
                                   batch_size=p.eval_batch_size)
        with seeded(ctx) as generator:
            if self.mode == "own":
                decoder = self.decoder
            else:
                decoder = self._train_fresh(model, ctx, generator)
            with evaluation_mode(model):
                flags = {m: m.training for m in decoder.modules()}
                decoder.eval()
                try:
                    metrics, generated = self._score(decoder, test, model.device)
                finally:
                    for m, was in flags.items():
                        m.training = was
        scores = caption_scores(generated, [[c] for c in test.captions])
        metrics.update(bleu4=scores["bleu4"], cider=scores["cider"], n=float(n))
        return ports.EvalResult(metrics=metrics, samples=self._sample_rows(test, generated, scores))

    def _train_fresh(self, model: ports.Model, ctx: ports.BuildContext, generator: torch.Generator) -> CaptionTransformer:
        """A small decoder trained on the frozen encoder's tokens of the train split (the encoder is only read:
        its tokens are computed once, without gradients, and it is not in the optimiser)."""
        p, data = self.params, self.data
        pairs = data.paired_train()
        m = len(pairs) if p.max_train_samples is None else min(len(pairs), p.max_train_samples)
        feats = frozen_image_tokens(self.encoder, data, pairs, range(m), device=model.device,
                                    batch_size=p.eval_batch_size)
        tokenizer = tokenizer_for(model, data, ctx)
        decoder = CaptionTransformer(tokenizer, int(self.encoder.width), width=p.width, heads=p.heads,
                                     uni_depth=p.uni_depth, multi_depth=p.multi_depth, attention=p.attention)
        decoder = decoder.to(model.device).train()
        opt = torch.optim.AdamW(decoder.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / p.steps)))
        order = torch.empty(0, dtype=torch.long)
        with torch.enable_grad():  # evaluators may be called under no_grad
            for _ in range(p.steps):
                if order.numel() < p.batch_size:  # epochs of shuffled train samples, drawn from the seeded generator
                    order = torch.cat([order, torch.randperm(m, generator=generator)])
                idx, order = order[: p.batch_size], order[p.batch_size:]
                text = tokenizer([feats.captions[i] for i in idx.tolist()])
                ids, mask = text["input_ids"].to(model.device), text["attention_mask"].to(model.device)
                loss = caption_loss(decoder(ids, mask, feats.tokens[idx].to(model.device)), ids, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        ctx.log(f"{ctx.node}: fresh caption decoder trained {p.steps} steps on {m} frozen train samples "
                f"(final loss {loss.item():.3f})")
        return decoder

    @torch.no_grad()
    def _score(self, decoder: ports.CaptionDecoder, test, device) -> tuple[dict, list[str]]:
        """Teacher-forced token accuracy and perplexity, and the generated captions, on the test tokens."""
        p, tokenizer = self.params, decoder.tokenizer
        nll, correct, count = 0.0, 0, 0
        generated: list[str] = []
        for start in range(0, len(test.indices), p.eval_batch_size):
            image = test.tokens[start : start + p.eval_batch_size].to(device)
            text = tokenizer(test.captions[start : start + p.eval_batch_size])
            ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
            logits = decoder(ids, mask, image)[:, :-1].float()
            real = mask[:, 1:].bool()
            targets = ids[:, 1:][real]
            nll += torch.nn.functional.cross_entropy(logits[real], targets, reduction="sum").item()
            correct += int((logits[real].argmax(-1) == targets).sum())
            count += int(real.sum())
            generated += [tokenizer.decode(g) for g in decoder.generate(image, p.max_len, p.beams, p.length_penalty)]
        metrics = {"token_accuracy": correct / count if count else float("nan"),
                   "perplexity": math.exp(nll / count) if count else float("nan")}
        return metrics, generated

    def _sample_rows(self, test, generated: list[str], scores: dict) -> list[dict]:
        rows = []
        for j in range(min(self.params.num_samples, len(generated))):
            item = self.data.test[test.indices[j]]
            image = self.data.denormalize(item["image"][None])[0]
            rows.append({
                "kind": "caption",
                "sample_id": int(test.sample_ids[j]) if test.sample_ids else test.indices[j],
                "text": generated[j],
                "reference": [test.captions[j]],
                "image": png_bytes(image),
                "info": {"bleu4": scores["bleu4_each"][j], "cider": scores["cider_each"][j], "mode": self.mode},
            })
        return rows


@register(
    "evaluator.captioning",
    params=CaptioningParams,
    output=CaptioningEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model (its tokenizer, when it has one, is the fresh decoder's)"),
        "data": In(ports.PairedData, doc="a fresh decoder trains on its train split; its test split is captioned"),
        "encoder": In(ports.VisionTower, doc="the vision tower under test; frozen (its weights are only read)"),
        "decoder": In(ports.CaptionDecoder, optional=True,
                      doc="the model's own caption decoder (decoder.caption), which then generates"),
    },
    check=check,
)
def build(params: CaptioningParams, inputs: dict, ctx: ports.BuildContext) -> CaptioningEvaluator:
    """Captioning from a frozen vision encoder: BLEU-4, CIDEr, token accuracy, perplexity on the test split.

    The encoder's tokens (CLS + every patch of the full image) are computed once, in eval mode without
    gradients; its weights are never changed. A model with its own decoder (the `decoder` input;
    `decoder_mode` auto or own) captions the test images with it — from the full image's tokens, even
    when it was trained on MAE's masked encoding (MUG). Otherwise (`decoder_mode` fresh, or auto without a
    decoder) a small decoder (`uni_depth` + `multi_depth` layers of `width`) is trained on the frozen
    tokens of the train split for `steps` AdamW steps of `batch_size` at `lr` (cosine decay), with the
    model's tokenizer (a WordPiece trained on the data's captions when the model has none); the same
    budget for every method, and its random draws depend only on the trial seed and this node.

    Metrics on the first `max_samples` test samples: `bleu4` and `cider` (headline) — pycocoevalcap's Bleu(4)
    and Cider scorers on the generated caption (greedy, or beam search with `beams` and `length_penalty`)
    against the sample's caption, both lowercased with punctuation removed and split on whitespace by
    this node (coco-caption's PTBTokenizer, which needs Java, is not used); `token_accuracy` (argmax =
    next token) and `perplexity` (exp of the mean next-token cross-entropy) from teacher-forced logits over
    the reference captions' tokens after [CLS] ([SEP] included); `n`. One reference per image (the data
    gives one caption per sample), so CIDEr's consensus is thin and its values are small-sample numbers.
    The first `num_samples` test samples go to the samples table as kind 'caption' (generated text,
    reference, image, per-sample BLEU-4 and CIDEr, the mode). Generation has no key/value cache.
    """
    decoder = inputs.get("decoder")
    encoder = inputs["encoder"]
    if params.decoder_mode == "own" and decoder is None:
        raise UserError(f"node '{ctx.node}' (evaluator.captioning): decoder_mode 'own' needs the 'decoder' input")
    if decoder is not None and params.decoder_mode != "fresh" and int(decoder.image_width) != int(encoder.width):
        raise UserError(f"node '{ctx.node}' (evaluator.captioning): the decoder reads image tokens of width "
                        f"{decoder.image_width} but the encoder's are {encoder.width}")
    if params.attention == "xformers":
        try:
            resolve_backend("xformers", ctx.device, torch.bfloat16)
        except UserError as e:
            raise UserError(f"node '{ctx.node}' (evaluator.captioning): {e}")
    return CaptioningEvaluator(params, inputs["data"], encoder, decoder)
