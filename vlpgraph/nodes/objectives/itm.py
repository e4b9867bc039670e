"""objective.itm: image-text matching with hard negatives (ALBEF ITM) through the fusion encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.layers.fusion import FusionTower
from vlpgraph.engine.registry import In, Params, register

ALBEF_EPS = 1e-4  # ALBEF adds this to the softmax weights before zeroing the positives


def same_caption(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: captions i and j are token-for-token identical (padding ignored)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def sample_negatives(sim: torch.Tensor, exclude: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard negative per row: index j drawn from softmax(sim[i]) (+1e-4, as ALBEF) with the
    diagonal and ``exclude[i]`` (e.g. duplicates of the positive) given zero weight. A row whose
    every candidate is excluded falls back to uniform over j != i. sim: [B, B]; returns long [B]."""
    b = sim.shape[0]
    if b < 2 or sim.shape != (b, b):
        raise ValueError(f"sample_negatives: needs a square similarity of at least 2 x 2, got {tuple(sim.shape)}")
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    banned = eye if exclude is None else (eye | exclude.bool())
    weights = (torch.softmax(sim.detach().float(), dim=1) + ALBEF_EPS).masked_fill(banned, 0.0)
    empty = weights.sum(1) == 0
    weights = torch.where(empty[:, None], (~eye).float(), weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class ITMParams(Params):
    weight: float = Field(1.0, ge=0, description="weight of the 'itm' term in the total loss")


class ITM(ports.Objective):
    """Binary matched / not-matched classifier on the fusion encoder's CLS, with hard negatives drawn
    from the embedder's similarity. Fusion tower and embedder are held by reference (own graph nodes)."""

    def __init__(self, fusion: FusionTower, embedder: ports.Objective, params: ITMParams):
        super().__init__()
        self._refs = (fusion, embedder)
        self.weight = params.weight
        self.head = nn.Linear(fusion.width, 2)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def fusion(self) -> FusionTower:
        return self._refs[0]

    @property
    def embedder(self) -> ports.Embedder:
        return self._refs[1]

    def similarity(self, fwd: ports.Forward) -> torch.Tensor:
        """Image-to-text similarity [B, B] of the embedder (cosine / its temperature), no gradient.

        The embeddings are computed with gradient enabled (they are memoised in ``fwd``, and the
        contrastive objective may read the same memo afterwards), then detached here."""
        img = self.embedder.embed_images(fwd).detach()
        txt = self.embedder.embed_texts(fwd).detach()
        with torch.no_grad():
            sim = img.float() @ txt.float().T
            temp = getattr(self.embedder, "temperature", None)
            if temp is not None:
                sim = sim / (temp.detach().float() if torch.is_tensor(temp) else float(temp))
        return sim

    def pairs(self, fwd: ports.Forward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [3B, 2], labels [3B], negative text per image [B], negative image per text [B]).

        Rows 0..B-1 are the positive pairs (label 1), B..2B-1 image i with its hard-negative text,
        2B..3B-1 text i with its hard-negative image (label 0)."""
        batch = fwd.batch
        fusion = self.fusion
        mask = batch["attention_mask"]
        text = fwd.text_tokens(fusion.text)  # [B, L, C], shared with the other objectives
        image = fwd.image_tokens(fusion.vision)  # [B, 1+N, Cv]
        b = text.shape[0]
        if b < 2:
            raise ValueError("objective.itm needs a batch of at least 2 pairs to draw negatives from")
        positive = fusion.fuse(fwd)  # [B, L, C], memoised
        sim = self.similarity(fwd)  # not under no_grad: it fills the embedding memo the ITC loss reads
        with torch.no_grad():
            dup = same_caption(batch["input_ids"], mask)
            neg_text = sample_negatives(sim, dup)  # for image i, a text
            neg_image = sample_negatives(sim.T, dup)  # for text i, an image
        negative = fusion(
            torch.cat([text[neg_text], text]),
            torch.cat([mask[neg_text], mask]),
            torch.cat([image, image[neg_image]]),
        )  # [2B, L, C]
        cls = torch.cat([positive[:, 0], negative[:, 0]])
        logits = self.head(cls)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
        return logits, labels, neg_text, neg_image

    def forward(self, fwd: ports.Forward, batch: dict, group: str | None = None) -> dict[str, torch.Tensor]:
        logits, labels, _, _ = self.pairs(fwd)
        return {"itm": F.cross_entropy(logits.float(), labels)}


@register(
    "objective.itm",
    params=ITMParams,
    output=ITM,
    requires=frozenset({ports.PAIRED}),
    inputs={
        "fusion": In(FusionTower, doc="fusion encoder whose [CLS] output is classified"),
        "itc": In(ports.Objective, doc="an objective that defines the image-text embedding (objective.itc); "
                                       "its similarity picks the hard negatives"),
    },
)
def build(params: ITMParams, inputs: dict, ctx: ports.BuildContext) -> ITM:
    """Image-text matching with hard negatives (ALBEF ITM): is this caption this image's?

    Reads the fusion encoder's output at [CLS] for 3B pairs per batch: the B true pairs (label 1);
    each image with one hard-negative caption; each caption with one hard-negative image (label 0).
    The negative of image i is drawn from softmax(similarity[i, :]) of the `itc` input's embedding
    (cosine / its temperature, no gradient; its embeddings and tower passes come from the step's
    shared Forward, so nothing runs twice) with the positive given zero weight; likewise for texts
    over images. Head: Linear(width, 2); loss 'itm' = cross-entropy over the 3B pairs. Only the
    negative pairs cost an extra fusion pass (2B); the towers are not re-run. Beyond ALBEF's
    pre-training code, captions token-for-token identical to the positive are also never drawn as
    negatives (they would be false negatives; the shapes benchmark repeats captions), and a row with
    no other candidate falls back to uniform over the rest of the batch. Negatives come from the
    local batch only (ALBEF gathers them across GPUs).
    """
    fusion, itc = inputs["fusion"], inputs["itc"]
    if not isinstance(itc, ports.Embedder):
        raise UserError(
            f"node '{ctx.node}' (objective.itm): input 'itc' must be an objective that defines an image-text "
            f"embedding (e.g. objective.itc); {type(itc).__name__} does not"
        )
    return ITM(fusion, itc, params).to(ctx.device)
