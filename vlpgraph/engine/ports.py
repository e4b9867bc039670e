"""The types that flow along a graph's edges, and the context a node's build function receives.

Each node kind declares one of these as its output; validation checks that an input receives a
subclass of what it accepts. They are small interfaces: the engine and other nodes rely only on what
is written here, never on a particular node's class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------------------------- data

# Capabilities a dataset can provide (``In(needs=...)`` names them).
PAIRED = "paired"  # image + caption samples
BOXES = "boxes"  # per-object boxes and which objects each caption mentions
CLASSES = "classes"  # zero-shot class labels on (some) test images
# every item of both splits carries ``label`` (int class index, -1 where the item has none), each split
# lists them as ``labels`` (one per item), and the data has ``class_names`` (index -> name)
LABELS = "labels"
# --- interleaved documents (LCL)
# The *train* items are documents (text with images in it); the *test* split stays paired (image +
# caption items as above), so evaluators keep working. A document item is a dict:
#   ``images`` Float[M, 3, H, W] (M >= 1, in document order), ``texts`` list[str] (its sentences),
#   ``layout`` list of ("text", k) / ("image", j) in reading order (every text and image once),
#   ``sample_id`` int (the document's index), ``image_ids`` list[int] (an id per image, unique in the
#   split: a shapes scene index, a dataset.interleaved image number).
# ``collate`` of documents: see :func:`collate_documents`. ``train_captions()`` returns every sentence
# of the training documents. ``train_pairs``: the training images as paired items (each image with its
# own sentence, items as PairedData's); ``PairedData.paired_train()`` returns it (else ``train``): the
# frozen-transfer evaluators train their heads on it.
INTERLEAVED = "interleaved"


@dataclass
class ZeroShotSet:
    """Test images with one class each, for prompt classification.

    indices: positions in the test split; labels: class index per position;
    class_names: e.g. "red circle"; prompt: format string with ``{}`` for the class name.
    """

    indices: list[int]
    labels: list[int]
    class_names: list[str]
    prompt: str = "a {}"


class PairedData:
    """Image-caption data.

    ``train`` / ``test`` are ``torch.utils.data.Dataset``s whose items are dicts:

    - ``image``: float tensor [3, H, W], normalised (mean/std of the dataset, see ``normalize``)
    - ``caption``: str
    - ``sample_id``: int (unique within the split; stable across train_fraction subsets)
    - with capability ``boxes``: ``boxes`` float tensor [K, 4] (x0, y0, x1, y1 in pixels of ``image``)
      and ``mentioned`` bool tensor [K] (which objects the caption names)

    ``collate`` turns a list of items into a batch dict (images stacked, captions as a list, boxes
    as a list of tensors); tokenisation is added by the trainer.
    """

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    # interleaved data (capability ``interleaved``): held-out documents, items as ``train``'s
    # (evaluator.documents scores a document objective on them); None for other data
    test_documents: torch.utils.data.Dataset | None = None
    capabilities: frozenset[str] = frozenset({PAIRED})
    zeroshot: ZeroShotSet | None = None
    image_size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def train_captions(self) -> list[str]:
        """Every training caption (the text tower trains its tokenizer on these)."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        return default_collate(items)

    def paired_train(self) -> torch.utils.data.Dataset:
        """The training images as paired items (image + caption): ``train``, or for interleaved data
        (whose ``train`` holds documents) its ``train_pairs``. Frozen-transfer heads train on these."""
        pairs = getattr(self, "train_pairs", None)
        return self.train if pairs is None else pairs

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised -> [0,1]."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images * std + mean).clamp(0, 1)


def default_collate(items: list[dict]) -> dict:
    batch: dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key in ("boxes", "mentioned"):
            batch[key] = vals  # ragged
        elif isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, bool)):
            batch[key] = torch.tensor(vals)
        else:
            batch[key] = vals
    if "caption" in batch:
        batch["captions"] = batch.pop("caption")
    if "image" in batch:
        batch["images"] = batch.pop("image")
    if "sample_id" in batch:
        batch["sample_ids"] = batch.pop("sample_id")
    return batch


def collate_documents(items: list[dict]) -> dict:
    """Document items (capability ``interleaved``) -> a batch of B documents:

    - ``images`` Float[sum M, 3, H, W]: every document's images, document by document, in order
    - ``image_doc`` Long[sum M]: the batch row (document) each image belongs to
    - ``image_index`` Long[sum M]: the image's index j within its document (``("image", j)`` in its layout)
    - ``image_ids`` Long[sum M]: each image's id in the split (see the INTERLEAVED note above)
    - ``doc_texts`` list[list[str]], ``doc_layout`` list[list[tuple[str, int]]]
    - ``sample_ids`` Long[B]

    No ``captions`` key, so the trainer does not tokenise: an interleaved objective builds its own
    sequences from ``doc_texts`` / ``doc_layout``.
    """
    counts = [len(it["images"]) for it in items]
    return {
        "images": torch.cat([it["images"] for it in items]),
        "image_doc": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)),
        "image_index": torch.cat([torch.arange(m) for m in counts]),
        "image_ids": torch.tensor([i for it in items for i in it["image_ids"]], dtype=torch.long),
        "doc_texts": [list(it["texts"]) for it in items],
        "doc_layout": [[tuple(e) for e in it["layout"]] for it in items],
        "sample_ids": torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------- towers


class Tokenizer:
    """Text -> ids. ``__call__(captions) -> {"input_ids": Long[B,L], "attention_mask": Long[B,L]}``,
    padded to the longest caption in the batch and truncated to ``max_len`` (CLS first, SEP last)."""

    vocab_size: int
    max_len: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    content_hash: str

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (special tokens and WordPiece continuations resolved)."""
        raise NotImplementedError


class VisionTower(nn.Module):
    """Images [B,3,H,W] -> tokens [B, 1+N, C] (CLS first, final norm applied).

    ``forward_blocks(images, blocks)`` also returns the tokens after each listed block (0-based),
    before the final norm: ``(final_tokens, {block: tokens})``.

    ``forward_masked(images, ids_keep)`` (towers that support masked image modelling): encode only the
    patches listed in ``ids_keep`` [B, V] (long, row-major patch indices, each row sorted) plus the
    prefix tokens; the blocks never see the other patches. Returns [B, prefix + V, C], final norm applied.
    """

    width: int
    patch_size: int
    grid_size: tuple[int, int]
    num_prefix_tokens: int = 1

    def forward_blocks(self, images: torch.Tensor, blocks: Sequence[int]):
        raise NotImplementedError

    def forward_masked(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no masked forward")


class TextTower(nn.Module):
    """``forward(input_ids, attention_mask) -> tokens [B, L, C]`` (position 0 is CLS).

    ``forward_embeds(inputs_embeds [B, L, C], attention_mask) -> tokens [B, L, C]`` (towers that support it,
    encoder.text): the same forward from input embeddings instead of ids (the tower adds position
    embeddings as for ids), so sequences can carry other tokens than words (mixer.cmc's visual tokens).
    """

    width: int
    tokenizer: Tokenizer

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no forward from input embeddings")


def pool_caption(tokens: torch.Tensor, attention_mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """A TextTower's tokens [B, L, C] -> one caption vector [B, C]: the CLS token (``how="cls"``) or
    the mean of the non-pad tokens (``"mean"``)."""
    if how == "cls":
        return tokens[:, 0]
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
    return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)


class Forward:
    """Memoised encoder passes for one batch, shared by every objective of a step.

    ``fwd.image_tokens(tower)`` runs ``tower(batch["images"])`` once per step however many objectives
    ask; ``fwd.memo(key, fn)`` memoises anything else (a similarity matrix, patch scores).
    """

    def __init__(self, batch: dict):
        self.batch = batch
        self._cache: dict[Any, Any] = {}

    def memo(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def image_tokens(self, tower: nn.Module, images_key: str = "images") -> torch.Tensor:
        return self.memo(("image", id(tower), images_key), lambda: tower(self.batch[images_key]))

    def text_tokens(self, tower: nn.Module, ids_key: str = "input_ids", mask_key: str = "attention_mask") -> torch.Tensor:
        b = self.batch
        return self.memo(("text", id(tower), ids_key, mask_key), lambda: tower(b[ids_key], b[mask_key]))


# --- the attentive-pool head (LCL)


class ImagePooler(nn.Module):
    """LCL's attentive pooler over a vision tower's patch tokens (head.attentive_pool).

    ``forward(patches [M, P, Cv]) -> (z [M, Cv], visual_tokens [M, P, Cv])``: ``z`` is one learned query
    cross-attending over the P patches (the image latent); ``visual_tokens`` are the same block's value
    and output projections applied to each patch on its own (no mixing across patches), the tokens a
    language model reads in place of the image. ``width`` = Cv (the tower's width).
    """

    width: int


# ------------------------------------------------------------------------------ objectives, model


class Objective(nn.Module):
    """``forward(fwd: Forward, batch, group=None) -> dict[str, Tensor]`` of named loss terms (scalars).

    The trainer multiplies every term by ``weight`` and sums them; each term is logged separately.

    Optimiser steps: ``step_groups`` names the groups this objective contributes to (default one,
    "main"). When a trial's objectives name several groups, the trainer takes one optimiser step per
    group each iteration, in the order the groups first appear in the trainer's ``objectives`` list,
    with a fresh Forward each (the weights changed), calling ``obj(fwd, batch, group=g)``; the
    objective returns only that group's terms. With one group, ``group`` is None: return every term.
    The batch carries the loop's position: ``progress`` (float in [0, 1)), ``step``, ``total_steps``,
    ``steps_per_epoch``.
    """

    weight: float = 1.0
    step_groups: tuple[str, ...] = ("main",)


@dataclass
class MaskedEncoding:
    """One step's masked image encoding (MAE): ``tokens`` [B, prefix + V, C] from the vision tower's masked
    forward (final norm applied, prefix/CLS first), ``ids_keep`` [B, V] long (the visible patches, sorted),
    ``mask`` [B, N] float (1 = masked, 0 = visible) over the N patches in row-major order."""

    tokens: torch.Tensor
    ids_keep: torch.Tensor
    mask: torch.Tensor


class MaskedImageModel(Objective):
    """An objective that encodes a masked view of the batch's images (objective.mae).

    ``masked_encoding(fwd) -> MaskedEncoding``: memoised in ``fwd``, so every objective of the step that
    reads it (objective.caption on MUG's masked view) shares one masked forward. ``vision``: the tower.
    ``reconstruct(fwd) -> Tensor [B, N, patch*patch*3]``: the decoder's pixel predictions (normalised
    per patch when ``norm_pix``), for evaluators and the app.
    """

    vision: "VisionTower"

    def masked_encoding(self, fwd: Forward) -> MaskedEncoding:
        raise NotImplementedError

    def reconstruct(self, fwd: Forward) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class DocumentScores:
    """A document objective's scores of one batch of interleaved documents (no gradient needed).

    ``input_ids`` / ``labels`` [B, L]: the built sequences and the token each position predicts (-100:
    not predicted); ``token_loss`` [B, L]: that prediction's cross-entropy (0 where the label is -100);
    ``image_row`` / ``soi_pos`` [K]: row and ``<soi>`` position of each image kept after truncation (in
    document order), ``kept`` Bool[sum M]: which of the batch's images were kept; ``has_context`` Bool[K]:
    which kept images enter the contrastive term; ``image_features`` / ``context_features`` [K, D]: each
    kept image's feature and its ``<soi>`` context feature in the contrastive space (L2-normalised; a
    cosine of the two is the contrastive logit before the temperature)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    token_loss: torch.Tensor
    image_row: torch.Tensor
    soi_pos: torch.Tensor
    kept: torch.Tensor
    has_context: torch.Tensor
    image_features: torch.Tensor
    context_features: torch.Tensor


class DocumentModel(Objective):
    """An objective over interleaved documents (objective.lcl). ``score_documents(fwd) -> DocumentScores``
    for a batch of documents (as the data's collate makes them); ``tokenizer``: the language model's
    (with ``soi_id``, ``img_id``, ``eoi_id``); ``generates`` / ``contrasts``: whether its generation /
    contrastive terms are on (weights above 0), i.e. which of its scores were trained."""

    tokenizer: "Tokenizer"
    generates: bool = True
    contrasts: bool = True

    def score_documents(self, fwd: Forward) -> DocumentScores:
        raise NotImplementedError


class CaptionDecoder(nn.Module):
    """A causal caption decoder conditioned on image tokens (decoder.caption).

    ``forward(input_ids [B, L], attention_mask [B, L], image_tokens [B, M, Cv]) -> logits [B, L, V]``:
    position t predicts token t+1 and depends only on tokens <= t and the image.
    ``generate(image_tokens, max_len, beams=1, length_penalty=1.0) -> list[list[int]]``: token ids after
    BOS, up to (not including) EOS; beam search ranks finished captions by log-prob / length**length_penalty. ``tokenizer``: its tokenizer (BOS = ``cls_id``, EOS = ``sep_id``); ``image_width``:
    the width of the image tokens it reads.
    """

    tokenizer: Tokenizer
    image_width: int

    def generate(self, image_tokens: torch.Tensor, max_len: int | None = None, beams: int = 1,
                 length_penalty: float = 1.0) -> list[list[int]]:
        raise NotImplementedError


# --- the language model over interleaved sequences (LCL)


class LanguageModel(nn.Module):
    """A causal decoder-only language model that reads input embeddings (encoder.lm).

    ``embed(input_ids [B, L]) -> [B, L, C]`` (its token embeddings; image placeholders are then replaced
    by visual tokens with vlpgraph.layers.interleaved.place_visual). ``forward(inputs_embeds [B, L, C],
    attention_mask [B, L]) -> hidden [B, L, C]``: causal (position t sees positions <= t) and padding
    masked, final norm applied. ``logits(hidden) -> [B, L, V]`` over the tokenizer's vocabulary.
    ``width`` = C; ``max_len``: the longest sequence it takes. ``tokenizer``: a Tokenizer with ``soi_id``,
    ``img_id``, ``eoi_id`` (the image block ``<soi> <img>×n <eoi>``) and ``pieces(texts)`` (ids without
    specials); ``cls_id`` begins a document, ``sep_id`` ends one.
    """

    width: int
    max_len: int
    tokenizer: Tokenizer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PatchScorer(nn.Module):
    """``patch_scores(fwd, images_key="images") -> Tensor [B, S, S]``: how relevant each patch of image
    i is to caption i (higher = more relevant). ``grid_size`` = (S, S). Implementations memoise in fwd."""

    grid_size: tuple[int, int]

    def patch_scores(self, fwd: Forward, images_key: str = "images") -> torch.Tensor:
        raise NotImplementedError


@dataclass
class MixedBatch:
    """A mixer's output for one step.

    images: [B,3,H,W] mixed images (image i keeps caption i); soft_targets: [B,B] rows sum to 1,
    row i a distribution over the batch's captions for mixed image i (no gradient); lam: [B] share
    of image i kept; partner: [B] long, the index mixed into image i; gamma: weight multiplier of the
    mixed loss this step (ramps); info: anything worth showing (e.g. window boxes) for evaluators/app.
    """

    images: torch.Tensor
    soft_targets: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor
    gamma: float = 1.0
    info: dict = field(default_factory=dict)


class Mixer:
    """``mix(fwd, batch, embedder) -> MixedBatch | None`` (None: no mixing this step).

    ``fwd`` is the step's un-mixed Forward (patch scores, similarity); ``embedder`` the consuming
    objective's embedding (for self-distilled soft targets). ``steps`` is "summed" (the mixed loss is
    added to the main step) or "separate" (its own optimiser step)."""

    steps: str = "summed"

    def mix(self, fwd: Forward, batch: dict, embedder: "Embedder") -> MixedBatch | None:
        raise NotImplementedError


class Embedder:
    """Objectives that define a shared image-text embedding (ITC) also implement this; evaluators
    use it. Both return L2-normalised [B, D]."""

    def embed_images(self, fwd: Forward) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, fwd: Forward) -> torch.Tensor:
        raise NotImplementedError


class Model:
    """A trainer's output: what evaluators receive once training is done.

    modules: every trainable module of the trial, by node name; objectives: by node name;
    data: the training data; tokenizer: the text tower's; device: where modules live.
    """

    modules: nn.ModuleDict
    objectives: dict[str, Objective]
    data: PairedData
    tokenizer: Tokenizer | None
    device: torch.device
    params: Any

    def embedder(self) -> Embedder:
        for obj in self.objectives.values():
            if isinstance(obj, Embedder):
                return obj
        raise LookupError("no objective of this model defines an image-text embedding (e.g. objective.itc)")


class Evaluator:
    """``evaluate(model, ctx) -> EvalResult``; run after training (and every ``trainer.eval_every`` steps).

    ``headline`` names the metric `vlpgraph report` shows by default.
    """

    headline: str | None = None

    def evaluate(self, model: Model, ctx: "BuildContext") -> "EvalResult":
        raise NotImplementedError


@dataclass
class EvalResult:
    metrics: dict[str, float]
    # rows for the store's patch_scores table (dicts with its columns less run_id/step)
    patch_scores: list[dict] = field(default_factory=list)
    # rows for the store's samples table (generated captions, reconstructions...; see Store.log_samples)
    samples: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- context


@dataclass
class BuildContext:
    """What a build function may use besides its params and inputs.

    node: the node's name; node_hash: its content hash; seed: the trial seed;
    cache_dir: ``store/cache/<node_hash>/`` for expensive outputs (created on demand);
    device: the trial's torch device; log: a callable for one-line notes to the user;
    upstream: every node this one depends on, directly or not, built ({name: output}, in build order)
    — the trainer collects the trial's modules from it; base_dir: the folder relative paths in
    params resolve against (the graph file's folder; the working directory when built without one).
    """

    node: str
    node_hash: str
    seed: int
    cache_root: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[str], None] = print
    upstream: dict[str, Any] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def cache_dir(self) -> Path:
        d = self.cache_root / self.node_hash
        d.mkdir(parents=True, exist_ok=True)
        return d


# --- scene graphs (what evaluator.qa and evaluator.nlvr ask about)

# The data's *test* split and its paired training items (``PairedData.paired_train()``) carry a scene
# graph per item: ``split.scene(i) -> Scene``. dataset.shapes provides it in every pairing.
SCENES = "scenes"


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: ``colour`` and ``shape`` names (dataset.shapes: shapes.COLOURS / SHAPES),
    ``size`` "small" | "large", ``box`` (x0, y0, x1, y1) in pixels of the item's image (y down)."""

    colour: str
    shape: str
    size: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """The objects of one image (what a question or statement about it may refer to)."""

    objects: list[SceneObject]


# --- unpaired corpora and the concept gallery (VLMixer)
# The *train* items come from two corpora drawn from DIFFERENT scenes (no pair information reaches
# training): ``image`` Float[3, H, W] (normalised as the data's images), ``image_id`` int (its image in
# the image corpus), ``caption`` str (a sentence of the text corpus), ``text_id`` int (that sentence's
# id), ``sample_id`` int (the item's index). An item's image and sentence are unrelated, and the two
# corpora are disjoint sets of scenes. ``collate`` -> :func:`collate_unpaired`. The *test* split stays
# paired (every evaluator keeps working); ``train_pairs`` / ``paired_train()``: the image corpus as paired
# items (each image with its own caption; for frozen-transfer heads, which may see pairs).
# ``train_captions()``: the text corpus's sentences. Unpaired data does not provide ``paired``; kinds that
# treat a batch's images and captions as pairs declare ``requires={PAIRED}`` and validation refuses them.
UNPAIRED = "unpaired"
# ``data.gallery``: a :class:`Gallery` of image regions per visual concept, cut from the image corpus's
# own object boxes (never from the text corpus's scenes).
GALLERY = "gallery"


class Gallery:
    """Visual concepts -> image regions (VLMixer's patch gallery).

    ``concepts``: the concept phrases that have at least one region, as the sentences write them (shapes:
    colour + shape, e.g. "red circle"; COCO: a category name, e.g. "traffic light"). Regions are numbered
    0..``len(self) - 1``. ``regions(concept) -> list[int]`` (empty for an unknown concept);
    ``region(rid) -> (image Float[3, region_size, region_size] normalised as the data's images, concept,
    source image_id, box (x0, y0, x1, y1) in pixels of the source image)``; ``sample(concept, generator)``
    -> one of its regions, uniformly (draws only from ``generator``); ``region_images(rids)`` ->
    Float[K, 3, region_size, region_size]. ``region_size``: the side of a region's image (by default the
    data's image_size, so the vision tower embeds a region as it embeds an image).
    """

    concepts: list[str]
    region_size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def regions(self, concept: str) -> list[int]:
        raise NotImplementedError

    def region(self, rid: int) -> tuple[torch.Tensor, str, int, tuple[float, float, float, float]]:
        raise NotImplementedError

    def sample(self, concept: str, generator: torch.Generator) -> int:
        rids = self.regions(concept)
        if not rids:
            raise KeyError(f"the gallery has no region of {concept!r}")
        return rids[int(torch.randint(len(rids), (1,), generator=generator))]

    def region_images(self, rids: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.region(int(r))[0] for r in rids])


def collate_unpaired(items: list[dict]) -> dict:
    """Unpaired items -> ``images`` Float[B, 3, H, W], ``captions`` list[str] (tokenised by the trainer
    like paired captions), ``image_ids`` / ``text_ids`` / ``sample_ids`` Long[B]."""
    return {
        "images": torch.stack([it["image"] for it in items]),
        "captions": [it["caption"] for it in items],
        "image_ids": torch.tensor([int(it["image_id"]) for it in items], dtype=torch.long),
        "text_ids": torch.tensor([int(it["text_id"]) for it in items], dtype=torch.long),
        "sample_ids": torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.long),
    }

# --- cross-modal CutMix (mixer.cmc)


@dataclass
class CMCBatch:
    """One step's cross-modal CutMix view of the batch's sentences (mixer.cmc, VLMixer).

    Row i is sentence i with each replaced concept span's word tokens removed and the visual tokens of a
    region of that concept put in their place (every other token kept, in order), padded to the longest
    row. ``inputs_embeds`` [B, L, C_text]: the text tower's word embeddings (before position embeddings)
    at word positions, the projected visual tokens at visual positions, the [PAD] embedding at padding —
    the input of ``TextTower.forward_embeds``; ``attention_mask`` Long[B, L]; ``input_ids`` Long[B, L]: the
    kept word ids ([CLS]/[SEP]/[PAD] included), -1 at visual positions; ``is_visual`` Bool[B, L];
    ``spans``: per row, one ``(concept, region id, start position in the mixed row, number of visual
    tokens)`` per replaced span, in order; ``rate``: replaced spans / candidate spans in the batch (0.0
    without candidates).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    is_visual: torch.Tensor
    spans: list[list[tuple[str, int, int, int]]]
    rate: float


class TextMixer(nn.Module):
    """Mixes the batch's sentences with image regions (mixer.cmc).

    ``mix(fwd, batch, text=None, vision=None) -> CMCBatch | None``: memoised in ``fwd``, so every objective
    of a step reads the same view. None when not training or when no span of the batch was replaced:
    every sentence is then its own view. ``text`` / ``vision`` (default: the towers it was built with; no
    others are accepted): the text tower must have ``forward_embeds``. It is a module: the parameters
    that embed the visual tokens (a projection to the text width, a visual type embedding) are its own.
    """

    text: TextTower
    vision: VisionTower

    def mix(self, fwd: Forward, batch: dict, text: TextTower | None = None,
            vision: VisionTower | None = None) -> CMCBatch | None:
        raise NotImplementedError
