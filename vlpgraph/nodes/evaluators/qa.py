"""evaluator.qa: the VQA analogue — questions about each test image answered by a light head fine-tuned on
the model's fused (or image + text) representation; accuracy overall and per question type."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, field_validator

from vlpgraph.engine import ports
from vlpgraph.files.local import resolve_path, sha256_of
from vlpgraph.errors import UserError
from vlpgraph.nodes.evaluators.evaluation import seeded
from vlpgraph.layers.fusion import FusionTower
from vlpgraph.layers.patches import png_bytes
from vlpgraph.engine.registry import In, register
from vlpgraph.nodes.evaluators.scene_tasks import (QA_TYPES, ProbeParams, ProbeSet, QAItem, Vocab, accuracy_by_type, check_fusion_param,
                                  check_towers, majority_answers, qa_items, split_scenes, train_probe)

JSON_PARAMS = ("questions", "annotations", "train_questions", "train_annotations")


class QAParams(ProbeParams):
    types: list[str] = Field(list(QA_TYPES), min_length=1, description="question types generated from the scene "
                             f"graphs: any of {', '.join(QA_TYPES)}")
    questions: str | None = Field(None, description="VQAv2-style questions JSON ({'questions': [{image_id, question, "
                                  "question_id}]}) about the test split (image_id = index into it); with the three "
                                  "others, replaces the generated questions (relative to the graph file)")
    annotations: str | None = Field(None, description="VQAv2-style annotations JSON ({'annotations': [{question_id, "
                                    "multiple_choice_answer, answer_type or question_type}]}) of `questions`")
    train_questions: str | None = Field(None, description="VQAv2-style questions JSON about the training images "
                                        "(image_id = index into the data's paired training items)")
    train_annotations: str | None = Field(None, description="the annotations JSON of `train_questions`")

    @field_validator("types")
    @classmethod
    def _known(cls, types: list[str]) -> list[str]:
        bad = [t for t in types if t not in QA_TYPES]
        if bad:
            raise ValueError(f"unknown question type(s) {bad} (known: {', '.join(QA_TYPES)})")
        return [t for t in QA_TYPES if t in types]  # one order, whatever order the YAML wrote

    def problems(self) -> list[tuple[str, str]]:
        given = [k for k in JSON_PARAMS if getattr(self, k)]
        if given and len(given) < len(JSON_PARAMS):
            missing = [k for k in JSON_PARAMS if k not in given]
            return [(missing[0], f"VQAv2-style questions need all of {', '.join(JSON_PARAMS)}; "
                                 f"{', '.join(missing)} missing")]
        return []

    @property
    def from_json(self) -> bool:
        return self.questions is not None


# ------------------------------------------------------------------------------------- VQAv2 files


def load_vqa(questions: Path, annotations: Path, n_images: int, split: str) -> list[QAItem]:
    """Questions joined with their annotations by question_id, in the questions file's order.

    The answer is ``multiple_choice_answer``; the type ``answer_type`` (VQAv2: yes/no, number, other), else
    ``question_type``, else "other". ``image_id`` must index ``split`` (0..n_images-1). UserError on a
    missing file, bad JSON, a question without an annotation or an image_id outside the split."""
    docs = []
    for path, key in ((questions, "questions"), (annotations, "annotations")):
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise UserError(f"{path}: expected a JSON object with a '{key}' list (VQAv2 format)")
        docs.append(doc[key])
    answers = {}
    for a in docs[1]:
        try:
            answers[a["question_id"]] = (str(a["multiple_choice_answer"]),
                                         str(a.get("answer_type") or a.get("question_type") or "other"))
        except (KeyError, TypeError):
            raise UserError(f"{annotations}: every annotation needs question_id and multiple_choice_answer, "
                            f"got {a!r}") from None
    items = []
    for j, q in enumerate(docs[0]):
        try:
            qid, image, text = q["question_id"], q["image_id"], str(q["question"])
        except (KeyError, TypeError):
            raise UserError(f"{questions}: question {j} needs image_id, question and question_id, got {q!r}") from None
        if not isinstance(image, int) or not 0 <= image < n_images:
            raise UserError(f"{questions}: question {j} (question_id {qid}) is about image_id {image!r}, which is not "
                            f"in the {split} split ({n_images} images: ids 0..{n_images - 1})")
        if qid not in answers:
            raise UserError(f"{questions}: question {j} (question_id {qid}) has no annotation in {annotations}")
        items.append(QAItem(image, text, *answers[qid]))
    if not items:
        raise UserError(f"{questions}: no questions")
    return items


def fingerprint(p: QAParams, base_dir: Path) -> dict:
    """Part of the node's hash: the content hash of each VQAv2-style file ('missing' when absent), so an
    edited file is a new evaluation."""
    out = {}
    for key in JSON_PARAMS:
        value = getattr(p, key)
        if value is not None:
            path = resolve_path(value, base_dir)
            out[key] = sha256_of(path) if path.is_file() else "missing"
    return out


# --------------------------------------------------------------------------------------- evaluator


class QAEvaluator(ports.Evaluator):
    """Trains an answer head on questions about the training images; see :func:`build`."""

    headline = "accuracy"

    def __init__(self, params: QAParams, data: ports.PairedData, vision: ports.VisionTower, text: ports.TextTower,
                 fusion: FusionTower | None, items: tuple[list[QAItem], list[QAItem]] | None = None, who: str = ""):
        self.params, self.data = params, data
        self.vision, self.text, self.fusion = vision, text, fusion
        self._items = items  # (train, test); generated on first use when None
        self.who = who

    def items(self) -> tuple[list[QAItem], list[QAItem]]:
        """(train, test) questions: from the VQAv2-style files, or generated from the scene graphs of the
        first max_train_images / max_test_images images (deterministic given the params' seed)."""
        if self._items is None:
            p, data = self.params, self.data
            parts = []
            for name, split, cap in (("train", data.paired_train(), p.max_train_images),
                                     ("test", data.test, p.max_test_images)):
                n = len(split) if cap is None else min(len(split), cap)
                parts.append(split_scenes(split, n, self.who, name))
            vocab = Vocab.of(parts[0] + parts[1])
            self._items = tuple([q for i, s in enumerate(scenes) for q in qa_items(s, vocab, p.items_seed, i, p.types, split)]
                                for split, scenes in enumerate(parts))
        return self._items

    def evaluate(self, model: ports.Model, ctx: ports.BuildContext) -> ports.EvalResult:
        p, data = self.params, self.data
        train_items, test_items = self.items()
        answers = sorted({q.answer for q in train_items})  # the head's classes: the answers seen in training
        index = {a: i for i, a in enumerate(answers)}
        texts = sorted({q.question for q in train_items + test_items})
        row = {t: i for i, t in enumerate(texts)}

        def probe_set(split, items: list[QAItem]) -> ProbeSet:
            return ProbeSet(split, torch.tensor([[q.image] for q in items], dtype=torch.long).reshape(-1, 1),
                            torch.tensor([row[q.question] for q in items], dtype=torch.long),
                            torch.tensor([index.get(q.answer, -1) for q in items], dtype=torch.long))

        train, test = probe_set(data.paired_train(), train_items), probe_set(data.test, test_items)
        ctx.log(f"{ctx.node}: {len(train_items)} training and {len(test_items)} test questions, "
                f"{len(answers)} answers, {len(texts)} distinct questions")
        with seeded(ctx) as gen:
            logits = train_probe(model, data, self.vision, self.text, self.fusion, p, texts, train, test,
                                 len(answers), 1, gen, log=lambda m: ctx.log(f"{ctx.node}: {m}"))
        predicted = [answers[i] for i in logits.argmax(1).tolist()]
        correct = [a == q.answer for a, q in zip(predicted, test_items)]
        types = [q.type for q in test_items]
        prior = majority_answers([q.answer for q in train_items], [q.type for q in train_items])
        baseline = [prior.get(q.type) == q.answer for q in test_items]
        metrics = {"accuracy": sum(correct) / max(1, len(correct)), **accuracy_by_type(correct, types, "accuracy"),
                   "majority": sum(baseline) / max(1, len(baseline)), **accuracy_by_type(baseline, types, "majority"),
                   "n": float(len(test_items)), "n_train": float(len(train_items)), "answers": float(len(answers))}
        return ports.EvalResult(metrics=metrics, samples=self._samples(test_items, predicted, correct))

    def _samples(self, items: list[QAItem], predicted: list[str], correct: list[bool]) -> list[dict]:
        rows = []
        for j in range(min(self.params.num_samples, len(items))):
            q = items[j]
            image = self.data.denormalize(self.data.test[q.image]["image"][None])[0]
            rows.append({"kind": "qa", "sample_id": j, "text": predicted[j], "reference": q.answer,
                         "image": png_bytes(image),
                         "info": {"question": q.question, "type": q.type, "correct": bool(correct[j]),
                                  "image_index": q.image}})
        return rows


def check(p: QAParams, inputs: dict) -> list[tuple[str, str]]:
    return check_fusion_param(p, inputs)


@register(
    "evaluator.qa",
    params=QAParams,
    output=QAEvaluator,
    inputs={
        "model": In(ports.Model, doc="the trained model (evaluated after, or during, its training)"),
        "data": In(ports.PairedData, doc="questions about its test images, the head trained on questions about its "
                   "training images; generated from scene graphs (capability 'scenes', dataset.shapes) unless "
                   "VQAv2-style files are given"),
        "vision": In(ports.VisionTower, doc="the model's vision tower"),
        "text": In(ports.TextTower, doc="the model's text tower (reads the questions with its tokenizer)"),
        "fusion": In(FusionTower, optional=True, doc="the model's fusion encoder (encoder.fusion): its [CLS] over "
                     "(image, question) is the representation; without it, concat(image CLS, pooled question)"),
    },
    check=check,
    fingerprint=fingerprint,
)
def build(params: QAParams, inputs: dict, ctx: ports.BuildContext) -> QAEvaluator:
    """The VQA analogue: accuracy of answers to questions about the test images (overall, per type, and the
    majority-answer baseline of each type).

    Questions (no official code exists for the shapes analogue; everything here is assumed): from each
    image's scene graph, one question of each type in ``types`` that applies to it (vlpgraph.nodes.evaluators.scene_tasks):
    count ("how many red shapes are there?"), colour ("what colour is the circle?", only when one object
    has that shape), shape ("what shape is the red object?"), size ("what size is the red circle?"),
    exists ("is there a blue square?", yes / no equally likely, half the no's near misses) and relation
    ("is the red circle left of the blue square?", asked only along an axis where the boxes are apart;
    yes / no equally likely). Answers come from a fixed vocabulary (digits, colours, shapes, yes/no,
    small/large); the head's classes are the answers seen in training. Deterministic given ``items_seed``, so
    every trial is asked the same questions. Or real data: VQAv2-style questions and annotations files
    (``questions``/``annotations`` about the test split, ``train_questions``/``train_annotations`` about the
    training items; image_id = the item's index), answer = multiple_choice_answer, type = answer_type.

    Representation: with ``fusion``, the fusion encoder's [CLS] over (the vision tower's tokens of the
    image, the text tower's tokens of the question) (ALBEF's VQA reads the same fused states, with an
    answer decoder instead of a classifier); without, concat(the image's CLS token, the question's pooled
    text feature, ``text_pool``). Head: Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, answers) (ViLT's
    VQA classifier), cross-entropy on the one answer (VQAv2's soft scores over 10 human answers are not
    used; accuracy is exact match with the answer). What trains (``finetune``): ``head`` only (every
    tower frozen: their outputs are computed once, the frozen vision tokens shared with the other
    frozen-transfer evaluators), ``fusion`` (a copy of the fusion layers and the head; the towers frozen)
    or ``all`` (copies of the vision, text and fusion towers and the head); ``auto`` (default) is
    ``fusion`` when a fusion encoder is wired, else ``head``. Whatever trains is a deep copy: the model's
    own weights, train flags and gradients are never touched. ``steps`` AdamW steps of ``batch_size``
    questions, the head at ``lr`` and the copied towers at ``finetune_lr``, cosine decay; random draws from
    the evaluator's own seed (trial seed, node): the same budget for every method.

    Metrics on the test questions: ``accuracy`` (headline), ``accuracy_<type>``, ``majority_<type>`` (the
    most common training answer of the type, scored on the test questions of that type), ``majority``
    (that per-type prior over all test questions), ``n``, ``n_train``, ``answers``. The first
    ``num_samples`` test questions go to the samples table as kind 'qa' (image, the model's answer as
    text, the true answer as reference, info: question, type, correct). Refuses a text tower without a
    tokenizer, a fusion encoder built on other towers than those wired, finetune 'fusion' without one,
    and (without VQAv2 files) data without scene graphs.
    """
    data, vision, text, fusion = inputs["data"], inputs["vision"], inputs["text"], inputs.get("fusion")
    who = f"node '{ctx.node}' (evaluator.qa)"
    check_towers(who, params, vision, text, fusion)
    items = None
    if params.from_json:
        paths = {k: resolve_path(getattr(params, k), ctx.base_dir) for k in JSON_PARAMS}
        items = (load_vqa(paths["train_questions"], paths["train_annotations"], len(data.paired_train()), "training"),
                 load_vqa(paths["questions"], paths["annotations"], len(data.test), "test"))
    elif ports.SCENES not in data.capabilities:
        raise UserError(f"{who}: its data has no scene graphs to ask questions about (capability '{ports.SCENES}', "
                        "e.g. dataset.shapes); give VQAv2-style files instead (questions, annotations, "
                        "train_questions, train_annotations)")
    return QAEvaluator(params, data, vision, text, fusion, items, who)
