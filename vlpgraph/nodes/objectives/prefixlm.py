"""objective.prefixlm: prefix language modelling conditioned on the image (SimVLM-style PrefixLM) through the
fusion encoder: the caption's prefix is read bidirectionally, its remainder generated left to right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower, TokenHead, word_embeddings
from vlpgraph.engine.registry import In, Params, register


def continuation_table(tokenizer) -> torch.Tensor | None:
    """Bool [vocab]: token id is a WordPiece continuation (``##...``), i.e. not the start of a word.
    None when the tokenizer does not say (then every token position counts as a word boundary)."""
    hf = getattr(tokenizer, "tok", None)
    id_to_token = getattr(hf, "id_to_token", None)
    if not callable(id_to_token):
        return None
    return torch.tensor([(id_to_token(i) or "").startswith("##") for i in range(tokenizer.vocab_size)], dtype=torch.bool)


def split_points(input_ids: torch.Tensor, attention_mask: torch.Tensor, continuation: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per caption, the first generated position P [B] (long): uniform over the word starts in
    1 .. length-1 (length counts [CLS] and [SEP]; [SEP] itself is always a candidate). Positions < P are
    the prefix."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    length = attention_mask.long().sum(1, keepdim=True)
    ok = (pos >= 1) & (pos < length)
    if continuation is not None:
        cont = continuation.to(input_ids.device)[input_ids.clamp(0, len(continuation) - 1)]
        ok = ok & (~cont | (pos == length - 1))
    ok = ok | ((pos == 1) & ~ok.any(1, keepdim=True))  # a caption of [CLS] alone: P = 1, nothing predicted
    weights = ok.float() if generator is None else ok.float().cpu()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(input_ids.device)


def prefix_lm_mask(attention_mask: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """Bool [B, L, L]: query i may attend key j iff j is a real token and (j < P or j <= i) — the prefix
    (positions < P) is visible to every position and attends only to itself; the rest is causal."""
    l = attention_mask.shape[1]
    pos = torch.arange(l, device=attention_mask.device)
    j, i = pos[None, None, :], pos[None, :, None]
    visible = (j < split[:, None, None]) | (j <= i)
    return attention_mask.bool()[:, None, :] & visible


class PrefixLMParams(Params):
    weight: float = Field(1.0, ge=0, description="weight of the 'prefixlm' term in the total loss")
    tie_embeddings: bool = Field(
        True, description="the head's output weights are the text tower's word embeddings; needs a tower that "
        "exposes them (encoder.text does). False: a separate Linear(width, vocab)"
    )


class PrefixLM(ports.Objective):
    """Next-token prediction of a caption's suffix from its prefix and the image."""

    def __init__(self, fusion: FusionTower, params: PrefixLMParams, mask_key: str = "prefixlm_attention_mask"):
        super().__init__()
        self._refs = (fusion,)
        self.weight = params.weight
        self.mask_key = mask_key
        tok = fusion.text.tokenizer
        tied = word_embeddings(fusion.text) if params.tie_embeddings else None
        if params.tie_embeddings and tied is None:
            raise ValueError("tie_embeddings needs a text tower that exposes its word embeddings")
        self.head = TokenHead(fusion.width, tok.vocab_size, tied)
        table = continuation_table(tok)
        self.register_buffer("continuation", table if table is not None else torch.zeros(0, dtype=torch.bool),
                             persistent=False)

    @property
    def fusion(self) -> FusionTower:
        return self._refs[0]

    def _write_mask(self, batch: dict, split: torch.Tensor) -> None:
        pos = torch.arange(batch["input_ids"].shape[1], device=split.device)
        keep = (pos[None, :] < split[:, None]).to(batch["attention_mask"].dtype)
        batch[self.mask_key] = batch["attention_mask"] * keep  # prefix only

    def split(self, fwd: ports.Forward) -> torch.Tensor:
        """The step's split points [B] (memoised); writes the prefix-only text mask into ``batch[mask_key]``."""

        def compute() -> torch.Tensor:
            b = fwd.batch
            table = self.continuation if self.continuation.numel() else None
            split = split_points(b["input_ids"], b["attention_mask"], table)
            self._write_mask(b, split)
            return split

        return fwd.memo(("objective.prefixlm/split", id(self)), compute)

    def _run(self, fwd: ports.Forward, split: torch.Tensor):
        batch, fusion = fwd.batch, self.fusion
        # The text tower reads the caption with only the prefix attendable: a suffix position's output
        # depends on its own token and the prefix, never on a later token.
        text = fwd.text_tokens(fusion.text, "input_ids", self.mask_key)
        image = fwd.image_tokens(fusion.vision)
        mask, ids = batch["attention_mask"], batch["input_ids"]
        fused = fusion(text, mask, image, attn_mask=prefix_lm_mask(mask, split))  # [B, L, C]
        nxt = torch.arange(1, ids.shape[1], device=ids.device)
        predicted = mask[:, 1:].bool() & (nxt[None, :] >= split[:, None])
        return fused, ids[:, 1:], predicted

    def logits(self, fwd: ports.Forward, split: torch.Tensor | None = None):
        """(logits [B, L-1, V], targets [B, L-1], predicted [B, L-1] bool): position t predicts token t+1;
        ``predicted`` marks the suffix targets (P <= t+1 < length). ``split`` [B] overrides the random
        split (pass a fresh Forward then: the text pass is memoised by its mask key)."""
        if split is None:
            split = self.split(fwd)
        else:
            self._write_mask(fwd.batch, split)
        fused, targets, predicted = self._run(fwd, split)
        return self.head(fused[:, :-1]), targets, predicted

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        fused, targets, predicted = self._run(fwd, self.split(fwd))
        if not predicted.any():
            return {"prefixlm": fused.sum() * 0.0}
        logits = self.head(fused[:, :-1][predicted])  # only the suffix positions go through the vocab projection
        return {"prefixlm": F.cross_entropy(logits.float(), targets[predicted])}


@register(
    "objective.prefixlm",
    params=PrefixLMParams,
    output=PrefixLM,
    requires=frozenset({ports.PAIRED}),
    inputs={"fusion": In(FusionTower, doc="fusion encoder, run with a prefix-LM mask as the caption decoder")},
)
def build(params: PrefixLMParams, inputs: dict, ctx: ports.BuildContext) -> PrefixLM:
    """Prefix language modelling conditioned on the image: continue a caption from its prefix.

    Each step splits every caption at a random word start P (uniform over 1 .. length-1, [SEP]
    included, so P = 1 is plain captioning and the prefix is never empty of [CLS]). The text tower
    reads the caption with only the prefix attendable (its mask goes into the batch as
    `<node>_attention_mask`, a memoised pass of its own), so a suffix token's output depends on
    that token and the prefix only. The fusion encoder then runs with a prefix-LM self-attention
    mask (prefix positions see the whole prefix; a suffix position also sees the suffix up to
    itself) and cross-attends to the image; a BERT LM head (tied to the word embeddings with
    `tie_embeddings`) at position t predicts token t+1 for every suffix token, [SEP] included:
    loss 'prefixlm' = mean cross-entropy over them. Not part of ALBEF (SimVLM's PrefixLM objective on
    ALBEF's towers): the decoder is the shared fusion encoder with a different mask, not a separate
    decoder, and the text tower gives the suffix tokens their embeddings.
    """
    fusion = inputs["fusion"]
    if params.tie_embeddings and word_embeddings(fusion.text) is None:
        raise UserError(
            f"node '{ctx.node}' (objective.prefixlm): tie_embeddings needs a text tower that exposes its word "
            "embeddings (encoder.text does); set tie_embeddings: false"
        )
    return PrefixLM(fusion, params, mask_key=f"{ctx.node}_attention_mask").to(ctx.device)
