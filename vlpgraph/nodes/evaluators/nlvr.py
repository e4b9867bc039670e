"""evaluator.nlvr: the NLVR2 analogue — is a statement about two test images true? A light head fine-tuned
on the model's fused (or image + text) representation of each image with the statement."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from vlpgraph.engine import ports
from vlpgraph.nodes.evaluators.evaluation import seeded
from vlpgraph.layers.fusion import FusionTower
from vlpgraph.layers.patches import png_bytes
from vlpgraph.engine.registry import In, register
from vlpgraph.nodes.evaluators.scene_tasks import (NLVR_TYPES, NLVRItem, ProbeParams, ProbeSet, Vocab, accuracy_by_type,
                                  check_fusion_param, check_towers, majority_answers, nlvr_items, side_by_side,
                                  split_scenes, train_probe)


class NLVRParams(ProbeParams):
    types: list[str] = Field(list(NLVR_TYPES), min_length=1, description="statement types: any of "
                             f"{', '.join(NLVR_TYPES)} (items take them in turn)")
    items_per_image: int = Field(2, ge=1, le=64, description="statements per image of each split (each image is "
                                 "the left one of this many pairs, its partner drawn)")

    @field_validator("types")
    @classmethod
    def _known(cls, types: list[str]) -> list[str]:
        bad = [t for t in types if t not in NLVR_TYPES]
        if bad:
            raise ValueError(f"unknown statement type(s) {bad} (known: {', '.join(NLVR_TYPES)})")
        return [t for t in NLVR_TYPES if t in types]


LABELS = ("false", "true")  # class 0, class 1


class NLVREvaluator(ports.Evaluator):
    """Trains a true/false head on statements about pairs of training images; see :func:`build`."""

    headline = "accuracy"

    def __init__(self, params: NLVRParams, data: ports.PairedData, vision: ports.VisionTower, text: ports.TextTower,
                 fusion: FusionTower | None, who: str = ""):
        self.params, self.data = params, data
        self.vision, self.text, self.fusion = vision, text, fusion
        self.who = who
        self._items: tuple[list[NLVRItem], list[NLVRItem]] | None = None

    def items(self) -> tuple[list[NLVRItem], list[NLVRItem]]:
        """(train, test) statements about pairs of the first max_train_images / max_test_images images of each
        split (deterministic given the params' seed)."""
        if self._items is None:
            p, data = self.params, self.data
            parts = []
            for name, split, cap in (("train", data.paired_train(), p.max_train_images),
                                     ("test", data.test, p.max_test_images)):
                n = len(split) if cap is None else min(len(split), cap)
                parts.append(split_scenes(split, n, self.who, name))
            vocab = Vocab.of(parts[0] + parts[1])
            self._items = tuple(nlvr_items(scenes, p.items_per_image * len(scenes), vocab, p.items_seed, p.types, split)
                                for split, scenes in enumerate(parts))
        return self._items

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, data = self.params, self.data
        train_items, test_items = self.items()
        texts = sorted({it.statement for it in train_items + test_items})
        row = {t: i for i, t in enumerate(texts)}

        def probe_set(split, items: list[NLVRItem]) -> ProbeSet:
            return ProbeSet(split, torch.tensor([[it.left, it.right] for it in items], dtype=torch.long).reshape(-1, 2),
                            torch.tensor([row[it.statement] for it in items], dtype=torch.long),
                            torch.tensor([int(it.label) for it in items], dtype=torch.long))

        train, test = probe_set(data.paired_train(), train_items), probe_set(data.test, test_items)
        ctx.log(f"{ctx.node}: {len(train_items)} training and {len(test_items)} test statements "
                f"({sum(it.label for it in test_items) / max(1, len(test_items)):.2f} of the test ones true)")
        with seeded(ctx) as gen:
            logits = train_probe(model, data, self.vision, self.text, self.fusion, p, texts, train, test, 2, 2, gen,
                                 log=lambda m: ctx.log(f"{ctx.node}: {m}"))
        predicted = logits.argmax(1).bool().tolist()
        correct = [a == it.label for a, it in zip(predicted, test_items)]
        types = [it.type for it in test_items]
        prior = majority_answers([LABELS[it.label] for it in train_items], [it.type for it in train_items])
        overall = majority_answers([LABELS[it.label] for it in train_items], ["all"] * len(train_items))["all"]
        by_type = [prior.get(it.type) == LABELS[it.label] for it in test_items]
        metrics = {"accuracy": sum(correct) / max(1, len(correct)), **accuracy_by_type(correct, types, "accuracy"),
                   "majority": sum(LABELS[it.label] == overall for it in test_items) / max(1, len(test_items)),
                   **accuracy_by_type(by_type, types, "majority"),
                   "n": float(len(test_items)), "n_train": float(len(train_items))}
        return ports.EvalResult(metrics=metrics, samples=self._samples(test_items, predicted, correct))

    def _samples(self, items: list[NLVRItem], predicted: list[bool], correct: list[bool]) -> list[dict]:
        rows = []
        for j in range(min(self.params.num_samples, len(items))):
            it = items[j]
            left, right = (self.data.denormalize(self.data.test[i]["image"][None])[0] for i in (it.left, it.right))
            rows.append({"kind": "nlvr", "sample_id": j, "text": LABELS[predicted[j]], "reference": LABELS[it.label],
                         "image": png_bytes(side_by_side(left, right)),
                         "info": {"statement": it.statement, "type": it.type, "correct": bool(correct[j]),
                                  "left": it.left, "right": it.right}})
        return rows


def check(p: NLVRParams, inputs: dict) -> list[tuple[str, str]]:
    return check_fusion_param(p, inputs)


@register(
    "evaluator.nlvr",
    params=NLVRParams,
    output=NLVREvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model (evaluated after, or during, its training)"),
        "data": In(ports.PairedData, needs=frozenset({ports.SCENES}),
                   doc="statements about pairs of its test images, the head trained on pairs of its training images "
                   "(scene graphs: dataset.shapes)"),
        "vision": In(ports.VisionTower, doc="the model's vision tower"),
        "text": In(ports.TextTower, doc="the model's text tower (reads the statements with its tokenizer)"),
        "fusion": In(FusionTower, optional=True, doc="the model's fusion encoder (encoder.fusion): its [CLS] over "
                     "(image, statement) represents each image; without it, concat(image CLS, pooled statement)"),
    },
    check=check,
)
def build(params: NLVRParams, inputs: dict, ctx: ports.BuildContext) -> NLVREvaluator:
    """The NLVR2 analogue: accuracy of true/false judgements of statements about two test images (overall, per
    statement type, and the majority-label baseline, ~0.5 by construction).

    Statements (no official code exists for the shapes analogue; everything here is assumed), from the two
    images' scene graphs (vlpgraph.nodes.evaluators.scene_tasks.nlvr_items): ``both`` ("both images contain a red circle",
    also "a red shape", "a circle"), ``one`` ("exactly one image contains ..."), ``compare`` ("the left image
    has more shapes than the right image", fewer, the same number) and ``total`` ("there are exactly two
    squares in total", the true count or one off). Each image of a split is the left image of
    ``items_per_image`` items; an item's type comes in turn, its label is drawn first (true / false with
    probability 1/2), then the right image is drawn until a statement of that type and label exists, so
    labels are balanced overall and within each type. Deterministic given ``items_seed``.

    Representation: each image with the statement as in evaluator.qa (the fusion encoder's [CLS] over
    (image tokens, statement tokens); without a fusion encoder, concat(image CLS, pooled statement)), the
    left's and the right's vectors concatenated (ViLT's NLVR2 "pair" setting), then Linear(2D, 2D) ->
    LayerNorm -> GELU -> Linear(2D, 2) (ViLT's NLVR2 classifier), cross-entropy. ``finetune`` decides what trains, as evaluator.qa:
    ``head`` (towers frozen), ``fusion`` (a copy of the fusion layers + head), ``all`` (copies of every
    tower + head), ``auto`` = fusion with a fusion encoder, else head; whatever trains is a deep copy, so the
    model's weights are never changed. ``steps`` AdamW steps of ``batch_size`` items (head ``lr``, towers
    ``finetune_lr``, cosine decay), from the evaluator's own seed.

    Metrics: ``accuracy`` (headline), ``accuracy_<type>``, ``majority`` (the most common training label
    scored on the test items) and ``majority_<type>``, ``n``, ``n_train``. The first ``num_samples`` test
    items go to the samples table as kind 'nlvr' (the two images side by side, the model's true/false as
    text, the label as reference, info: statement, type, correct, left, right). Refuses what evaluator.qa
    refuses; data without scene graphs is refused at validation.
    """
    vision, text, fusion = inputs["vision"], inputs["text"], inputs.get("fusion")
    who = f"node '{ctx.node}' (evaluator.nlvr)"
    check_towers(who, params, vision, text, fusion)
    return NLVREvaluator(params, inputs["data"], vision, text, fusion, who)
