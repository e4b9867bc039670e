"""evaluator.retrieval: image->text and text->image recall@k on the test split."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from vlpgraph.engine import ports
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import embed_split, first_hit_ranks, recall_at
# shared with evaluator.transfer_retrieval (node modules never import each other)
from vlpgraph.nodes.evaluators.evaluation import recall_ks_degenerate as degenerate
from vlpgraph.nodes.evaluators.evaluation import recall_ks_refusal as _refusal
from vlpgraph.nodes.evaluators.evaluation import recall_ks_too_large as too_large
from vlpgraph.engine.registry import In, Params, register, size_of


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


def check(p: RetrievalParams, inputs: dict) -> list[tuple[str, str]]:
    """ks against the test split's size when the data knows it before building (see ``too_large``)."""
    found = []
    for data in inputs.get("data", []):
        if data.get("test_size") is None:
            continue
        n = data["test_size"] if p.max_samples is None else min(data["test_size"], p.max_samples)
        # an upper bound (at_most) still refuses correctly: k >= bound >= the real size
        bad = too_large(p.ks, n)
        if bad:
            searched = (f"max_samples {p.max_samples}" if p.max_samples is not None and p.max_samples < data["test_size"]
                        else f"'{data['node']}' has {size_of(data, 'test_size')}")
            found.append(("ks", _refusal(bad, searched)))
    return found


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
    check=check,
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
    A k that reaches the number of pairs searched is refused (R@k would be 1 for any model): at
    validation when the data knows its test size, else when the node is built, before training.
    A k of at least half the pairs is accepted with a warning: a random ranking already scores
    R@k ≈ k/n there (the warning gives that chance level).
    """
    test = inputs["data"].test
    n = len(test) if params.max_samples is None else min(len(test), params.max_samples)
    bad = too_large(params.ks, n)
    if bad:
        raise UserError(f"node '{ctx.node}' (evaluator.retrieval): {_refusal(bad, f'{n} pairs')}")
    weak = degenerate(params.ks, n)
    if weak:
        chance = ", ".join(f"R@{k} {k / n:.2f}" for k in weak)
        ctx.log(f"warning: node '{ctx.node}' (evaluator.retrieval): on {n} test pairs, recall at k >= n/2 says "
                f"little (chance level: {chance}); rsum is inflated by it")
    return RetrievalEvaluator(params, inputs["data"])
