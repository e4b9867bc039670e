"""``dataset.interleaved``: real interleaved image-text documents from an MMC4-style JSONL file, or from
the WebDataset shards ``vlpgraph data pack`` writes from one.

One document per line: ``{"text_list": [sentence, ...], "image_info": [{"image_name": path,
"matched_text_index": k}, ...]}`` (other keys are ignored, as MMC4's ``url``, ``similarity_matrix`` ...).
Image paths are relative to ``images`` (default: the annotations' folder). Each image stands right
before or right after its matched sentence with probability ``image_first_p`` / 1 - ``image_first_p``
(LCL's rule), drawn from (``data_seed``, the document's line), so a document reads the same in every
trial and every ``train_fraction``.

Shards (param ``shards``, e.g. ``data/shard-{000000..000009}.tar``) hold one sample per document (its
JSON, its images ``KEY.0.jpg``, ``KEY.1.png``, ... and its line in the .jsonl; vlpgraph/files/shards.py). They
are streamed once at build (every image checked as it passes, bad ones skipped and counted as the
folder's are) and then read by index, each image in place in its shard; a document from shards is the
document of the .jsonl it was packed from (same texts, same images, same line, so the same placement),
and the splits, ``train_fraction`` and held-out documents are the folder's.

Training items are documents (capability ``interleaved``; see ``ports.INTERLEAVED``). The test split is
paired: every readable image of ``test_annotations`` (same format) with its matched sentence, or of the
last ``test_size`` documents when that is unset. ``train_pairs`` holds the training images paired the
same way (for frozen-transfer heads).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torchvision.transforms import v2

from vlpgraph.files import shards
from vlpgraph.files.annotations import Member
from vlpgraph.files.local import resolve_path, sha256_of
from vlpgraph.errors import UserError
from vlpgraph.files.documents import Document, drop_bad, read_documents
from vlpgraph.files.imagefiles import stats_fingerprint, to_rgb
from vlpgraph.engine.ports import INTERLEAVED, BuildContext, PairedData, collate_documents, default_collate
from vlpgraph.engine.registry import Params, register

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as dataset.captions
STD = (0.26862954, 0.26130258, 0.27577711)


class InterleavedParams(Params):
    annotations: str = Field(
        "", description="MMC4-style .jsonl, one document per line with 'text_list' and 'image_info' "
        "(a relative path is relative to the graph file's folder); set this or shards"
    )
    images: str = Field("", description="root folder of the image names (default: the annotations' folder; "
                        "a relative path is relative to the graph file's folder)")
    test_annotations: str | None = Field(
        None, description="MMC4-style .jsonl of the test documents, flattened into pairs (each image with its "
        "matched sentence); default: hold out the last test_size documents"
    )
    shards: str = Field(
        "", description="WebDataset .tar shards of documents instead of annotations + images, as `vlpgraph data "
        "pack` writes them from an MMC4-style .jsonl: a path or brace pattern (data/shard-{000000..000009}.tar; "
        "several joined by '::'), relative to the graph file's folder; read by index, so a resumed run replays "
        "the same batches"
    )
    test_shards: str = Field(
        "", description="shards of the test documents (default: hold out the last test_size documents of shards)"
    )
    test_size: int = Field(20, ge=1, description="documents held out for test when test_annotations / test_shards "
                           "is unset")
    max_images: int = Field(6, ge=1, le=64, description="most images per document: the first ones in reading "
                            "order are kept (LCL: 6)")
    image_first_p: float = Field(
        0.5, ge=0.0, le=1.0,
        description="probability that an image stands right before its matched sentence rather than after it (LCL: 0.5)",
    )
    data_seed: int = Field(0, ge=0, description="seed of the before/after draws (independent of the trial seed)")
    image_size: int = Field(224, ge=16, le=4096, description="side of the square images fed to the model")
    random_resized_crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="area range of the training random-resized crop"
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip in training")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="largest share of missing/unreadable images skipped (with a warning) before erroring",
    )
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="use the first ceil(f * N) training documents")

    def problems(self) -> list[tuple[str, str]]:
        out = []
        lo, hi = self.random_resized_crop_scale
        if not 0 < lo <= hi <= 1:
            out.append(("random_resized_crop_scale", f"must satisfy 0 < lo <= hi <= 1 (got [{lo}, {hi}])"))
        out += shards.source_problems(self, "an MMC4-style .jsonl and its images")
        return out


@dataclass
class Arranged:
    """A document in reading order: ``images`` (each image's file, or its shard member), ``texts``,
    ``layout`` (``ports.INTERLEAVED``) and ``matched`` (image j's matched sentence, "" when that sentence
    is empty)."""

    images: list[Path | Member]
    texts: list[str]
    layout: list[tuple[str, int]]
    matched: list[str]


def arrange(doc: Document, data_seed: int, image_first_p: float, max_images: int) -> Arranged:
    """A document's reading order, as ``ports.INTERLEAVED`` describes.

    Image i of the file's ``image_info`` stands right before its matched sentence when draw i of
    (data_seed, the document's line) is below ``image_first_p``, else right after it; several images of
    one sentence keep the file's order on each side. Only the first ``max_images`` images in reading
    order are kept; empty sentences are left out (an image matched to one keeps its place).
    """
    u = np.random.default_rng([data_seed, doc.line]).random(len(doc.images))
    sources = doc.sources()
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for i, (_, k) in enumerate(doc.images):
        (before if u[i] < image_first_p else after).setdefault(k, []).append(i)
    order: list[tuple[str, int]] = []  # ("text", sentence) / ("image", index into doc.images)
    for k in range(len(doc.texts)):
        order += [("image", i) for i in before.get(k, [])] + [("text", k)] + [("image", i) for i in after.get(k, [])]
    out = Arranged([], [], [], [])
    for what, i in order:
        if what == "image":
            if len(out.images) < max_images:
                out.layout.append(("image", len(out.images)))
                out.images.append(sources[i])
                out.matched.append(doc.texts[doc.images[i][1]])
        elif doc.texts[i]:
            out.layout.append(("text", len(out.texts)))
            out.texts.append(doc.texts[i])
    return out


# ----------------------------------------------------------------------------------------- datasets


def _load(source: Path | Member, transform) -> torch.Tensor:
    """An image file, or a shard member read in place, transformed."""
    with Image.open(io.BytesIO(source.read()) if isinstance(source, Member) else source) as im:
        return transform(to_rgb(im)).as_subclass(torch.Tensor)


class Documents(torch.utils.data.Dataset):
    """Document items (``ports.INTERLEAVED``); ``image_ids`` number the split's images in document order."""

    def __init__(self, docs: list[Document], p: InterleavedParams, transform):
        self.transform = transform
        self.docs = [arrange(d, p.data_seed, p.image_first_p, p.max_images) for d in docs]
        self.first_id = np.concatenate([[0], np.cumsum([len(d.images) for d in self.docs])]).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, d: int) -> dict:
        d = int(d)
        doc = self.docs[d]
        return {
            "images": torch.stack([_load(p, self.transform) for p in doc.images]),
            "texts": list(doc.texts),
            "layout": list(doc.layout),
            "sample_id": d,
            "image_ids": list(range(self.first_id[d], self.first_id[d] + len(doc.images))),
        }


class Pairs(torch.utils.data.Dataset):
    """Paired items (``image``, ``caption``, ``sample_id``): each image of the documents with the sentence
    it is matched to (images beyond ``max_images`` and empty sentences left out)."""

    def __init__(self, docs: list[Document], p: InterleavedParams, transform):
        self.transform = transform
        self.records: list[tuple[Path | Member, str]] = []
        for d in docs:
            a = arrange(d, p.data_seed, p.image_first_p, p.max_images)  # the same images the documents keep
            self.records += [(img, s) for img, s in zip(a.images, a.matched) if s]
        self.captions = [c for _, c in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        img, caption = self.records[int(i)]
        return {"image": _load(img, self.transform), "caption": caption, "sample_id": int(i)}


class InterleavedData(PairedData):
    """``train``: documents; ``train_pairs`` and ``test``: image + matched sentence pairs;
    ``test_documents``: the test documents as documents (evaluator.documents)."""

    def __init__(self, train: Documents, train_pairs: Pairs, test: Pairs, p: InterleavedParams,
                 test_documents: Documents | None = None):
        self.train, self.train_pairs, self.test = train, train_pairs, test
        self.test_documents = test_documents
        self.params = p
        self.capabilities = frozenset({INTERLEAVED})
        self.zeroshot = None
        self.image_size = p.image_size
        self.mean, self.std = MEAN, STD

    def train_captions(self) -> list[str]:
        return [t for d in self.train.docs for t in d.texts]

    def collate(self, items: list[dict]) -> dict:
        return collate_documents(items) if items and "layout" in items[0] else default_collate(items)


def transforms(p: InterleavedParams) -> tuple[v2.Transform, v2.Transform]:
    """(train, test) transforms, as dataset.captions's without boxes."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(p.image_size, scale=tuple(p.random_resized_crop_scale),
                                                           antialias=True), v2.RandomHorizontalFlip(p.hflip), *tail])
    test = v2.Compose([v2.ToImage(), v2.Resize(p.image_size, antialias=True), v2.CenterCrop(p.image_size), *tail])
    return train, test


# ------------------------------------------------------------------------ identity and static facts


def resolve_paths(p: InterleavedParams, base_dir: Path) -> tuple[Path, Path, Path | None]:
    """(annotations, images root, test annotations or None), relative to ``base_dir``."""
    ann = resolve_path(p.annotations, base_dir)
    root = resolve_path(p.images, base_dir) if p.images else ann.parent
    test = resolve_path(p.test_annotations, base_dir) if p.test_annotations else None
    return ann, root, test


@functools.lru_cache(maxsize=32)
def _parse_cached(path: str, size: int, mtime_ns: int, root: str) -> dict:
    out: dict = {"sha256": sha256_of(path)}
    try:
        docs = read_documents(Path(path), Path(root))
    except UserError:
        return out  # build reports it, with the reason
    out["documents"] = len(docs)
    out["images"] = list(dict.fromkeys(img for d in docs for img, _ in d.images))
    return out


def scan(ann: Path, root: Path) -> dict:
    """``sha256`` of the file and, when it parses, ``documents`` and ``images_sha256`` (a hash of the
    sorted (name, size, mtime) of the images it names; nothing is decoded), as dataset.captions's
    scan. ``{}`` for a missing file. The parse is memoised on the file's size and mtime."""
    try:
        st = ann.stat()
    except OSError:
        return {}
    if not ann.is_file():
        return {}
    out = dict(_parse_cached(str(ann), st.st_size, st.st_mtime_ns, str(root)))
    named = out.pop("images", None)
    if named is not None:
        out["images_sha256"] = stats_fingerprint(named, root)
        out["n_images"] = len(named)
    return out


def fingerprint(p: InterleavedParams, base_dir: Path) -> dict:
    """Part of the node's hash: the annotations' content hash, document count and a fingerprint of the
    images they name (and the same with ``test_`` for test_annotations); ``"missing"`` for an absent file.
    With ``shards``: ``shards`` (a fingerprint of the shard files' names, sizes and mtimes, so rewritten
    shards are new data) and ``n_shards``, and the same with ``test_``, as dataset.captions."""
    if p.shards:
        out = shards.fingerprint(p.shards, base_dir)
        if p.test_shards:
            out.update({f"test_{k}": v for k, v in shards.fingerprint(p.test_shards, base_dir).items()})
        return out
    ann, root, test = resolve_paths(p, base_dir)
    out = {}
    for prefix, path in (("", ann), ("test_", test)):
        if path is None:
            continue
        info = scan(path, root)
        out[f"{prefix}annotations"] = info.get("sha256", "missing")
        for key in ("documents", "images_sha256", "n_images"):
            if key in info:
                out[prefix + key] = info[key]
    return out


def facts(p: InterleavedParams, base_dir: Path) -> dict:
    """Upper bounds of the training documents (documents whose images are all unreadable are dropped at
    build, hence ``at_most``), counted from the .jsonl or the shards' tar headers (one sample per
    document); only image_size when they do not parse."""
    out: dict = {"image_size": p.image_size}
    if p.shards:
        try:
            n = shards.count_samples(shards.expand(p.shards, base_dir))
        except UserError:
            return out  # build reports it
        has_test = bool(p.test_shards)
    else:
        ann, root, test = resolve_paths(p, base_dir)
        n = scan(ann, root).get("documents")
        if n is None:
            return out
        has_test = test is not None
    n_train = n if has_test else max(0, n - p.test_size)
    out["train_size"] = max(0, math.ceil(round(p.train_fraction * n_train, 6)))
    out["at_most"] = True
    return out


@register("dataset.interleaved", params=InterleavedParams, output=PairedData, provides=frozenset({INTERLEAVED}),
          fingerprint=fingerprint, facts=facts)
def build(params: InterleavedParams, inputs: dict, ctx: BuildContext) -> PairedData:
    """Interleaved image-text documents from an MMC4-style .jsonl or its shards (capability ``interleaved``).

    One document per line: ``text_list`` (sentences) and ``image_info`` (``image_name`` relative to
    ``images``, ``matched_text_index`` into text_list). Each image stands right before its matched
    sentence with probability ``image_first_p`` (0.5, LCL's rule) and right after it otherwise, drawn from
    (``data_seed``, the line), so the context before an image sometimes describes it and sometimes not;
    the first ``max_images`` images in reading order are kept. Missing or unreadable images are skipped
    and counted as in dataset.captions (same ``max_bad_fraction``, same error past it); a document left
    without an image is dropped, with a warning that counts them. Training items: ``images`` [M,3,S,S]
    (random-resized crop and flip), ``texts``, ``layout``, ``sample_id``, ``image_ids``. The test split is
    paired and clean of placement: each image of ``test_annotations`` (MMC4-style .jsonl too) with its
    matched sentence, or of the last ``test_size`` documents when unset; items ``image`` (resized,
    center-cropped), ``caption``, ``sample_id``. ``train_pairs``: the training images paired the same way.
    ``train_fraction`` keeps the first ceil(f * N) training documents. The node's identity covers the
    files' content and the named images' sizes and mtimes.

    With ``shards`` (WebDataset .tar files that ``vlpgraph data pack`` writes from such a .jsonl; brace
    patterns, local paths) instead of ``annotations``, every document is streamed once at build
    (webdataset) and its images checked like a folder's (same warnings, same ``max_bad_fraction``);
    training then reads each image in place in its shard, by index. A packed document keeps its line in
    the .jsonl, so its images are placed as in the .jsonl, and the documents, splits and batches are
    those of the .jsonl and folder it was packed from. ``test_shards`` holds the test documents (default:
    held out as above). The node's identity then covers the shard files' names, sizes and mtimes.

    Deviation from LCL/MMC4: no filtering by the image-text similarity scores; the image is placed by
    its matched sentence only.
    """
    p = params

    def read(source: str, test: bool) -> tuple[list[Document], Path]:
        """Usable documents of the .jsonl or shards, and the path that names them in messages."""
        if p.shards:
            docs, problems, named = shards.read_shard_documents(source, ctx.base_dir)
        else:
            ann, root, test_ann = resolve_paths(p, ctx.base_dir)
            named, problems = (test_ann if test else ann), None  # None: drop_bad opens the files
            docs = read_documents(named, root)
        return drop_bad(docs, named, p.max_bad_fraction, ctx.log, problems), named

    docs, ann = read(p.shards or p.annotations, test=False)
    test_source = p.test_shards if p.shards else p.test_annotations
    test_ann = None
    if test_source:
        test_docs, test_ann = read(test_source, test=True)
        train_docs = docs
    else:
        if len(docs) <= p.test_size:
            raise UserError(f"{ann}: only {len(docs)} usable documents: test_size={p.test_size} leaves none for training")
        train_docs, test_docs = docs[: -p.test_size], docs[-p.test_size :]
    train_docs = train_docs[: max(1, math.ceil(round(p.train_fraction * len(train_docs), 6)))]
    train_tf, test_tf = transforms(p)
    test = Pairs(test_docs, p, test_tf)
    if not len(test):
        raise UserError(f"{test_ann or ann}: the test documents have no image with a non-empty matched sentence")
    return InterleavedData(Documents(train_docs, p, train_tf), Pairs(train_docs, p, train_tf), test, p,
                           test_documents=Documents(test_docs, p, test_tf))
