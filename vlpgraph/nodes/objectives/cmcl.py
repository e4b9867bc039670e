"""objective.cmcl: cross-modal CutMix contrastive loss (VLMixer's CMCL).

A sentence and its cross-modal CutMix view (mixer.cmc) are a positive pair; the other sentences of the
batch and their views are the negatives.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.distributed import gather_with_grad, world
from vlpgraph.layers.temperature import LearnedTemperature, check_temperature_range
from vlpgraph.engine.registry import In, Params, register


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """½·(CE(a -> b) + CE(b -> a)) with logits = a·bᵀ / τ, row i of ``b`` the positive of row i of ``a``.

    a, b: [B, D], L2-normalised. Under torchrun both are gathered from every rank with gradient and each
    rank scores its rows against the global columns (as objective.itc). Returns an fp32 scalar."""
    rank, _ = world()
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits_ab = (a @ gather_with_grad(b).T).float() / temperature  # fp32 softmax under bf16 autocast
    logits_ba = (b @ gather_with_grad(a).T).float() / temperature
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


class CMCLParams(Params):
    embed_dim: int = Field(128, ge=1, description="D: the projection's output size (text width -> D)")
    weight: float = Field(1.0, ge=0, description="weight of the 'cmcl' term in the total loss (VLMixer: 1)")
    temperature: float = Field(0.07, gt=0, description="initial temperature τ (logits = cosine / τ)")
    temperature_min: float = Field(0.001, gt=0, description="τ is clamped to at least this")
    temperature_max: float = Field(0.5, gt=0, description="τ is clamped to at most this")
    learn_temperature: bool = Field(True, description="learn τ (False: keep it fixed)")
    text_pool: Literal["cls", "mean"] = Field(
        "mean", description="sentence feature: 'cls' (VLMixer's CLS) or the mean of the non-pad tokens (visual "
        "tokens included); mean by default as objective.itc's, since a from-scratch post-LN BERT gives nearly "
        "one CLS vector for every sentence at init"
    )

    @model_validator(mode="after")
    def _temperature_in_range(self) -> "CMCLParams":
        check_temperature_range(self.temperature, self.temperature_min, self.temperature_max)
        return self


class CMCL(LearnedTemperature, ports.Objective):
    """Holds the text tower and the mixer by reference (their own graph nodes); owns the projection and τ."""

    def __init__(self, text: ports.TextTower, mixer: ports.TextMixer, params: CMCLParams):
        super().__init__()
        self._refs = (text, mixer)
        self.weight = params.weight
        self.text_pool = params.text_pool
        self.proj = nn.Linear(text.width, params.embed_dim)
        self.init_temperature(params.temperature, params.temperature_min, params.temperature_max,
                              params.learn_temperature)

    @property
    def text(self) -> ports.TextTower:
        return self._refs[0]

    @property
    def mixer(self) -> ports.TextMixer:
        return self._refs[1]

    def embed(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text tower tokens [B, L, C] -> L2-normalised projection of the pooled feature [B, D]."""
        return F.normalize(self.proj(ports.pool_caption(tokens, attention_mask, self.text_pool)), dim=-1)

    def features(self, fwd: ports.Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """(sentences, their CMC views): [B, D] each. The plain pass is the step's shared text pass; the
        view is the text tower on the mixer's embeddings (the sentence itself where nothing was mixed)."""
        b = fwd.batch
        plain = self.embed(fwd.text_tokens(self.text), b["attention_mask"])
        cmc = self.mixer.mix(fwd, b)
        if cmc is None:
            return plain, plain
        view = fwd.memo(("objective.cmcl/view", id(self.mixer), id(self.text)),
                        lambda: self.text.forward_embeds(cmc.inputs_embeds, cmc.attention_mask))
        return plain, self.embed(view, cmc.attention_mask)

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        self.clamp_temperature_()
        plain, view = self.features(fwd)
        return {"cmcl": symmetric_infonce(plain, view, self.temperature)}


@register(
    "objective.cmcl",
    params=CMCLParams,
    output=CMCL,
    inputs={
        "text": In(ports.TextTower, doc="the text tower: reads each sentence and its mixed view (the mixer's own tower)"),
        "mixer": In(ports.TextMixer, doc="makes the CMC view of each sentence (mixer.cmc)"),
    },
)
def build(params: CMCLParams, inputs: dict, ctx: ports.BuildContext) -> CMCL:
    """Cross-modal CutMix contrastive loss (VLMixer's CMCL): a sentence against its mixed view.

    Each step: the text tower reads the batch's sentences (the step's shared text pass) and, with
    forward_embeds, their CMC views from the mixer (mixer.cmc: concept words replaced by visual tokens
    of image regions; memoised, the view objective.mlm masks too); each is pooled (`text_pool`: the
    CLS token, or by default the mean of the non-pad tokens as objective.itc), projected by one shared
    Linear(width -> embed_dim) and L2-normalised. Loss 'cmcl' = ½·(CE(sentence -> view) +
    CE(view -> sentence)), logits = cosine / τ, the view of sentence i its positive and the other
    sentences' views (resp. sentences) the negatives; under torchrun the global batch's. τ starts at
    `temperature` and, with `learn_temperature`, is learned and clamped into [temperature_min,
    temperature_max] (objective.itc's convention). A sentence with nothing replaced is its own view
    (when the mixer replaced nothing in the whole batch, both sides are the plain sentences).
    Assumptions (no official code): one projection for both sides (the two are views of one
    sentence, in one space); the temperature and its range are objective.itc's defaults.
    """
    text, mixer = inputs["text"], inputs["mixer"]
    if getattr(mixer, "text", text) is not text:
        raise UserError(f"node '{ctx.node}' (objective.cmcl): its text tower must be the one its mixer mixes for "
                        "(wire the same encoder.text node to both)")
    return CMCL(text, mixer, params).to(ctx.device)
