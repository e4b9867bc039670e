"""The shapes analogues of VQA and NLVR2: questions and statements generated from scene graphs, and the
model-side probe that evaluator.qa and evaluator.nlvr both train.

Items (pure functions, no torch):

- :func:`qa_items` — questions about one scene (``ports.Scene``), one per question type that applies to it,
  each with its answer from a fixed vocabulary (digits, colours, shapes, yes/no, small/large).
- :func:`nlvr_items` — statements about two scenes ("the left image has more shapes than the right
  image"), true or false, the label drawn first so that both labels are equally likely within every
  statement type.

Both are deterministic given (seed, item index) and the scenes. The answers are computed from the
scene graph by the helpers below (:func:`relation`, :func:`count`, ...); ``tests/nodes/evaluators/test_qa.py`` and
``tests/nodes/evaluators/test_nlvr.py`` re-derive every answer from the question's text with their own parser.

The probe (:class:`SceneProbe`, :func:`train_probe`): the model's towers read an image and a text
into one vector — the fusion encoder's [CLS] over (image tokens, text tokens) when the model has a
fusion tower, else the concatenation of the image's CLS and the pooled text — and a light MLP
(ViLT's VQA / NLVR2 classifier shape) maps it (NLVR: both images' vectors concatenated) to the answer
classes. Which parts train is ``finetune``; whatever trains is a deep copy, so the trained model the
other evaluators see is never changed. Node modules may not import each other, so the code both
evaluators share lives here.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.nodes.evaluators.evaluation import frozen, frozen_image_tokens, minibatches
from vlpgraph.engine.registry import Params

QA_TYPES = ("count", "colour", "shape", "exists", "relation", "size")
NLVR_TYPES = ("both", "one", "compare", "total")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# a relation word and the box test that makes "a <word> b" true (boxes never overlap on the shapes benchmark;
# a pair is only asked about along an axis where their boxes are apart, so the opposite word is then false)
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# ------------------------------------------------------------------------------------ scene facts


def plural(shape: str) -> str:
    """'circle' -> 'circles', 'cross' -> 'crosses'."""
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def count(scene: ports.Scene, colour: str | None = None, shape: str | None = None) -> int:
    """How many objects of ``scene`` have this colour and/or shape (None: any)."""
    return sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in scene.objects)


def relation(a: ports.SceneObject, b: ports.SceneObject, word: str) -> bool:
    """Whether "a <word> b" holds: a's box wholly on that side of b's (pixels, y down)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {"left of": ax1 <= bx0, "right of": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[word]


def unique(scene: ports.Scene, *attrs: str) -> list[ports.SceneObject]:
    """The objects that are the only one of the scene with their values of ``attrs`` (e.g. "shape": the
    only circle, which "the circle" names)."""
    key = lambda o: tuple(getattr(o, a) for a in attrs)  # noqa: E731
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


@dataclass(frozen=True)
class Vocab:
    """The colour and shape names questions may use (absent ones included: "is there a cyan cross?")."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]

    @classmethod
    def of(cls, scenes: Sequence[ports.Scene]) -> "Vocab":
        """Every colour and shape seen in ``scenes``, sorted."""
        return cls(tuple(sorted({o.colour for s in scenes for o in s.objects})),
                   tuple(sorted({o.shape for s in scenes for o in s.objects})))


# -------------------------------------------------------------------------------------------- QA


@dataclass(frozen=True)
class QAItem:
    """One question about image ``image`` (an index into its split)."""

    image: int
    question: str
    answer: str
    type: str


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _question(kind: str, scene: ports.Scene, vocab: Vocab, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of type ``kind`` about ``scene``, or None when the type does not apply to it."""
    objs = scene.objects
    if kind == "count":
        variant = int(rng.integers(4))
        if variant == 0 or not objs:
            return "how many shapes are there?", str(len(objs))
        if variant == 1:  # sizes repeat within a scene more than colours or shapes: counts spread over 0..4
            z = ("small", "large")[int(rng.integers(2))]
            return f"how many {z} shapes are there?", str(sum(o.size == z for o in objs))
        # half the time a colour / shape that is there, else any (so 0 is a possible answer)
        if variant == 2:
            c = _pick(rng, objs).colour if rng.random() < 0.5 else _pick(rng, vocab.colours)
            return f"how many {c} shapes are there?", str(count(scene, colour=c))
        s = _pick(rng, objs).shape if rng.random() < 0.5 else _pick(rng, vocab.shapes)
        return f"how many {plural(s)} are there?", str(count(scene, shape=s))
    if kind == "colour":
        cands = unique(scene, "shape")  # the only object of its shape: "the circle" names it
        if not cands:
            return None
        o = _pick(rng, cands)
        return f"what colour is the {o.shape}?", o.colour
    if kind == "shape":
        cands = unique(scene, "colour")
        if not cands:
            return None
        o = _pick(rng, cands)
        return f"what shape is the {o.colour} object?", o.shape
    if kind == "size":
        cands = unique(scene, "colour", "shape")
        if not cands:
            return None
        o = _pick(rng, cands)
        return f"what size is the {o.colour} {o.shape}?", o.size
    if kind == "exists":
        present = {(o.colour, o.shape) for o in objs}
        absent = [(c, s) for c in vocab.colours for s in vocab.shapes if (c, s) not in present]
        if rng.random() < 0.5 or not absent:  # the label first: yes / no equally likely
            if not objs:
                return None
            o = _pick(rng, objs)
            return f"is there a {o.colour} {o.shape}?", "yes"
        # half the "no"s are near misses (one attribute of an object that is there changed), so neither
        # the colour nor the shape alone answers the question
        near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in objs)]
        c, s = _pick(rng, near if near and rng.random() < 0.5 else absent)
        return f"is there a {c} {s}?", "no"
    if kind == "relation":
        named = unique(scene, "colour", "shape")  # "the red circle" must name one object
        pairs = [(a, b, w) for a in named for b in named if a is not b for w in RELATIONS if relation(a, b, w)]
        if not pairs:
            return None
        a, b, word = _pick(rng, pairs)  # a true relation; the label first: asked as is, or its opposite
        yes = rng.random() < 0.5
        asked = word if yes else OPPOSITE[word]
        return f"is the {a.colour} {a.shape} {asked} the {b.colour} {b.shape}?", "yes" if yes else "no"
    raise ValueError(f"unknown question type {kind!r} (known: {', '.join(QA_TYPES)})")


def qa_items(scene: ports.Scene, vocab: Vocab, seed: int, image: int, types: Sequence[str] = QA_TYPES,
             split: int = 0) -> list[QAItem]:
    """One question of each type in ``types`` that applies to ``scene`` (item ``image`` of split number
    ``split``: 0 train, 1 test).

    Deterministic given (seed, split, image, type): each type draws from its own stream, so leaving a type
    out does not change the others' questions."""
    out = []
    for kind in types:
        rng = np.random.default_rng([seed, split, image, QA_TYPES.index(kind)])
        qa = _question(kind, scene, vocab, rng)
        if qa is not None:
            out.append(QAItem(image, qa[0], qa[1], kind))
    return out


# ------------------------------------------------------------------------------------------ NLVR


@dataclass(frozen=True)
class NLVRItem:
    """A statement about two images (``left``, ``right``: indices into their split), true or not."""

    left: int
    right: int
    statement: str
    label: bool
    type: str


def _subjects(vocab: Vocab) -> list[tuple[str | None, str | None]]:
    """What a statement may count or look for: every (colour, shape), every colour, every shape."""
    return ([(c, s) for c in vocab.colours for s in vocab.shapes] + [(c, None) for c in vocab.colours]
            + [(None, s) for s in vocab.shapes])


def _a(colour: str | None, shape: str | None) -> str:
    """'a red circle', 'a red shape', 'a circle'."""
    return "a " + " ".join(w for w in (colour, shape or "shape") if w)


def _many(colour: str | None, shape: str | None, k: int) -> str:
    """'two red circles', 'one red shape', 'three shapes'."""
    noun = shape or "shape"
    return " ".join(w for w in (NUMBER_WORDS[k], colour, noun if k == 1 else plural(noun)) if w)


def statements(kind: str, left: ports.Scene, right: ports.Scene, vocab: Vocab) -> list[tuple[str, bool]]:
    """Every statement of type ``kind`` about the pair, with its truth."""
    out = []
    if kind in ("both", "one"):
        for c, s in _subjects(vocab):
            has = (count(left, c, s) > 0, count(right, c, s) > 0)
            if kind == "both":
                out.append((f"both images contain {_a(c, s)}", all(has)))
            else:
                out.append((f"exactly one image contains {_a(c, s)}", has[0] != has[1]))
    elif kind == "compare":
        n, m = len(left.objects), len(right.objects)
        out += [("the left image has more shapes than the right image", n > m),
                ("the left image has fewer shapes than the right image", n < m),
                ("the right image has more shapes than the left image", m > n),
                ("the two images have the same number of shapes", n == m)]
    elif kind == "total":
        for c, s in [(None, None)] + _subjects(vocab):
            t = count(left, c, s) + count(right, c, s)
            for k in (t - 1, t, t + 1):  # the true total and its neighbours
                if 1 <= k < len(NUMBER_WORDS):
                    verb = "is" if k == 1 else "are"
                    out.append((f"there {verb} exactly {_many(c, s, k)} in total", k == t))
    else:
        raise ValueError(f"unknown statement type {kind!r} (known: {', '.join(NLVR_TYPES)})")
    return out


def nlvr_items(scenes: Sequence[ports.Scene], n_items: int, vocab: Vocab, seed: int, types: Sequence[str] = NLVR_TYPES,
               split: int = 0, max_tries: int = 64) -> list[NLVRItem]:
    """``n_items`` statements about pairs of ``scenes`` (indices into their split).

    Item k: the left image is scene ``k % len(scenes)``; the type is ``types[k % len(types)]``; the label
    is drawn first (true / false with probability 1/2); the right image is drawn (never the left one)
    until a statement of that type with that label exists for the pair (at most ``max_tries`` draws,
    then the next type), and the statement is drawn among those. So labels are balanced overall and
    within each type, and no statement's wording gives its label away by how often it is true.
    Deterministic given (seed, split, k) and the scenes (``split``: 0 train, 1 test)."""
    n = len(scenes)
    if n < 2:
        raise ValueError(f"NLVR needs at least 2 images to pair, got {n}")
    out = []
    for k in range(n_items):
        rng = np.random.default_rng([seed, split, k])
        left = k % n
        label = bool(rng.random() < 0.5)
        for t in range(len(types)):
            kind = types[(k + t) % len(types)]
            for _ in range(max_tries):
                right = int(rng.integers(n - 1))
                right += right >= left  # any image but the left one
                cands = [s for s, truth in statements(kind, scenes[left], scenes[right], vocab) if truth == label]
                if cands:
                    out.append(NLVRItem(left, right, _pick(rng, cands), label, kind))
                    break
            else:
                continue
            break
        else:
            raise ValueError(f"no statement with label {label} found for image {left} (scenes too alike?)")
    return out


# ------------------------------------------------------------------------------- majority baseline


def majority_answers(answers: Sequence[str], types: Sequence[str]) -> dict[str, str]:
    """The most common answer of each type (ties: the first in sorted order, so it is deterministic)."""
    by_type: dict[str, Counter] = {}
    for a, t in zip(answers, types):
        by_type.setdefault(t, Counter())[a] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in by_type.items()}


def accuracy_by_type(correct: Sequence[bool], types: Sequence[str], prefix: str) -> dict[str, float]:
    """``{prefix}_<type>``: the mean of ``correct`` over the items of each type (types as metric-name
    safe words: 'yes/no' -> 'yes_no')."""
    out: dict[str, list[bool]] = {}
    for ok, t in zip(correct, types):
        out.setdefault(metric_word(t), []).append(bool(ok))
    return {f"{prefix}_{t}": float(np.mean(v)) for t, v in sorted(out.items())}


def metric_word(text: str) -> str:
    """A type name as a metric-name word: lowercase, runs of non-word characters -> '_'."""
    return re.sub(r"\W+", "_", str(text).strip().lower()).strip("_") or "other"


# ---------------------------------------------------------------------------------------- the probe


Finetune = Literal["auto", "head", "fusion", "all"]
TRAINS = {"head": (), "fusion": ("fusion",), "all": ("vision", "text", "fusion")}  # the towers that train, by mode


class ProbeParams(Params):
    """What evaluator.qa and evaluator.nlvr share: which parts train, the budget, the head."""

    finetune: Finetune = Field(
        "auto", description="what trains (on deep copies; the model is never changed): head (the MLP only, on "
        "frozen features), fusion (the fusion encoder's layers and the head; needs 'fusion'), all (vision, text "
        "and fusion towers and the head); auto: fusion when 'fusion' is wired, else head")
    text_pool: Literal["cls", "mean"] = Field(
        "mean", description="without a fusion tower, the text feature: its CLS token, or the mean of the non-pad "
        "tokens (objective.itc's default; a from-scratch BERT's CLS is hardly trained by a mean-pooled ITC)")
    hidden: int | None = Field(None, ge=1, description="the head's hidden width (None: twice the width D of one image's "
                               "representation, as ViLT's classifiers: Linear(D, 2D) for VQA, Linear(2D, 2D) for NLVR2)")
    steps: int = Field(300, ge=1, description="optimiser steps (the fixed budget, the same for every method)")
    batch_size: int = Field(64, ge=2, description="training items per step")
    lr: float = Field(1e-3, gt=0, description="the head's peak AdamW learning rate (cosine decay to 0 over `steps`)")
    finetune_lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate of the copied towers that train "
                               "(finetune fusion / all; cosine decay to 0)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    items_seed: int = Field(0, ge=0, description="seed of the generated items (independent of the trial seed, so every "
                      "trial is asked the same questions)")
    max_train_images: int | None = Field(None, ge=2, description="ask about the first N training images only "
                                         "(None: all)")
    max_test_images: int | None = Field(None, ge=2, description="ask about the first N test images only (None: all)")
    feature_batch_size: int = Field(256, ge=1, description="images (or items) per forward pass of a frozen tower")
    num_samples: int = Field(8, ge=0, description="write the first N test items (image, question, the model's "
                             "answer) to the samples table")

    def mode(self, has_fusion: bool) -> str:
        """The resolved ``finetune`` (auto -> fusion with a fusion tower, else head)."""
        if self.finetune == "auto":
            return "fusion" if has_fusion else "head"
        return self.finetune


def _tower_copies(vision: nn.Module, text: nn.Module, fusion: nn.Module | None, mode: str):
    """(vision, text, fusion) with deep copies of the ones that train in ``mode``; the others are the
    model's own modules. Copies share nothing with the originals (a fusion copy's tower references point at
    the copied towers in 'all', at the originals in 'fusion'); a frozen-token cache an encoder carries
    (evaluation.frozen_image_tokens) is not copied."""
    memo: dict[int, object] = {}
    for m in (vision, text):
        cache = m.__dict__.get("_vlpgraph_frozen_tokens")
        if cache is not None:
            memo[id(cache)] = None
    if mode == "all":
        return copy.deepcopy((vision, text, fusion), memo)
    if mode == "fusion":
        memo.update({id(vision): vision, id(text): text})
        return vision, text, copy.deepcopy(fusion, memo)
    return vision, text, fusion


class SceneProbe(nn.Module):
    """(k images, one text) -> answer logits: each image with the text through the towers (the fusion
    encoder's [CLS] over (image tokens, text tokens), or concat(image CLS, pooled text)), the k vectors
    concatenated, then Linear(kD, H) -> LayerNorm -> GELU -> Linear(H, classes) (ViLT's classifiers; H = 2D).

    ``vision`` / ``text`` / ``fusion`` are the modules this probe reads: copies where they train (see
    :func:`_tower_copies`); ``trains`` names them. Frozen ones are held by reference (not submodules), so
    the probe's parameters are exactly what trains."""

    def __init__(self, vision, text, fusion, mode: str, text_pool: str, k: int, classes: int, hidden: int | None):
        super().__init__()
        self.mode, self.text_pool, self.k = mode, text_pool, k
        self.trains = TRAINS[mode]
        self._frozen = {}
        for name, m in (("vision", vision), ("text", text), ("fusion", fusion)):
            if name in self.trains and m is not None:
                self.add_module(name, m)
            else:
                self._frozen[name] = m
        width = int(fusion.width) if fusion is not None else int(vision.width) + int(text.width)
        hidden = hidden or 2 * width  # ViLT: Linear(D, 2D) for VQA, Linear(2D, 2D) for NLVR2
        self.head = nn.Sequential(nn.Linear(k * width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                  nn.Linear(hidden, classes))

    def tower(self, name: str) -> nn.Module | None:
        return self._modules[name] if name in self._modules else self._frozen[name]

    def represent(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image tokens [B, 1+P, Cv], text tokens [B, L, C], mask [B, L] -> [B, D]."""
        fusion = self.tower("fusion")
        if fusion is not None:
            return fusion(text_tokens, mask, image_tokens)[:, 0]
        return torch.cat([image_tokens[:, 0], ports.pool_caption(text_tokens, mask, self.text_pool)], dim=-1)


@dataclass
class TextTable:
    """The distinct texts (questions, statements) tokenised once: ids / mask [T, L]; ``tokens`` [T, L, C]
    from the frozen text tower (None when the text tower trains)."""

    texts: list[str]
    ids: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor | None = None


@dataclass
class ProbeSet:
    """Items to train on or score: ``images`` Long[N, k] (indices into ``split``), ``texts`` Long[N]
    (rows of the TextTable), ``targets`` Long[N] (class index; -1: an answer the head cannot give)."""

    split: torch.utils.data.Dataset
    images: torch.Tensor
    texts: torch.Tensor
    targets: torch.Tensor
    image_tokens: torch.Tensor | None = None  # [n_images, 1+P, Cv] of the frozen vision tower


def _trim(ids: torch.Tensor, mask: torch.Tensor, *more: torch.Tensor):
    """Drop padding columns no row of the batch needs."""
    n = max(1, int(mask.sum(1).max()))
    return (ids[:, :n], mask[:, :n], *(t[:, :n] for t in more))


def train_probe(model: ports.Model, data: ports.PairedData, vision, text, fusion, p: ProbeParams, texts: list[str],
                train: ProbeSet, test: ProbeSet, classes: int, k: int, generator: torch.Generator,
                log: Callable[[str], None] = lambda m: None) -> torch.Tensor:
    """Train a :class:`SceneProbe` on ``train`` for ``p.steps`` AdamW steps and return its logits on
    ``test`` [N, classes] (fp32, CPU). Items whose target is -1 are not trained on.

    The model's modules are only read, in eval mode without gradients: what they give is computed once
    (the frozen text tower's tokens of every distinct text, the frozen vision tower's tokens of every
    image through ``evaluation.frozen_image_tokens``, and with ``head`` every item's representation), and
    what trains is a copy. Random draws: the global RNG (call inside ``evaluation.seeded``) and ``generator``."""
    device = model.device
    mode = p.mode(fusion is not None)
    tok = text.tokenizer(texts)  # padded to the longest text: every chunk below has the same length
    table = TextTable(texts, tok["input_ids"], tok["attention_mask"])
    if "text" not in TRAINS[mode]:
        with frozen(text):
            table.tokens = torch.cat([
                text(table.ids[s : s + p.feature_batch_size].to(device),
                     table.mask[s : s + p.feature_batch_size].to(device)).float().cpu()
                for s in range(0, len(texts), p.feature_batch_size)])
    if "vision" not in TRAINS[mode]:  # computed once, and shared with the other frozen-transfer evaluators
        for part in (train, test):
            n = int(part.images.max()) + 1 if part.images.numel() else 0
            part.image_tokens = frozen_image_tokens(vision, data, part.split, range(n), device=device,
                                                    batch_size=p.feature_batch_size).tokens
    probe = SceneProbe(*_tower_copies(vision, text, fusion, mode), mode, p.text_pool, k, classes, p.hidden).to(device)

    def encode(part: ProbeSet, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), k * D]: the representation of items ``rows`` of ``part``."""
        ids, mask = table.ids[part.texts[rows]], table.mask[part.texts[rows]]
        if table.tokens is not None:
            ids, mask, tokens = _trim(ids, mask, table.tokens[part.texts[rows]])
            tokens = tokens.to(device)
        else:
            ids, mask = _trim(ids, mask)
            tokens = probe.tower("text")(ids.to(device), mask.to(device))
        mask = mask.to(device)
        out = []
        for j in range(k):
            idx = part.images[rows, j]
            if part.image_tokens is not None:
                image = part.image_tokens[idx].to(device)
            else:
                image = probe.tower("vision")(data.collate([part.split[int(i)] for i in idx])["images"].to(device))
            out.append(probe.represent(image, tokens, mask))
        return torch.cat(out, dim=-1)

    def chunks(part: ProbeSet) -> list[torch.Tensor]:
        return [torch.arange(s, min(len(part.texts), s + p.feature_batch_size))
                for s in range(0, len(part.texts), p.feature_batch_size)]

    features: dict[int, torch.Tensor] = {}
    if mode == "head":  # nothing but the head trains: every item's representation, once
        with frozen(vision, text, fusion):
            for part in (train, test):
                features[id(part)] = torch.cat([encode(part, rows).float() for rows in chunks(part)])

    def represent(part: ProbeSet, rows: torch.Tensor) -> torch.Tensor:
        return features[id(part)][rows.to(device)] if mode == "head" else encode(part, rows)

    usable = torch.nonzero(train.targets >= 0).flatten()
    if len(usable) < 2:
        raise ValueError(f"{len(usable)} training items with an answer the head can give; need at least 2")
    tower_params = [q for name, q in probe.named_parameters() if not name.startswith("head.")]
    groups = [{"params": list(probe.head.parameters()), "lr": p.lr}]
    groups += [{"params": tower_params, "lr": p.finetune_lr}] if tower_params else []
    opt = torch.optim.AdamW(groups, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / p.steps)))
    probe.train()
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():  # evaluators may run under no_grad; the probe trains
        for batch in minibatches(len(usable), p.batch_size, p.steps, generator):
            rows = usable[batch]
            loss = F.cross_entropy(probe.head(represent(train, rows)).float(), train.targets[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    log(f"finetune {mode}: {p.steps} steps on {len(usable)} training items (final loss {loss.item():.3f})")
    with frozen(probe, vision, text, fusion):
        out = [probe.head(represent(test, rows)).float().cpu() for rows in chunks(test)]
    return torch.cat(out) if out else torch.zeros(0, classes)


# ------------------------------------------------------------------------------ what both nodes check


def check_towers(who: str, p: ProbeParams, vision, text, fusion) -> None:
    """Refuse (UserError) towers the probe cannot read together."""
    if getattr(text, "tokenizer", None) is None:
        raise UserError(f"{who}: the text tower has no tokenizer to read questions with")
    if p.finetune == "fusion" and fusion is None:
        raise UserError(f"{who}: finetune 'fusion' needs a fusion encoder wired as the 'fusion' input (or use "
                        "finetune head / all)")
    if fusion is not None:
        if getattr(fusion, "vision", vision) is not vision or getattr(fusion, "text", text) is not text:
            raise UserError(f"{who}: the 'fusion' input fuses other towers than the 'vision' and 'text' inputs; "
                            "wire the towers the fusion encoder was built on")
        if int(fusion.image_width) != int(vision.width) or int(fusion.width) != int(text.width):
            raise UserError(f"{who}: the fusion encoder reads image tokens of width {fusion.image_width} and text "
                            f"of width {fusion.width}, but the towers give {vision.width} and {text.width}")


def check_fusion_param(p: ProbeParams, inputs: dict) -> list[tuple[str, str]]:
    """Validation: finetune 'fusion' without a 'fusion' input."""
    if p.finetune == "fusion" and not inputs.get("fusion"):
        return [("finetune", "finetune 'fusion' needs a fusion encoder wired as the 'fusion' input")]
    return []


def split_scenes(split: torch.utils.data.Dataset, n: int, who: str, name: str) -> list[ports.Scene]:
    """The scene graphs of items 0..n-1 of ``split`` (capability ``scenes``)."""
    reader = getattr(split, "scene", None)
    if reader is None:
        raise TrialFailed(f"{who}: the data's {name} split has no scene graphs (split.scene(i); capability "
                          f"'{ports.SCENES}')")
    return [reader(i) for i in range(n)]


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """Two images [3, H, W] in [0, 1] -> one [3, H, 2W + gap] (a white gap between them)."""
    spacer = torch.ones(left.shape[0], left.shape[1], gap, dtype=left.dtype)
    return torch.cat([left, spacer, right], dim=2)
