"""evaluator.transfer_retrieval: retrieval through a light image head on a frozen vision encoder and a
small text tower trained from scratch against it (R@1/5/10 both ways)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from transformers import BertConfig, BertModel

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import (first_hit_ranks, frozen_image_tokens, minibatches, recall_at,
                                 recall_ks_degenerate, recall_ks_refusal, recall_ks_too_large, seeded,
                                 tokenizer_for)
from vlpgraph.layers.attention import transformers_attention_name
from vlpgraph.layers.pooling import AttentivePool
from vlpgraph.engine.registry import In, Params, register, size_of


class TransferRetrievalParams(Params):
    embed_dim: int = Field(64, ge=2, description="dimension of the shared embedding both heads project to")
    pool_heads: int = Field(4, ge=1, le=64, description="attention heads of the image side's attentive pool "
                            "(divides the encoder's width)")
    width: int = Field(64, ge=8, le=4096, description="the text tower's hidden size (divisible by heads)")
    depth: int = Field(2, ge=1, le=24, description="the text tower's transformer layers")
    heads: int = Field(2, ge=1, le=64, description="the text tower's attention heads")
    max_len: int = Field(32, ge=3, le=512, description="tokens per caption incl. [CLS] and [SEP] (text tower "
                         "positions); longer captions are cut")
    steps: int = Field(200, ge=1, description="optimiser steps of both heads (the fixed budget, same for every method)")
    batch_size: int = Field(128, ge=2, description="training pairs per step (the contrastive negatives)")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (cosine decay to 0 over `steps`)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    init_temperature: float = Field(0.07, gt=0, le=1, description="initial softmax temperature (learned; "
                                    "CLIP's init; its inverse is capped at 100)")
    ks: list[int] = Field([1, 5, 10], min_length=1, description="the k of each recall@k")
    feature_batch_size: int = Field(256, ge=1, description="images per forward pass of the frozen encoder")
    max_train_samples: int | None = Field(
        None, ge=2, description="train the heads on the first N training pairs only (None: all). The split's "
        "frozen tokens are held in memory (N x tokens x width x 4 bytes): cap N for large data")

    @field_validator("ks")
    @classmethod
    def _positive_unique(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        return sorted(set(ks))

    def problems(self) -> list[tuple[str, str]]:
        if self.width % self.heads:
            return [("width", f"width ({self.width}) must be divisible by heads ({self.heads})")]
        return []


def check(p: TransferRetrievalParams, inputs: dict) -> list[tuple[str, str]]:
    """ks against the test split's size when the data knows it before building (as evaluator.retrieval)."""
    found = []
    for data in inputs.get("data", []):
        if data.get("test_size") is None:
            continue
        bad = recall_ks_too_large(p.ks, data["test_size"])  # an upper bound still refuses correctly
        if bad:
            found.append(("ks", recall_ks_refusal(bad, f"'{data['node']}' has {size_of(data, 'test_size')}")))
    return found


class ImageHead(nn.Module):
    """Frozen patch tokens [B, P, C] -> attentive pool -> linear -> L2-normalised [B, D]."""

    def __init__(self, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.pool = AttentivePool(width, heads)
        self.proj = nn.Linear(self.pool.out_dim, embed_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.pool(patches)), dim=-1)


class TextHead(nn.Module):
    """A small BERT from scratch (transformers, attention through ``attend``): ids -> mean of the non-pad
    tokens -> linear -> L2-normalised [B, D]."""

    def __init__(self, p: TransferRetrievalParams, tokenizer: ports.Tokenizer):
        super().__init__()
        cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=p.width, num_hidden_layers=p.depth,
                         num_attention_heads=p.heads, intermediate_size=4 * p.width, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, max_position_embeddings=p.max_len,
                         pad_token_id=tokenizer.pad_id, use_cache=False)
        self.bert = BertModel._from_config(cfg, attn_implementation=transformers_attention_name("auto"),  # noqa: SLF001
                                           add_pooling_layer=False)
        self.proj = nn.Linear(p.width, p.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return F.normalize(self.proj(ports.pool_caption(tokens, mask, "mean")), dim=-1)


class TransferRetrieval(ports.Evaluator):
    """Trains an image head and a text tower contrastively on the frozen features; see :func:`build`."""

    headline = "rsum"  # as evaluator.retrieval

    def __init__(self, params: TransferRetrievalParams, data: ports.PairedData, encoder: ports.VisionTower):
        self.params = params
        self.data = data
        self.encoder = encoder

    def _tokenize(self, tokenizer: ports.Tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = tokenizer(captions)
        # the text tower has max_len positions; a tokenizer that cuts later is cut here (SEP may go)
        return out["input_ids"][:, : self.params.max_len], out["attention_mask"][:, : self.params.max_len]

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p = self.params
        device = model.device
        prefix = int(self.encoder.num_prefix_tokens)
        pairs = self.data.paired_train()
        n_train = len(pairs) if p.max_train_samples is None else min(len(pairs), p.max_train_samples)
        train = frozen_image_tokens(self.encoder, self.data, pairs, range(n_train), device=device,
                                    batch_size=p.feature_batch_size)
        test = frozen_image_tokens(self.encoder, self.data, self.data.test, device=device,
                                   batch_size=p.feature_batch_size)
        tokenizer = tokenizer_for(model, self.data, ctx)
        train_ids, train_mask = self._tokenize(tokenizer, train.captions)
        test_ids, test_mask = self._tokenize(tokenizer, test.captions)
        # identical caption texts are one key: positives of each other in training, hits in the ranking
        keys: dict[str, int] = {}
        train_keys = torch.tensor([keys.setdefault(c, len(keys)) for c in train.captions])
        test_keys = torch.tensor([keys.setdefault(c, len(keys)) for c in test.captions])
        ctx.log(f"{ctx.node}: transfer retrieval on {len(train.captions)} training pairs, "
                f"{len(test.captions)} test pairs")

        with seeded(ctx) as gen:
            image_head = ImageHead(int(self.encoder.width), p.pool_heads, p.embed_dim).to(device)
            text_head = TextHead(p, tokenizer).to(device)
            logit_scale = nn.Parameter(torch.tensor(math.log(1 / p.init_temperature), device=device))
            params = [*image_head.parameters(), *text_head.parameters(), logit_scale]
            opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.steps)
            patches = train.tokens[:, prefix:].to(device)
            image_head.train(), text_head.train()
            with torch.enable_grad():  # evaluators may run inside no_grad; the heads train
                for batch in minibatches(len(train_keys), p.batch_size, p.steps, gen):
                    ids, mask = _trim(train_ids[batch], train_mask[batch])
                    img = image_head(patches[batch.to(device)])
                    txt = text_head(ids.to(device), mask.to(device))
                    k = train_keys[batch].to(device)
                    same = (k[:, None] == k[None, :]).float()
                    target = same / same.sum(1, keepdim=True)  # duplicates share the target mass
                    logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
                    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            image_head.eval(), text_head.eval()
            with torch.no_grad():
                img_emb, txt_emb = [], []
                for s in range(0, len(test_keys), 256):
                    img_emb.append(image_head(test.tokens[s : s + 256, prefix:].to(device)).float().cpu())
                    ids, mask = _trim(test_ids[s : s + 256], test_mask[s : s + 256])
                    txt_emb.append(text_head(ids.to(device), mask.to(device)).float().cpu())
                images, texts = torch.cat(img_emb), torch.cat(txt_emb)
        i2t = recall_at(first_hit_ranks(images, texts, test_keys, test_keys), p.ks)
        t2i = recall_at(first_hit_ranks(texts, images, test_keys, test_keys), p.ks)
        metrics = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
        metrics["rsum"] = sum(metrics.values())
        metrics["n"] = float(len(test_keys))
        return ports.EvalResult(metrics=metrics)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns a batch does not need (captions were padded to the split's longest)."""
    n = max(1, int(mask.sum(1).max()))
    return ids[:, :n], mask[:, :n]


@register(
    "evaluator.transfer_retrieval",
    params=TransferRetrievalParams,
    output=TransferRetrieval,
    inputs={
        "model": In(ports.Model, doc="the trained model (its tokenizer is used when it has one)"),
        "data": In(ports.PairedData, doc="trained on its train split, searched on its test split"),
        "encoder": In(ports.VisionTower, doc="the vision tower whose frozen patch tokens are read"),
    },
    check=check,
)
def build(params: TransferRetrievalParams, inputs: dict, ctx: ports.BuildContext) -> TransferRetrieval:
    """Image<->text retrieval recall@k through light heads on a frozen vision encoder (i2t_r1 ... t2i_r10, rsum).

    Lets a model without a text tower (an MAE, a captioner) be compared on retrieval with a CLIP: the
    text side never sees the trained model's text tower. The encoder runs once per evaluation over
    every train and test item (eval mode, no_grad; its weights stay bit-identical). Image side: a
    learned single-query attention pool over the patch tokens (prefix excluded; ``pool_heads`` heads,
    ``layers.pooling.AttentivePool``) and a linear map to ``embed_dim``. Text side: a small BERT
    (transformers ``BertModel``: ``width``/``depth``/``heads``, from scratch; the same family as
    encoder.text, and a well-kept implementation rather than a hand-written one; attention through
    vlpgraph.layers.attention) on the model's tokenizer, or a WordPiece trained on the data's captions
    when the model has none; mean of its non-pad tokens, then linear. Both train jointly with symmetric InfoNCE and a learned temperature (CLIP's init, inverse
    capped at 100) for exactly ``steps`` AdamW steps of ``batch_size`` pairs (cosine decay from ``lr``),
    from the evaluator's own seed (trial seed, node). Identical caption texts are positives of each
    other in a batch (their target mass is shared), as they are hits in the ranking.

    The budget is the same for every method: these params alone decide how the heads train (nothing
    is read from the model or its trainer). Metrics as evaluator.retrieval, on the whole test split:
    i2t_r{k}, t2i_r{k} for each k in ``ks``, rsum (their sum, the headline) and n (pairs searched);
    identical captions count as hits, ties count against the model. A k that reaches the test split's
    size is refused (at validation when the data knows it, else before training); one of at least half
    of it is accepted with a warning giving the chance level.
    """
    encoder = inputs["encoder"]
    who = f"node '{ctx.node}' (evaluator.transfer_retrieval)"
    if int(encoder.width) % params.pool_heads:
        raise UserError(f"{who}: pool_heads {params.pool_heads} does not divide the encoder's width "
                        f"{int(encoder.width)}")
    n = len(inputs["data"].test)
    bad = recall_ks_too_large(params.ks, n)
    if bad:
        raise UserError(f"{who}: {recall_ks_refusal(bad, f'{n} pairs')}")
    weak = recall_ks_degenerate(params.ks, n)
    if weak:
        chance = ", ".join(f"R@{k} {k / n:.2f}" for k in weak)
        ctx.log(f"warning: {who}: on {n} test pairs, recall at k >= n/2 says little (chance level: {chance}); "
                "rsum is inflated by it")
    return TransferRetrieval(params, inputs["data"], encoder)
