"""mixer.cmc: cross-modal CutMix (VLMixer, Wang et al. 2022).

Words of a sentence that name a visual concept of the data's gallery are replaced, span by span with
probability p, by visual tokens of an image region of that concept; objective.mlm and objective.cmcl
train on the mixed sentences. No official code exists: what is assumed is said in the node's doc.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlpgraph.engine import ports
from vlpgraph.errors import TrialFailed, UserError
from vlpgraph.layers.fusion import word_embeddings
from vlpgraph.layers.masking import sample_seed
from vlpgraph.engine.registry import In, Params, register


class CMCParams(Params):
    p: float = Field(0.5, ge=0, le=1, description="probability that each concept span of a sentence is replaced "
                     "by a region's visual tokens (VLMixer: 0.5); 0 leaves every sentence as it is")
    visual_tokens: Literal["cls", "patches"] = Field(
        "cls", description="what stands in for a replaced span: 'cls' = the vision tower's CLS token of the region "
        "(one token), 'patches' = its patch tokens (grid_size[0]·grid_size[1] tokens; a replacement that would "
        "make the sentence longer than the text tower's max_len is not made)"
    )


def span_index(concepts: dict[str, list[int]]) -> dict[int, list[tuple[tuple[int, ...], str]]]:
    """{first token id: [(concept's token ids, concept), ...] longest first} for :func:`find_spans`."""
    index: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    for concept, ids in concepts.items():
        if ids:
            index.setdefault(ids[0], []).append((tuple(ids), concept))
    for options in index.values():
        options.sort(key=lambda o: (-len(o[0]), o[1]))  # longest first; ties by name, so the order is fixed
    return index


def find_spans(ids: list[int], index: dict[int, list[tuple[tuple[int, ...], str]]],
               continuations: frozenset[int] = frozenset()) -> list[tuple[int, int, str]]:
    """Concept spans of one sentence's token ids: ``[(start, length, concept)]`` in order, never overlapping.

    Scanning left to right, at each position the longest concept whose token ids follow there wins and
    the scan goes on after it; a match whose next token is a WordPiece continuation (in ``continuations``,
    e.g. ``##s`` of "circles") is no match, since it ends inside a word. Its first token starts a word
    anyway: a concept's first piece is never a continuation piece."""
    spans: list[tuple[int, int, str]] = []
    i, n = 0, len(ids)
    while i < n:
        for pieces, concept in index.get(ids[i], ()):
            k = len(pieces)
            if tuple(ids[i:i + k]) == pieces and (i + k == n or ids[i + k] not in continuations):
                spans.append((i, k, concept))
                i += k
                break
        else:
            i += 1
    return spans


def concept_ids(tokenizer: ports.Tokenizer, concepts: list[str]) -> tuple[dict[str, list[int]], list[str]]:
    """Each concept phrase's WordPiece ids without specials (``tokenizer.pieces`` where it has it, else
    its ids between [CLS] and [SEP]); also the concepts left out because a piece is unknown ([UNK] would
    match any unknown word)."""
    pieces = getattr(tokenizer, "pieces", None)
    if callable(pieces):
        ids = pieces(concepts)
    else:
        enc = tokenizer(concepts)
        ids = [[int(t) for t, m in zip(row, mask) if m and int(t) not in (tokenizer.cls_id, tokenizer.sep_id)]
               for row, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
    unk = _vocab(tokenizer).get("[UNK]")
    kept, dropped = {}, []
    for concept, row in zip(concepts, ids):
        if row and unk not in row:
            kept[concept] = list(row)
        else:
            dropped.append(concept)
    return kept, dropped


def _vocab(tokenizer: ports.Tokenizer) -> dict[str, int]:
    """The token -> id map of a WordPiece tokenizer (layers.tokenizer's keeps a tokenizers one as ``tok``);
    empty for a tokenizer that does not expose it."""
    inner = getattr(tokenizer, "tok", None)
    get = getattr(inner, "get_vocab", None)
    return dict(get(with_added_tokens=True)) if callable(get) else {}


def continuation_ids(tokenizer: ports.Tokenizer) -> frozenset[int]:
    """Ids of the WordPiece continuation pieces (``##...``)."""
    return frozenset(i for t, i in _vocab(tokenizer).items() if t.startswith("##"))


class CrossModalCutMix(ports.TextMixer):
    """Holds the towers and the data by reference (they are their own graph nodes); owns the visual
    projection and the visual type embedding."""

    def __init__(self, data: ports.PairedData, vision: ports.VisionTower, text: ports.TextTower, params: CMCParams,
                 seed: int, node: str, log=print):
        super().__init__()
        self._refs = (data, vision, text)
        self.p = params.p
        self.visual_tokens = params.visual_tokens
        self.seed, self.node = seed, node
        self.regions_key = f"cmc_regions/{node}"
        self.proj = nn.Linear(vision.width, text.width)
        self.visual_type = nn.Parameter(torch.zeros(text.width))
        nn.init.normal_(self.proj.weight, std=0.02)  # BERT's initialisation, as the text tower's embeddings
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.visual_type, std=0.02)
        gallery = data.gallery
        with_regions = [c for c in gallery.concepts if gallery.regions(c)]
        ids, dropped = concept_ids(text.tokenizer, with_regions)
        if dropped:
            log(f"mixer.cmc '{node}': {len(dropped)} concept(s) have a piece the tokenizer does not know and are never "
                f"replaced: {', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}")
        self.concepts = ids  # concept -> its token ids
        self.index = span_index(ids)
        self.continuations = continuation_ids(text.tokenizer)
        self.max_len = getattr(text, "max_len", None) or getattr(text.tokenizer, "max_len", None)
        self.image_size = (vision.grid_size[0] * vision.patch_size, vision.grid_size[1] * vision.patch_size)

    @property
    def data(self) -> ports.PairedData:
        return self._refs[0]

    @property
    def vision(self) -> ports.VisionTower:
        return self._refs[1]

    @property
    def text(self) -> ports.TextTower:
        return self._refs[2]

    @property
    def gallery(self):
        return self.data.gallery

    def draw(self, ids: list[int], step: int, sample_id: int,
             seed: int | None = None) -> tuple[list[tuple[int, int, str]], list[int | None]]:
        """One sentence's candidate spans (:func:`find_spans`) and, per span, the region that replaces it
        (None: kept). Drawn from a generator seeded by (seed, node, step, sample id) only — ``seed``: the
        trial's unless given (an evaluator's fixed one): a span's draw is one uniform (replaced when < p),
        then a region from that concept's gallery."""
        spans = find_spans(ids, self.index, self.continuations)
        seed = self.seed if seed is None else seed
        gen = torch.Generator().manual_seed(sample_seed(seed, self.node, step, sample_id))
        chosen: list[int | None] = []
        for _, _, concept in spans:
            replace = float(torch.rand((), generator=gen)) < self.p
            chosen.append(int(self.gallery.sample(concept, gen)) if replace else None)
        return spans, chosen

    def region_tokens(self, fwd: ports.Forward, rids: list[int]) -> torch.Tensor:
        """Visual tokens [R, T, C_text] of the regions ``rids``: the region images go into the batch under
        ``cmc_regions/<node>`` and through the vision tower once per step (``fwd.image_tokens``, so any
        other reader shares the pass), then CLS or patch tokens -> projection -> + visual type embedding."""

        def images() -> torch.Tensor:
            crops = torch.stack([self.gallery.region(r)[0] for r in rids]).float()
            if tuple(crops.shape[-2:]) != self.image_size:  # region_size other than the tower's input size
                crops = F.interpolate(crops, size=self.image_size, mode="bilinear", align_corners=False)
            return crops.to(fwd.batch["input_ids"].device)

        fwd.batch[self.regions_key] = fwd.memo(("mixer.cmc/region_images", id(self)), images)
        tokens = fwd.image_tokens(self.vision, self.regions_key)  # [R, prefix + N, Cv]
        if self.visual_tokens == "cls":
            tokens = tokens[:, :1]
        else:
            tokens = tokens[:, getattr(self.vision, "num_prefix_tokens", 1):]
        return self.proj(tokens) + self.visual_type

    def sample_rows(self, batch: dict, limit: int = 4, cmc: ports.CMCBatch | None = None) -> list[dict]:
        """Rows for the store's samples table (``Store.log_samples``; kind 'cmc') showing what is mixed:
        the first ``limit`` sentences of ``batch`` (tokenised, with ``sample_ids``, ``captions`` and
        optionally ``step`` and ``mix_seed``, the seed of the draws in place of the trial's) that have a
        replaced span. ``cmc``: their CMCBatch, else mixed here (without
        gradient, in any mode: for evaluators and the app). ``text``: the mixed sentence, each visual run
        written ``[concept #region]``; ``reference``: the original caption; ``image``: the regions that
        replaced the spans, side by side (PNG); ``info``: the spans (concept, region id, source image id,
        box, start, n_visual) and the batch's rate."""
        from vlpgraph.layers.patches import png_bytes

        if cmc is None:
            with torch.no_grad():
                cmc = self._mix(ports.Forward(batch), batch)
            if cmc is None:
                return []
        tok, rows = self.text.tokenizer, []
        specials = {tok.pad_id, tok.cls_id, tok.sep_id}

        def decode(ids: torch.Tensor) -> str:
            return tok.decode([t for t in ids.tolist() if t not in specials])

        for i, spans in enumerate(cmc.spans):
            if len(rows) == limit:
                break
            if not spans:
                continue
            words, at = [], 0
            for concept, rid, start, n in spans:
                words += [decode(cmc.input_ids[i, at:start]), f"[{concept} #{rid}]"]
                at = start + n
            words.append(decode(cmc.input_ids[i, at:int(cmc.attention_mask[i].sum())]))
            regions = [self.gallery.region(rid) for _, rid, _, _ in spans]
            strip = torch.cat([self.data.denormalize(r[0][None].float())[0] for r in regions], dim=2)
            rows.append({
                "kind": "cmc",
                "sample_id": int(batch["sample_ids"][i]),
                "text": " ".join(w for w in words if w),
                "reference": batch["captions"][i],
                "image": png_bytes(strip),
                "info": {"rate": cmc.rate, "spans": [
                    {"concept": concept, "region": rid, "source_image": int(r[2]), "box": [float(v) for v in r[3]],
                     "start": start, "n_visual": n} for (concept, rid, start, n), r in zip(spans, regions)]},
            })
        return rows

    def n_visual(self) -> int:
        return 1 if self.visual_tokens == "cls" else self.vision.grid_size[0] * self.vision.grid_size[1]

    def mix(self, fwd: ports.Forward, batch: dict, text: ports.TextTower | None = None,
            vision: ports.VisionTower | None = None) -> ports.CMCBatch | None:
        if (text is not None and text is not self.text) or (vision is not None and vision is not self.vision):
            raise TrialFailed(f"mixer.cmc '{self.node}': mix() was given other towers than the ones it was built "
                              "with (its projection is sized for those)")
        if not self.training:
            return None
        return fwd.memo(("mixer.cmc", id(self)), lambda: self._mix(fwd, batch))

    def _mix(self, fwd: ports.Forward, batch: dict) -> ports.CMCBatch | None:
        if "sample_ids" not in batch:
            raise TrialFailed(f"mixer.cmc '{self.node}': the batch has no 'sample_ids' (spans are drawn per sample "
                              "id; every PairedData item carries a sample_id)")
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        device = input_ids.device
        step = int(batch.get("step", 0))
        seed = int(batch.get("mix_seed", self.seed))  # an evaluator's fixed seed (evaluator.mixing), else the trial's
        t = self.n_visual()
        # per row, the mixed sentence as parts: ("words", start, end) of the original ids, or ("visual", r)
        # for the r-th region of the batch; each part's length is end - start or t
        rows: list[list[tuple[str, int, int]]] = []
        spans_out: list[list[tuple[str, int, int, int]]] = []
        rids: list[int] = []
        candidates = 0
        for ids, n, sid in zip(input_ids.tolist(), mask.sum(1).tolist(), batch["sample_ids"].tolist()):
            spans, chosen = self.draw(ids[:n], step, int(sid), seed)
            candidates += len(spans)
            parts: list[tuple[str, int, int]] = []
            replaced: list[tuple[str, int, int, int]] = []
            pos, length = 0, n  # next original position to copy; the mixed row's length so far
            for (start, k, concept), rid in zip(spans, chosen):
                if rid is None or (self.max_len and length - k + t > self.max_len):
                    continue
                parts.append(("words", pos, start))
                at = sum(e - s for kind, s, e in parts if kind == "words") + t * len(replaced)
                replaced.append((concept, rid, at, t))
                parts.append(("visual", len(rids), len(rids)))
                rids.append(rid)
                pos, length = start + k, length - k + t
            parts.append(("words", pos, n))
            rows.append(parts)
            spans_out.append(replaced)
        if not rids:
            return None

        visual = self.region_tokens(fwd, rids)  # [R, t, C]
        emb = word_embeddings(self.text)
        words = emb(input_ids)  # [B, L, C]
        visual = visual.to(words.dtype)  # bf16 under autocast; the word embeddings stay fp32
        pad_id = self.text.tokenizer.pad_id
        pad = emb(torch.tensor([pad_id], device=device))  # [1, C]
        lengths = [sum(e - s if kind == "words" else t for kind, s, e in parts) for parts in rows]
        width = max(lengths)
        out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        is_visual = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        embeds = []
        for i, parts in enumerate(rows):
            row, at = [], 0
            for kind, s, e in parts:
                if kind == "words":
                    row.append(words[i, s:e])
                    out_ids[i, at:at + e - s] = input_ids[i, s:e]
                    at += e - s
                else:
                    row.append(visual[s])
                    out_ids[i, at:at + t] = -1
                    is_visual[i, at:at + t] = True
                    at += t
            row.append(pad.expand(width - at, -1))
            embeds.append(torch.cat(row))
        attention = (torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
        rate = len(rids) / candidates
        return ports.CMCBatch(torch.stack(embeds), attention, out_ids, is_visual, spans_out, rate)


@register(
    "mixer.cmc",
    params=CMCParams,
    output=CrossModalCutMix,
    inputs={
        "data": In(ports.PairedData, needs=frozenset({ports.GALLERY}), doc="the training data; its gallery (concept -> "
                   "image regions) supplies the regions"),
        "vision": In(ports.VisionTower, doc="embeds the regions (its CLS or patch tokens)"),
        "text": In(ports.TextTower, doc="the text tower the mixed sentences are for: its tokenizer finds the concept "
                   "words, its word embeddings embed the kept words; needs forward_embeds (encoder.text has it)"),
    },
)
def build(params: CMCParams, inputs: dict, ctx: ports.BuildContext) -> CrossModalCutMix:
    """Cross-modal CutMix (VLMixer): concept words of a sentence replaced by image regions of that concept.

    Consumed by objective.mlm's and objective.cmcl's `mixer` input; mix() runs once per step (memoised
    in the step's Forward, so both objectives read the same mixed sentences) and only in training mode.
    Concept spans: each concept of the data's gallery (`data.gallery.concepts`, e.g. "red circle",
    the colour + shape phrase as the shapes captions write it; concepts without regions are left out)
    is tokenised by the text tower's tokenizer (WordPiece ids, no specials); a sentence is scanned
    left to right over its token ids and at each position the longest concept whose ids follow there
    is a span (spans never overlap; a match followed by a `##` continuation piece is not one, so
    "red circles" is not "red circle"; "a big red circle" has the span "red circle" — size words stay).
    Each span is replaced with probability `p`, drawn by a generator seeded from (trial seed, node,
    step, sample id) alone (a batch's `mix_seed` stands in for the trial seed: evaluator.mixing's) —
    the same sample mixes the same at a step whatever else is in the batch
    and after a resume: one uniform per span in order, and for a replaced span a region id from
    `gallery.sample(concept, generator)`. The region image (`gallery.region(rid)`, resized bilinearly
    to the tower's input size when region_size differs) goes through the vision tower in one pass
    for the step's regions (batch key `cmc_regions/<node>`, via the Forward, with gradient: the image
    corpus reaches the vision tower only through these regions); `visual_tokens` 'cls' takes its CLS
    token, 'patches' its patch tokens; a Linear(vision width -> text width) and a learned visual type
    embedding (both this node's parameters, BERT-initialised) make them text-width tokens. The span's
    word tokens are removed and the visual tokens put in their place; every other token stays, in order.
    Output: CMCBatch(inputs_embeds = word embeddings / visual tokens / [PAD] embedding, attention_mask,
    input_ids (-1 at visual positions), is_visual, spans (concept, region id, start, n_visual) per row,
    rate = replaced / candidate spans), or None when nothing was replaced (or not training): every
    sentence is then its own view. The text tower adds position embeddings (forward_embeds).
    `sample_rows(batch)` turns a batch's mixed sentences into rows for the store's samples table (kind 'cmc': the
    mixed sentence with `[concept #region]` markers, the original, the regions' picture, the spans).
    Assumptions (no official code): VLMixer's gallery holds patches of detected objects and a visual
    token per region; here a region's CLS (or patch) tokens from the model's own vision tower, trained
    through the mixed sentences; the visual type embedding stands in for VLMixer's modality embedding;
    a replacement that would make a sentence longer than the text tower's max_len is not made.
    """
    data, vision, text = inputs["data"], inputs["vision"], inputs["text"]
    where = f"node '{ctx.node}' (mixer.cmc)"
    if getattr(data, "gallery", None) is None:
        raise UserError(f"{where}: its data has no gallery (data.gallery): a dataset with capability '{ports.GALLERY}' "
                        "(e.g. dataset.shapes with pairing: unpaired)")
    if type(text).forward_embeds is ports.TextTower.forward_embeds:
        raise UserError(f"{where}: the text tower ({type(text).__name__}) has no forward_embeds, so it cannot read "
                        "mixed sentences (encoder.text has it)")
    if word_embeddings(text) is None:
        raise UserError(f"{where}: the text tower does not expose its word embeddings (encoder.text does)")
    return CrossModalCutMix(data, vision, text, params, ctx.seed, ctx.node, ctx.log).to(ctx.device)
