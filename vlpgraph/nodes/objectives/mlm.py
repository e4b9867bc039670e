"""objective.mlm: masked language modelling conditioned on the image (ALBEF MLM), through the fusion encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlpgraph import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower, TokenHead, word_embeddings
from vlpgraph.registry import In, Params, register

IGNORE = -100  # cross-entropy's ignore_index: positions that are not predicted


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_ids: list[int] | tuple[int, ...],
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    replace_mask: float = 0.8,
    replace_random: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``(masked_ids, labels)``, both [B, L].

    Each real token that is not a special id is chosen with probability ``mask_prob``; a chosen
    token becomes ``mask_id`` with probability ``replace_mask``, a random non-special id with
    ``replace_random``, else stays. ``labels`` hold the original id at chosen positions and -100
    elsewhere. If nothing in the batch was chosen, one eligible token per row is (so the loss is
    defined). ``generator`` (a CPU generator) makes the draw reproducible.
    """
    device = input_ids.device
    specials = torch.tensor(sorted(set(special_ids)), device=device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, specials)

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(device)

    chosen = eligible & (rand(input_ids.shape) < mask_prob)
    if not chosen.any():
        rows = eligible.any(1)
        if rows.any():
            pick = torch.multinomial(eligible[rows].float().cpu(), 1, generator=generator).to(device)
            forced = torch.zeros_like(eligible)
            forced[rows] = forced[rows].scatter(1, pick, True)
            chosen = forced
    u = rand(input_ids.shape)
    to_mask = chosen & (u < replace_mask)
    to_random = chosen & (u >= replace_mask) & (u < replace_mask + replace_random)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[specials[specials < vocab_size]] = False
    allowed[mask_id] = False
    candidates = allowed.nonzero().squeeze(1)
    random_ids = candidates[(rand(input_ids.shape) * len(candidates)).long().clamp_max(len(candidates) - 1)]
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    return masked, labels


class MLMParams(Params):
    weight: float = Field(1.0, ge=0, description="weight of the 'mlm' term in the total loss")
    mask_prob: float = Field(0.15, gt=0, le=1, description="share of eligible tokens (not PAD/CLS/SEP) chosen for prediction")
    replace_mask: float = Field(0.8, ge=0, le=1, description="share of chosen tokens replaced by [MASK]")
    replace_random: float = Field(0.1, ge=0, le=1, description="share of chosen tokens replaced by a random word; the rest are kept")
    tie_embeddings: bool = Field(
        True, description="the head's output weights are the text tower's word embeddings (BERT/ALBEF); "
        "needs a tower that exposes them (encoder.text does). False: a separate Linear(width, vocab)"
    )

    def problems(self) -> list[tuple[str, str]]:
        if self.replace_mask + self.replace_random > 1:
            return [("replace_random", f"replace_mask + replace_random ({self.replace_mask} + {self.replace_random}) exceeds 1")]
        return []


class MLM(ports.Objective):
    """Masked-token prediction through the fusion encoder; the masked caption is written into the batch
    under ``ids_key`` so its text-tower pass is memoised apart from the clean one."""

    def __init__(self, fusion: FusionTower, params: MLMParams, ids_key: str = "mlm_input_ids"):
        super().__init__()
        self._refs = (fusion,)
        self.weight = params.weight
        self.params = params
        self.ids_key = ids_key
        tok = fusion.text.tokenizer
        self.special_ids = (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id)
        self.mask_id = tok.mask_id
        tied = word_embeddings(fusion.text) if params.tie_embeddings else None
        if params.tie_embeddings and tied is None:
            raise ValueError("tie_embeddings needs a text tower that exposes its word embeddings")
        self.head = TokenHead(fusion.width, tok.vocab_size, tied)
        self.vocab_size = self.head.vocab_size

    @property
    def fusion(self) -> FusionTower:
        return self._refs[0]

    def masked(self, fwd: ports.Forward) -> torch.Tensor:
        """Masks the batch's captions once per Forward: writes ``batch[ids_key]``, returns the labels [B, L]."""

        def compute() -> torch.Tensor:
            p = self.params
            ids, labels = mask_tokens(
                fwd.batch["input_ids"], fwd.batch["attention_mask"], special_ids=self.special_ids,
                mask_id=self.mask_id, vocab_size=self.vocab_size, mask_prob=p.mask_prob,
                replace_mask=p.replace_mask, replace_random=p.replace_random,
            )
            fwd.batch[self.ids_key] = ids
            return labels

        return fwd.memo(("objective.mlm/labels", id(self)), compute)

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        labels = self.masked(fwd)
        fused = self.fusion.fuse(fwd, ids_key=self.ids_key)  # [B, L, C]
        chosen = labels != -100
        if not chosen.any():  # captions without a single word: nothing to predict
            return {"mlm": fused.sum() * 0.0}
        logits = self.head(fused[chosen])  # only the predicted positions go through the vocab projection
        return {"mlm": F.cross_entropy(logits.float(), labels[chosen])}


@register(
    "objective.mlm",
    params=MLMParams,
    output=MLM,
    # paired unless a text mixer (mixer.cmc) feeds it mixed sentences, which carry their own visual tokens
    requires=lambda p, inputs: frozenset() if inputs.get("mixer") else frozenset({ports.PAIRED}),
    inputs={"fusion": In(FusionTower, doc="fusion encoder; the masked caption is fused with the image")},
)
def build(params: MLMParams, inputs: dict, ctx: ports.BuildContext) -> MLM:
    """Masked language modelling conditioned on the image (ALBEF MLM).

    Each step masks the batch's captions BERT-style: every token except [PAD]/[CLS]/[SEP] is chosen
    with probability `mask_prob`; a chosen token becomes [MASK] (`replace_mask`), a random word
    (`replace_random`) or stays. The masked ids go into the batch as `<node>_input_ids`, so the
    text tower runs on them in a pass of its own (memoised); the fusion encoder fuses them with
    the image tokens, and a BERT LM head (Linear -> GELU -> LayerNorm -> Linear(width, vocab), the
    last tied to the text tower's word embeddings with `tie_embeddings`) predicts the original ids
    at the chosen positions: loss 'mlm' = cross-entropy there. If no token of a batch was chosen,
    one per caption is. Deviations from ALBEF: random replacements never draw a special token, and
    no momentum-distilled soft targets (ALBEF's optional MLM distillation).
    """
    fusion = inputs["fusion"]
    if params.tie_embeddings and word_embeddings(fusion.text) is None:
        raise UserError(
            f"node '{ctx.node}' (objective.mlm): tie_embeddings needs a text tower that exposes its word "
            "embeddings (encoder.text does); set tie_embeddings: false"
        )
    return MLM(fusion, params, ids_key=f"{ctx.node}_input_ids").to(ctx.device)
