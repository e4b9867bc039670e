"""objective.lcl: latent compression learning (LCL) on interleaved image-text documents.

A causal language model reads each document with its images in place (their visual tokens from the
attentive pooler); two terms train the vision tower through it: next-token generation of the text, and
a contrastive term between each image's latent z and the model's state at the ``<soi>`` before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.layers import interleaved as sequences
from vlpgraph.layers.distributed import gather_rows_with_grad
from vlpgraph.layers.temperature import LearnedTemperature, check_temperature_range
from vlpgraph.engine.registry import In, Params, register



class LCLParams(Params):
    gen_weight: float = Field(1.0, ge=0, description="weight of the generation term 'lcl_gen' (0: off, "
                              "not computed: contrastive-only LCL)")
    con_weight: float = Field(0.1, ge=0, description="λ: weight of the contrastive term 'lcl_con' (LCL's "
                              "scripts: 0.1; 0: off, not computed: generation-only, Flamingo-style)")
    embed_dim: int = Field(128, ge=1, description="D: size of the contrastive space (Linear projections of z "
                           "and of the <soi> context feature to D)")
    max_len: int | None = Field(None, ge=8, description="longest sequence in tokens, image blocks (<soi> "
                                "<img>×n <eoi>) included; truncation drops whole image blocks (the sequence "
                                "builder's rule). None: the language model's tokenizer's max_len")
    temperature: float = Field(0.07, gt=0, description="initial temperature τ of the contrastive term "
                               "(logits = cosine / τ; CLIP's init 1/τ = 1/0.07)")
    temperature_min: float = Field(0.01, gt=0, description="τ is clamped to at least this (CLIP clamps its "
                                   "logit scale 1/τ at 100)")
    temperature_max: float = Field(0.5, gt=0, description="τ is clamped to at most this (as objective.itc)")
    learn_temperature: bool = Field(True, description="learn τ (False: keep it fixed)")
    exclude_bos_only: bool = Field(
        True,
        description="also leave out of the contrastive term images whose <soi> follows nothing but the "
        "document's [CLS] (BOS): their context is the one [CLS] state every such image shares. False: "
        "only a <soi> at position 0 is left out (the rule read literally, for sequences without a BOS)",
    )

    @model_validator(mode="after")
    def _temperature_in_range(self) -> "LCLParams":
        check_temperature_range(self.temperature, self.temperature_min, self.temperature_max)
        return self

    @model_validator(mode="after")
    def _some_term(self) -> "LCLParams":
        if self.gen_weight == 0 and self.con_weight == 0:
            raise ValueError("gen_weight and con_weight are both 0: the objective would train nothing")
        return self


@dataclass
class LCLStep:
    """One step's pass (memoised in the Forward). ``seq``: the builder's ``Sequences`` as returned;
    ``labels`` [B, L], ``image_row`` / ``soi_pos`` [K]: its tensors on the step's device; ``hidden``: the
    LM's final hidden states [B, L, C_lm]; ``z``: the latents of the kept images [K, Cv] (in the order of
    ``image_row``); ``has_context`` Bool[K]: which of them enter the contrastive term."""

    seq: object
    labels: torch.Tensor
    image_row: torch.Tensor
    soi_pos: torch.Tensor
    hidden: torch.Tensor
    z: torch.Tensor
    has_context: torch.Tensor


class LCL(LearnedTemperature, ports.DocumentModel):
    """LCL's generation + contrastive objective over interleaved documents; see :func:`build`."""

    def __init__(self, vision: ports.VisionTower, pool: ports.ImagePooler, lm: nn.Module, params: LCLParams):
        super().__init__()
        # held by reference: each is its own graph node (its own entry in the trial's modules)
        self._refs = (vision, pool, lm)
        self.weight = 1.0  # the terms carry their own weights (gen_weight, con_weight)
        self.gen_weight, self.con_weight = params.gen_weight, params.con_weight
        self.max_len = int(params.max_len or lm.tokenizer.max_len)
        self.exclude_bos_only = params.exclude_bos_only
        self.visual_proj = nn.Linear(pool.width, lm.width)  # visual tokens -> the LM's input width
        self.image_proj = nn.Linear(pool.width, params.embed_dim)  # z -> contrastive space
        self.context_proj = nn.Linear(lm.width, params.embed_dim)  # <soi> state -> contrastive space
        self.init_temperature(params.temperature, params.temperature_min, params.temperature_max,
                              params.learn_temperature)

    @property
    def vision(self) -> ports.VisionTower:
        return self._refs[0]

    @property
    def pool(self) -> ports.ImagePooler:
        return self._refs[1]

    @property
    def lm(self) -> nn.Module:
        return self._refs[2]

    @property
    def tokenizer(self) -> ports.Tokenizer:
        return self.lm.tokenizer

    @property
    def generates(self) -> bool:
        return self.gen_weight > 0

    @property
    def contrasts(self) -> bool:
        return self.con_weight > 0

    def step(self, fwd: ports.Forward) -> LCLStep:
        """Vision tower -> pooler -> sequences with the visual tokens in place -> LM. Memoised in ``fwd``."""
        return fwd.memo(("objective.lcl", id(self)), lambda: self._step(fwd))

    def _step(self, fwd: ports.Forward) -> LCLStep:
        vision, pool, lm = self._refs
        batch = fwd.batch
        if "doc_texts" not in batch:
            raise TrialFailed("objective.lcl: the batch holds no documents (doc_texts); train it on data with "
                              f"capability '{ports.INTERLEAVED}' (its train items are documents)")
        tokens = fwd.image_tokens(vision)  # [sum M, prefix + P, Cv], shared with other objectives
        z, visual = pool(tokens[:, int(getattr(vision, "num_prefix_tokens", 1)):])  # CLS dropped, as LCL
        seq = sequences.build_sequences(batch["doc_texts"], batch["doc_layout"], batch["image_doc"], batch["image_index"],
                              lm.tokenizer, visual.shape[1], self.max_len)
        device = tokens.device
        input_ids, kept = seq.input_ids.to(device), seq.kept.to(device)
        image_row, soi_pos = seq.image_row.to(device), seq.soi_pos.to(device)
        embeds = lm.embed(input_ids)  # [B, L, C_lm]
        visual = self.visual_proj(visual[kept]).to(embeds.dtype)  # [K, n, C_lm]
        embeds = sequences.place_visual(embeds, visual, image_row, seq.image_start.to(device))
        hidden = lm(embeds, seq.attention_mask.to(device))
        # an image with nothing before its <soi> has no context to compress into (LCL leaves it out);
        # after a [CLS] (BOS) first, a <soi> at position 1 has nothing but that [CLS] before it
        first = torch.zeros_like(soi_pos)
        if self.exclude_bos_only:
            first = (input_ids[image_row, 0] == lm.tokenizer.cls_id).long()
        return LCLStep(seq=seq, labels=seq.labels.to(device), image_row=image_row, soi_pos=soi_pos,
                       hidden=hidden, z=z[kept], has_context=soi_pos > first)

    def generation_loss(self, step: LCLStep) -> torch.Tensor:
        """Mean next-token CE over the positions whose label is not -100 (the builder's labels are the
        token each position predicts: no shift here)."""
        labels = step.labels
        logits = self.lm.logits(step.hidden)  # [B, L, V]
        if not bool((labels != -100).any()):  # nothing to predict: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def contrastive_loss(self, step: LCLStep) -> torch.Tensor:
        """Symmetric InfoNCE between z and the <soi> context feature of every kept image with context, over
        the global batch (every rank's rows and columns; see :func:`build`)."""
        keep = step.has_context
        context = step.hidden[step.image_row[keep], step.soi_pos[keep]]  # [K', C_lm], final norm applied
        image = F.normalize(self.image_proj(step.z[keep]), dim=-1)
        context = F.normalize(self.context_proj(context), dim=-1)
        all_image, all_context = gather_rows_with_grad(image), gather_rows_with_grad(context)
        tau = self.temperature
        if all_image.shape[0] == 0:  # no image with context anywhere: a zero that keeps the graph
            return (image.sum() + context.sum()) * 0.0 + tau * 0.0
        logits = (all_image @ all_context.T).float() / tau  # [K_global, K_global]
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def score_documents(self, fwd: ports.Forward) -> ports.DocumentScores:
        """The step's pass, scored per token and per image (for evaluator.documents); both scores are
        computed whatever the weights (``generates`` / ``contrasts`` say which were trained)."""
        step = self.step(fwd)
        logits = self.lm.logits(step.hidden).float()
        labels = step.labels
        token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="none").view_as(labels)
        context = step.hidden[step.image_row, step.soi_pos]
        image = F.normalize(self.image_proj(step.z), dim=-1)
        context = F.normalize(self.context_proj(context), dim=-1)
        return ports.DocumentScores(
            input_ids=step.seq.input_ids, labels=labels, token_loss=token_loss, image_row=step.image_row,
            soi_pos=step.soi_pos, kept=step.seq.kept, has_context=step.has_context,
            image_features=image.float(), context_features=context.float())

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        """Named terms 'lcl_gen' (× gen_weight) and 'lcl_con' (× con_weight); a term of weight 0 is neither
        computed nor returned."""
        self.clamp_temperature_()
        step = self.step(fwd)
        terms: dict[str, torch.Tensor] = {}
        if self.gen_weight > 0:
            terms["lcl_gen"] = self.gen_weight * self.generation_loss(step)
        if self.con_weight > 0:
            terms["lcl_con"] = self.con_weight * self.contrastive_loss(step)
        return terms


@register(
    "objective.lcl",
    params=LCLParams,
    output=LCL,
    requires=frozenset({ports.INTERLEAVED}),
    inputs={
        "data": In(ports.PairedData, optional=True, needs=frozenset({ports.INTERLEAVED}),
                   doc="the interleaved training data (optional; wired, validation checks it has documents)"),
        "vision": In(ports.VisionTower, doc="the vision tower it trains; its patch tokens (CLS dropped) go to the pooler"),
        "pool": In(ports.ImagePooler, doc="the attentive pooler (head.attentive_pool): the latent z and the visual tokens"),
        "lm": In(ports.LanguageModel, doc="the causal language model over the documents (encoder.lm)"),
    },
)
def build(params: LCLParams, inputs: dict, ctx: ports.BuildContext) -> LCL:
    """LCL: L = gen_weight·L_gen + con_weight·L_con over interleaved documents.

    Each step: the batch's images (every image of every document, ``batch["images"]``) through the
    vision tower (the step's shared pass), CLS dropped, through the pooler -> z [M, Cv] and n = P visual
    tokens per image; the visual tokens -> Linear(Cv, LM width); ``layers.interleaved.build_sequences``
    turns each document into ``[CLS] … <soi> <img>×n <eoi> … [SEP]`` (truncated at `max_len` before the
    last image block that would not fit whole), the LM's embeddings get each kept image's visual
    tokens at its ``<img>`` slots (``place_visual``), and the LM gives final-normed hidden states.

    'lcl_gen' = gen_weight · mean next-token CE over the builder's labels (text tokens, ``<soi>`` and
    [SEP] as targets; -100 — ``<img>`` placeholders, ``<eoi>``, padding — ignored). 'lcl_con' =
    con_weight · symmetric InfoNCE: image feature = L2(Linear(z)), context feature = L2(Linear(LM state at
    the image's ``<soi>``)), image k's positive is its own context, every other kept image/context a
    negative, both directions, logits = cosine / τ with τ learned (init `temperature`, clamped into
    [temperature_min, temperature_max], straight-through as objective.itc). Images left out of it:
    those truncated away, and those with no context — a ``<soi>`` at position 0, and with
    `exclude_bos_only` (default) one right after the document's [CLS]. A weight of 0 turns its term off
    (not computed, not logged): contrastive-only and generation-only LCL are this node with weights.

    Under torchrun both features are gathered with gradient from every rank (each rank keeps a different
    number of images, so counts are exchanged and rows padded for the gather) and every rank scores the
    whole global batch — all rows against all columns — so 'lcl_con' on each rank is the global batch's
    loss; the gather's backward sums each rank's copy into the rows' owner and the trainer's gradient
    average then gives exactly the global loss's gradient. 'lcl_gen' is each rank's own tokens.

    Deviations from LCL's official code: the rule "``<soi>`` at position 0 has no context"
    is applied, by default, to the first position after [CLS], because the sequences here start with
    [CLS] (`exclude_bos_only`); τ itself is the learned parameter, clamped as in objective.itc
    (CLIP learns log(1/τ), init 1/0.07, clamped at 1/τ = 100: `temperature_min` 0.01 is that bound);
    the contrastive rows are the whole global batch on every rank instead of each rank's own rows
    against the global columns (the same gradient after the average; the logged loss is the global one);
    the projections' sizes (`embed_dim`) and the visual projection are this repository's choice.
    """
    vision, pool, lm = inputs["vision"], inputs["pool"], inputs["lm"]
    if int(pool.width) != int(vision.width):
        raise UserError(f"node '{ctx.node}' (objective.lcl): the pooler is {pool.width} wide and the vision tower "
                        f"{vision.width}; wire the pooler built on this tower")
    for attr in ("soi_id", "img_id", "eoi_id"):
        if not hasattr(lm.tokenizer, attr):
            raise UserError(f"node '{ctx.node}' (objective.lcl): the language model's tokenizer has no {attr} "
                            "(image-block special tokens <soi> <img> <eoi>)")
    obj = LCL(vision, pool, lm, params)
    n_visual = math.prod(getattr(vision, "grid_size", (0,)))  # one visual token per patch
    if obj.max_len < n_visual + 4:  # [CLS] <soi> <img>×n <eoi> [SEP]
        raise UserError(f"node '{ctx.node}' (objective.lcl): max_len {obj.max_len} cannot hold one image block "
                        f"([CLS] <soi> {n_visual}×<img> <eoi> [SEP] = {n_visual + 4} tokens)")
    return obj.to(ctx.device)
