"""evaluator.zeroshot: zero-shot classification of test images by prompt."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed
from vlpgraph.nodes.evaluators.evaluation import embed_split, embed_texts, first_hit_ranks, recall_at
from vlpgraph.engine.registry import In, Params, register


class ZeroShotParams(Params):
    batch_size: int = Field(256, ge=1, description="images/prompts embedded per forward pass")
    prompt: str | None = Field(
        None,
        description="format string with {} for the class name, e.g. 'a photo of a {}' (None: the dataset's)",
    )

    @field_validator("prompt")
    @classmethod
    def _one_placeholder(cls, prompt: str | None) -> str | None:
        if prompt is None:
            return None
        try:
            filled = prompt.format("\0")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"prompt {prompt!r} must be a format string with one '{{}}' ({e})") from None
        if "\0" not in filled:
            raise ValueError(f"prompt {prompt!r} has no '{{}}' for the class name")
        return prompt


class ZeroShotEvaluator(ports.Evaluator):
    """Prompt classification of the dataset's zero-shot images; see :func:`build`."""

    headline = "top1"  # the metric `vlpgraph report` shows by default (top-1 accuracy)

    def __init__(self, params: ZeroShotParams, data: ports.PairedData):
        self.params = params
        self.data = data

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        zs = self.data.zeroshot
        if zs is None or not zs.class_names:
            raise TrialFailed("evaluator.zeroshot: the dataset has no zero-shot classes (data.zeroshot is None)")
        if len(zs.indices) != len(zs.labels):
            raise TrialFailed(f"evaluator.zeroshot: {len(zs.indices)} indices but {len(zs.labels)} labels")
        prompt = self.params.prompt or zs.prompt
        num_classes = len(zs.class_names)
        classes = embed_texts(model, [prompt.format(name) for name in zs.class_names],
                              batch_size=self.params.batch_size, who="evaluator.zeroshot")
        images = embed_split(model, self.data, self.data.test, zs.indices, batch_size=self.params.batch_size,
                             texts=False, who="evaluator.zeroshot").images
        labels = torch.tensor(zs.labels, dtype=torch.long)
        ranks = first_hit_ranks(images, classes, labels, torch.arange(num_classes))
        ks = [1, 5] if num_classes >= 5 else [1]
        metrics = {f"top{k}": v for k, v in recall_at(ranks, ks).items()}
        metrics["n"] = float(len(zs.indices))
        metrics["chance"] = 1.0 / num_classes
        return ports.EvalResult(metrics=metrics)


@register(
    "evaluator.zeroshot",
    params=ZeroShotParams,
    output=ZeroShotEvaluator,
    inputs={
        "model": In(ports.Model, doc="a trained model with an image-text embedding (e.g. objective.itc)"),
        "data": In(ports.PairedData, needs=frozenset({ports.CLASSES}), doc="data with zero-shot labels"),
    },
)
def build(params: ZeroShotParams, inputs: dict, ctx: ports.BuildContext) -> ZeroShotEvaluator:
    """Zero-shot classification: each test image takes the class whose prompt embeds closest (top1, top5).

    Needs data with class labels (capability 'classes'): the dataset names its classes, a prompt
    ("a {}" filled with e.g. "red circle") and which test images carry one class each. Each prompt is
    embedded with the model's text embedding, each image with its image embedding; an image is
    classified by cosine similarity. Metrics: top1 accuracy, top5 (only with at least 5 classes),
    n (images classified) and chance (1/number of classes, to read top1 against). Ties count against
    the model. `prompt` overrides the dataset's prompt.
    """
    return ZeroShotEvaluator(params, inputs["data"])
