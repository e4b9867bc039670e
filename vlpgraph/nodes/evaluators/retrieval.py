"""evaluator.retrieval: image->text and text->image recall@k on the test split."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from vlpgraph import ports
from vlpgraph.evaluation import embed_split, first_hit_ranks, recall_at
from vlpgraph.registry import In, Params, register


class RetrievalParams(Params):
    batch_size: int = Field(256, ge=1, description="images/captions embedded per forward pass")
    ks: list[int] = Field([1, 5, 10], min_length=1, description="the k of each recall@k")
    max_samples: int | None = Field(None, ge=1, description="use only the first N test samples (None: all)")

    @field_validator("ks")
    @classmethod
    def _positive_unique(cls, ks: list[int]) -> list[int]:
        if any(k < 1 for k in ks):
            raise ValueError(f"every k must be >= 1, got {ks}")
        return sorted(set(ks))


class RetrievalEvaluator(ports.Evaluator):
    """Recall@k both ways over the (first ``max_samples``) test pairs; see :func:`build`."""

    headline = "rsum"  # the metric `vlpgraph report` shows by default (sum of R@k both directions)

    def __init__(self, params: RetrievalParams, data: ports.PairedData):
        self.params = params
        self.data = data

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        test = self.data.test
        n = len(test) if self.params.max_samples is None else min(len(test), self.params.max_samples)
        emb = embed_split(model, self.data, test, range(n), batch_size=self.params.batch_size,
                          who="evaluator.retrieval")
        # relevance = identical caption text, so exact duplicates count as hits both ways
        caption_ids: dict[str, int] = {}
        keys = torch.tensor([caption_ids.setdefault(c, len(caption_ids)) for c in emb.captions])
        i2t = recall_at(first_hit_ranks(emb.images, emb.texts, keys, keys), self.params.ks)
        t2i = recall_at(first_hit_ranks(emb.texts, emb.images, keys, keys), self.params.ks)
        metrics = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
        metrics["rsum"] = sum(metrics.values())
        metrics["n"] = float(n)
        return ports.EvalResult(metrics=metrics)


@register(
    "evaluator.retrieval",
    params=RetrievalParams,
    output=RetrievalEvaluator,
    inputs={
        "model": In(ports.Model, doc="a trained model with an image-text embedding (e.g. objective.itc)"),
        "data": In(ports.PairedData, doc="its test split is searched"),
    },
)
def build(params: RetrievalParams, inputs: dict, ctx: ports.BuildContext) -> RetrievalEvaluator:
    """Image->text and text->image retrieval recall@k on the test split (i2t_r1 ... t2i_r10, rsum).

    Embeds every test pair (or the first `max_samples`) with the model's image-text embedding; each
    image searches all test captions and each caption all test images, by cosine similarity. Caption i
    is the one ground truth of image i, except that a caption whose text is exactly identical to the
    ground-truth caption also counts as a hit (and, text->image, so does any image whose caption is
    identical): duplicates are indistinguishable, so missing them would be no model's fault. Ties
    count against the model (a collapsed embedding scores 0). Metrics are fractions in [0, 1]:
    i2t_r{k} and t2i_r{k} for each k in `ks`, rsum (their sum) and n (pairs searched).
    """
    return RetrievalEvaluator(params, inputs["data"])
