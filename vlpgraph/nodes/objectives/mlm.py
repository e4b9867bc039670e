"""objective.mlm: masked language modelling conditioned on the image (ALBEF MLM), through the fusion encoder;
or, with a mixer, on the mixer's cross-modal CutMix sentences through the text tower (VLMixer MLM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower, TokenHead, word_embeddings
from vlpgraph.engine.registry import In, Params, register

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
    under ``ids_key`` so its text-tower pass is memoised apart from the clean one.

    With ``mixer`` (and no ``fusion``): masked-token prediction on the words of the mixer's mixed
    sentences, through the mixer's text tower alone (see the node's doc)."""

    def __init__(self, fusion: FusionTower | None, params: MLMParams, ids_key: str = "mlm_input_ids",
                 mixer: ports.TextMixer | None = None):
        super().__init__()
        if (fusion is None) == (mixer is None):
            raise ValueError("objective.mlm takes a fusion encoder or a mixer, not both or neither")
        self._refs = (fusion, mixer)
        self.weight = params.weight
        self.params = params
        self.ids_key = ids_key
        text = fusion.text if fusion is not None else mixer.text
        tok = text.tokenizer
        self.special_ids = (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id)
        self.mask_id = tok.mask_id
        tied = word_embeddings(text) if params.tie_embeddings else None
        if params.tie_embeddings and tied is None:
            raise ValueError("tie_embeddings needs a text tower that exposes its word embeddings")
        self.head = TokenHead(text.width, tok.vocab_size, tied)
        self.vocab_size = self.head.vocab_size

    @property
    def fusion(self) -> FusionTower | None:
        return self._refs[0]

    @property
    def mixer(self) -> ports.TextMixer | None:
        return self._refs[1]

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
        if self.mixer is not None:
            labels, hidden = self.mixed(fwd)
        else:
            labels = self.masked(fwd)
            hidden = self.fusion.fuse(fwd, ids_key=self.ids_key)  # [B, L, C]
        chosen = labels != -100
        if not chosen.any():  # captions without a single word: nothing to predict
            return {"mlm": hidden.sum() * 0.0}
        logits = self.head(hidden[chosen])  # only the predicted positions go through the vocab projection
        return {"mlm": F.cross_entropy(logits.float(), labels[chosen])}

    def mixed(self, fwd: ports.Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """VLMixer's MLM: ``(labels [B, L], text tower tokens [B, L, C])`` of the step's mixed sentences.

        Only word positions can be chosen (never a visual token, [CLS], [SEP] or padding); the chosen words
        are masked in the ids, re-embedded by the tower's word embeddings, the visual positions keep the
        mixer's visual tokens, and the tower reads the result with ``forward_embeds``. When the mixer
        returns None (nothing replaced this step) the plain sentences are masked and read by the tower."""
        p, text = self.params, self.mixer.text
        cmc = self.mixer.mix(fwd, fwd.batch)
        if cmc is None:
            ids, mask, visual = fwd.batch["input_ids"], fwd.batch["attention_mask"], None
        else:
            ids, mask, visual = cmc.input_ids, cmc.attention_mask, cmc.is_visual
        words = mask if visual is None else mask * ~visual  # the positions masking may choose from
        masked, labels = mask_tokens(ids, words, special_ids=self.special_ids, mask_id=self.mask_id,
                                     vocab_size=self.vocab_size, mask_prob=p.mask_prob,
                                     replace_mask=p.replace_mask, replace_random=p.replace_random)
        if visual is None:
            return labels, text(masked, mask)
        embedded = word_embeddings(text)(masked.clamp_min(0))  # visual positions (-1) are replaced just below
        embeds = torch.where(visual[..., None], cmc.inputs_embeds.to(embedded.dtype), embedded)
        return labels, text.forward_embeds(embeds, mask)


def _one_of(wired: list[str]) -> list[str]:
    """The problem when ``wired`` (of "fusion", "mixer") is not exactly one input."""
    if len(wired) == 1:
        return []
    return ["wire 'fusion' (ALBEF MLM conditioned on the paired image) or 'mixer' (VLMixer MLM on mixed sentences, "
            f"through the text tower), not {'both' if wired else 'neither'}"]


def check(p: MLMParams, inputs: dict) -> list[str]:
    """Exactly one of the two inputs: the fusion encoder (paired MLM) or a mixer (MLM on mixed sentences)."""
    return _one_of([port for port in ("fusion", "mixer") if port in inputs])


@register(
    "objective.mlm",
    params=MLMParams,
    output=MLM,
    # paired unless a text mixer (mixer.cmc) feeds it mixed sentences, which carry their own visual tokens
    requires=lambda p, inputs: frozenset() if inputs.get("mixer") else frozenset({ports.PAIRED}),
    inputs={
        "fusion": In(FusionTower, optional=True, doc="fusion encoder; the masked caption is fused with the image "
                     "(ALBEF MLM, paired data)"),
        "mixer": In(ports.TextMixer, optional=True, doc="instead of fusion: MLM on this mixer's cross-modal CutMix "
                    "sentences, through its text tower alone (VLMixer MLM, e.g. mixer.cmc)"),
    },
    check=check,
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

    With `mixer` instead of `fusion` (VLMixer, unpaired data): the sentences are the mixer's mixed ones
    (mixer.cmc: concept words replaced by visual tokens; the plain sentence where nothing was replaced).
    Only the remaining word positions are masked (visual tokens, [CLS], [SEP] and padding never are) —
    "MLM on the remaining words of the mixed sentence" — and the text tower reads the masked mixed
    sentence from embeddings (forward_embeds), visual tokens in place; the same head predicts the words
    from the tower's output. Reading of VLMixer: its MLM runs in its single-stream encoder over
    the mixed sentence alone, so here the text tower is that encoder: no fusion encoder and no image,
    since unpaired data has no image paired with the sentence. With a mixer at p = 0 this is plain
    text-only BERT MLM (the "MLM only" unpaired baseline).
    """
    fusion, mixer = inputs.get("fusion"), inputs.get("mixer")  # a port left out is None
    problems = _one_of([port for port in ("fusion", "mixer") if inputs.get(port) is not None])
    if problems:
        raise UserError(f"node '{ctx.node}' (objective.mlm): {problems[0]}")
    text = fusion.text if fusion is not None else mixer.text
    if params.tie_embeddings and word_embeddings(text) is None:
        raise UserError(
            f"node '{ctx.node}' (objective.mlm): tie_embeddings needs a text tower that exposes its word "
            "embeddings (encoder.text does); set tie_embeddings: false"
        )
    return MLM(fusion, params, ids_key=f"{ctx.node}_input_ids", mixer=mixer).to(ctx.device)
