"""``dataset.captions``: real image-caption data from a COCO-captions JSON, a JSONL/CSV manifest, or
WebDataset shards.

Formats (chosen by the file's suffix):

- ``.json``: COCO captions, ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
  with ``boxes: true`` each annotation (or its image entry) carries ``"boxes"``.
- ``.jsonl``: one object per line with ``image``, ``caption`` and optionally ``boxes``.
- ``.csv``: columns ``image``, ``caption`` and optionally ``boxes`` (a JSON list).

Boxes are ``[[x0, y0, x1, y1], ...]`` in pixels of the original image. With ``label_column`` set, that
column (an annotation's or its image entry's key in COCO) holds each sample's class name (a string or an
integer; empty or absent: no label).

Shards (param ``shards``, e.g. ``data/shard-{000000..000009}.tar``) are plain ``.tar`` files that
``vlpgraph data pack`` writes from any of those formats (vlpgraph/files/shards.py): one sample per row, its
image's bytes, caption and row. They give the same samples, in the same order, as the folder they
were packed from (so the same sample ids, held-out split and batches), with bad images skipped and
counted the same way.

Relative paths in the params resolve against the graph file's folder. The node's identity covers
what it reads: a content hash of each annotations file and a fingerprint of the images they name
(relative path, size and modification time of each, no decoding), or the same fingerprint of the
shard files, so an edited manifest, replaced images or rewritten shards make a new trial rather
than a stale "already completed".
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import torch
from pydantic import Field
from torchvision import tv_tensors
from torchvision.transforms import v2

from vlpgraph.files import shards
# The reader is shared with dataset.unpaired's test split (vlpgraph/files/annotations.py); its names stay importable here.
from vlpgraph.files.annotations import Record, file_error, drop_bad_images, drop_empty_captions, read_annotations
from vlpgraph.files.local import resolve_path, sha256_of
from vlpgraph.errors import UserError
from vlpgraph.files.imagefiles import stats_fingerprint, to_rgb
from vlpgraph.engine.ports import BOXES, LABELS, PAIRED, BuildContext, PairedData
from vlpgraph.engine.registry import Params, register

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)


class CaptionsParams(Params):
    annotations: str = Field(
        "", description="COCO-captions .json, or a .jsonl/.csv manifest with 'image' and 'caption' columns "
        "(a relative path is relative to the graph file's folder); set this or shards"
    )
    images: str = Field("", description="root folder of relative image paths (default: the annotations' folder; "
                        "a relative path is relative to the graph file's folder)")
    test_annotations: str | None = Field(
        None, description="annotations of the test split (default: hold out the last test_size samples; "
        "a relative path is relative to the graph file's folder)"
    )
    shards: str = Field(
        "", description="WebDataset .tar shards instead of annotations + images, as `vlpgraph data pack` writes "
        "them: a path or brace pattern (data/shard-{000000..000009}.tar; several joined by '::'), relative "
        "to the graph file's folder; read by index, so a resumed run replays the same batches"
    )
    test_shards: str = Field(
        "", description="shards of the test split (default: hold out the last test_size samples of shards)"
    )
    test_size: int = Field(100, ge=1, description="samples held out for test when test_annotations / test_shards "
                           "is unset")
    image_size: int = Field(224, ge=16, le=4096, description="side of the square images fed to the model")
    random_resized_crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="area range of the training random-resized crop"
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip in training")
    boxes: bool = Field(False, description="the annotations have a 'boxes' column (provides the boxes capability)")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="largest share of missing/unreadable images, and of empty captions, skipped (with a "
        "warning) before erroring",
    )
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="use the first ceil(f * N) training samples")
    label_column: str | None = Field(
        None, description="column holding each sample's class name (provides the labels capability, for "
        "evaluator.linear_probe); samples without one get label -1; None: no labels"
    )

    def problems(self) -> list[tuple[str, str]]:
        out = []
        lo, hi = self.random_resized_crop_scale
        if not 0 < lo <= hi <= 1:
            out.append(("random_resized_crop_scale", f"must satisfy 0 < lo <= hi <= 1 (got [{lo}, {hi}])"))
        out += shards.source_problems(self, "a manifest and its images")
        return out


def hold_out_by_image(records: list[Record], test_size: int, path: Path) -> tuple[list[Record], list[Record]]:
    """The last images (in order of first appearance) until ``test_size`` samples are held out."""
    order = list(dict.fromkeys(r.image for r in records))
    test_images: set[Path] = set()
    held = 0
    per_image: dict[Path, int] = {}
    for r in records:
        per_image[r.image] = per_image.get(r.image, 0) + 1
    for img in reversed(order):
        if held >= test_size:
            break
        test_images.add(img)
        held += per_image[img]
    train = [r for r in records if r.image not in test_images]
    test = [r for r in records if r.image in test_images]
    if not train:
        raise file_error(path, f"only {len(records)} usable samples: test_size={test_size} leaves none for training")
    return train, test


# ----------------------------------------------------------------------------------------- datasets


class CaptionSplit(torch.utils.data.Dataset):
    """Items: ``image`` [3,S,S] normalised, ``caption``, ``sample_id`` (+ ``boxes`` [K,4] in pixels of
    ``image``, ``mentioned`` [K]: True for boxes still visible after the crop; + ``label``, the class
    index or -1, when ``labels`` is given: one per record, also kept as ``self.labels``)."""

    def __init__(self, records: list[Record], transform, boxes: bool, labels: list[int] | None = None):
        self.records = records
        self.transform = transform
        self.with_boxes = boxes
        self.captions = [r.caption for r in records]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = self._item(i)
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def _item(self, i: int) -> dict:
        r = self.records[i]
        with r.open_image() as im:  # an image file, or a shard member read in place
            image = to_rgb(im)
        if not self.with_boxes:
            img = self.transform(image)
            return {"image": img.as_subclass(torch.Tensor), "caption": r.caption, "sample_id": int(i)}
        bb = tv_tensors.BoundingBoxes(
            torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(image.height, image.width),
        )
        img, bb = self.transform(image, bb)
        boxes = bb.as_subclass(torch.Tensor).float()
        return {
            "image": img.as_subclass(torch.Tensor),
            "caption": r.caption,
            "sample_id": int(i),
            "boxes": boxes,
            "mentioned": (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]),
        }


class CaptionsData(PairedData):
    """``class_names`` (index -> name; empty without ``label_column``) name the items' ``label``."""

    def __init__(self, train: CaptionSplit, test: CaptionSplit, p: CaptionsParams, class_names: list[str]):
        self.train, self.test = train, test
        self.params = p
        self.capabilities = _provides(p)
        self.class_names = class_names
        self.zeroshot = None
        self.image_size = p.image_size
        self.mean, self.std = MEAN, STD

    def train_captions(self) -> list[str]:
        return list(self.train.captions)


def transforms(p: CaptionsParams) -> tuple[v2.Transform, v2.Transform]:
    """(train, test) transforms; v2 transforms move boxes along with the image."""
    tail = [v2.ClampBoundingBoxes(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(p.image_size, scale=tuple(p.random_resized_crop_scale), antialias=True),
            v2.RandomHorizontalFlip(p.hflip),
            *tail,
        ]
    )
    test = v2.Compose([v2.ToImage(), v2.Resize(p.image_size, antialias=True), v2.CenterCrop(p.image_size), *tail])
    return train, test


def _provides(p: CaptionsParams) -> frozenset[str]:
    return frozenset({PAIRED} | ({BOXES} if p.boxes else set()) | ({LABELS} if p.label_column else set()))


def class_indices(train: list[Record], test: list[Record], ann: Path,
                  column: str) -> tuple[list[str], list[int], list[int]]:
    """(class names sorted, train label indices, test label indices): the classes are the names found in
    the training split (-1 for a record without one), sorted by name, or by value when every name is an
    integer (so integer labels 0..K-1 keep their index); a test name unseen in training is an error (a
    classifier could never predict it), listing them."""
    found = {r.label for r in train if r.label is not None}
    numeric = all(name.lstrip("-").isdigit() for name in found)
    names = sorted(found, key=int) if numeric else sorted(found)
    if not names:
        raise file_error(ann, f"label_column '{column}': no training sample has a value in that column (is it named right?)")
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted({r.label for r in test if r.label is not None and r.label not in index})
    if unseen:
        shown = ", ".join(repr(u) for u in unseen[:10]) + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else "")
        raise file_error(ann, f"label_column '{column}': {len(unseen)} test label(s) never seen in training: {shown}")
    as_index = lambda records: [index[r.label] if r.label is not None else -1 for r in records]
    return names, as_index(train), as_index(test)


# ------------------------------------------------------------------------ identity and static facts


def resolve_paths(p: CaptionsParams, base_dir: Path) -> tuple[Path, Path, Path | None, Path | None]:
    """(annotations, its images root, test annotations or None, their images root): relative paths
    resolve against ``base_dir`` (the graph file's folder), the images roots default to the
    annotations' folders."""

    def resolve(path: str) -> Path:
        return resolve_path(path, base_dir)

    ann = resolve(p.annotations)
    root = resolve(p.images) if p.images else ann.parent
    test_ann = resolve(p.test_annotations) if p.test_annotations else None
    test_root = (resolve(p.images) if p.images else test_ann.parent) if test_ann else None
    return ann, root, test_ann, test_root


@functools.lru_cache(maxsize=32)
def _parse_cached(path: str, size: int, mtime_ns: int, root: str, boxes: bool) -> dict:
    ann = Path(path)
    out: dict = {"sha256": sha256_of(ann)}
    try:
        records = read_annotations(ann, Path(root), boxes)
    except UserError:
        return out  # build reports it, with the reason
    per_image = Counter(r.image for r in records)  # in order of first appearance
    out["rows"] = len(records)
    out["images"] = list(per_image)
    out["per_image"] = list(per_image.values())
    return out


def scan(ann: Path, root: Path, boxes: bool, images: bool = True) -> dict:
    """What one annotations file holds, without opening an image: ``sha256`` (its bytes) and, when
    it parses, ``rows``, ``per_image`` (captions per image, in order of first appearance) and
    ``images_sha256`` (a hash of the sorted (path relative to root, size, mtime) of the images it
    names; only with ``images``). ``{}`` for a missing file. The parse is memoised on the file's size
    and mtime (a sweep parses once); the images are stat'ed on every call.

    Cost measured on a shared 2-core machine, 100k rows (10 MB) naming 20k images: parse and hash
    ~0.9 s once, the 20k stat calls ~0.2 s per call.
    """
    try:
        st = ann.stat()
    except OSError:
        return {}
    if not ann.is_file():
        return {}
    out = dict(_parse_cached(str(ann), st.st_size, st.st_mtime_ns, str(root), boxes))
    named = out.pop("images", None)
    if images and named is not None:  # stat the images every time: one may be replaced while the manifest stays
        out["images_sha256"] = stats_fingerprint(named, root)
    return out


def fingerprint(p: CaptionsParams, base_dir: Path) -> dict:
    """Part of the node's hash: ``annotations`` (a content hash of the file), ``rows``, ``images``
    (a fingerprint of the images it names), ``n_images``, and the same with ``test_`` for
    ``test_annotations``; ``annotations: "missing"`` when the file is not there. The paths themselves are not in it, so the same files
    reached from another working directory are the same data. With ``shards``: ``shards`` (a fingerprint
    of the shard files' names, sizes and mtimes) and ``n_shards``, and the same with ``test_``."""
    if p.shards:
        out = shards.fingerprint(p.shards, base_dir)
        if p.test_shards:
            out.update({f"test_{k}": v for k, v in shards.fingerprint(p.test_shards, base_dir).items()})
        return out
    ann, root, test_ann, test_root = resolve_paths(p, base_dir)
    out = {}
    for prefix, path, r in (("", ann, root), ("test_", test_ann, test_root)):
        if path is None:
            continue
        info = scan(path, r, p.boxes)
        out[f"{prefix}annotations"] = info.get("sha256", "missing")
        if "rows" in info:
            out[f"{prefix}rows"] = info["rows"]
            out[f"{prefix}images"] = info["images_sha256"]
            out[f"{prefix}n_images"] = len(info["per_image"])
    return out


def facts(p: CaptionsParams, base_dir: Path) -> dict:
    """Upper bounds of the split sizes, counted from the annotations (images are not opened, and
    unreadable ones are dropped at build, hence ``at_most``); only image_size when they do not parse."""
    out: dict = {"image_size": p.image_size}
    if p.shards:
        return out | _shard_facts(p, base_dir)
    ann, root, test_ann, test_root = resolve_paths(p, base_dir)
    info = scan(ann, root, p.boxes, images=False)
    if "rows" not in info:
        return out
    if test_ann is not None:
        test_info = scan(test_ann, test_root, p.boxes, images=False)
        n_train = info["rows"]
        if "rows" in test_info:
            out["test_size"] = test_info["rows"]
    else:
        # hold_out_by_image on every row: dropping bad images only moves images from train to test,
        # and the held-out part stops growing once it reaches test_size (one image past it at most)
        held = 0
        for count in reversed(info["per_image"]):
            if held >= p.test_size:
                break
            held += count
        n_train = info["rows"] - held
        out["test_size"] = min(info["rows"], p.test_size + max(info["per_image"]) - 1)
    out["train_size"] = max(0, math.ceil(round(p.train_fraction * n_train, 6)))
    out["at_most"] = True
    return out


def _shard_facts(p: CaptionsParams, base_dir: Path) -> dict:
    """Upper bounds of the split sizes from the shards' tar headers (no sample is read): the test split
    holds at least min(test_size, rows) samples when it is held out, at most every row."""
    try:
        n = shards.count_samples(shards.expand(p.shards, base_dir))
        n_test = shards.count_samples(shards.expand(p.test_shards, base_dir)) if p.test_shards else None
    except UserError:
        return {}  # build reports it
    if n_test is None:
        n_test, n_train = n, n - min(p.test_size, n)
    else:
        n_train = n
    return {"train_size": max(0, math.ceil(round(p.train_fraction * n_train, 6))), "test_size": n_test,
            "at_most": True}


@register("dataset.captions", params=CaptionsParams, output=PairedData, provides=_provides,
          fingerprint=fingerprint, facts=facts)
def build(params: CaptionsParams, inputs: dict, ctx: BuildContext) -> PairedData:
    """Real image-caption pairs from a COCO-captions .json or a .jsonl/.csv manifest.

    Reads ``annotations`` (image path + caption per sample; with ``boxes: true`` also a ``boxes``
    column, [[x0,y0,x1,y1], ...] in original-image pixels); relative paths in the params resolve
    against the graph file's folder. Relative image paths resolve against ``images`` (default: the
    annotations' folder). Missing or unreadable images, and empty captions, are skipped with a
    warning; more than ``max_bad_fraction`` of either is an error. Images of any mode keep their
    range (16-bit PNGs are scaled to 8 bit, not clipped; transparency is composited onto white).
    The node's identity covers the annotations' content and the named images' sizes and mtimes, so
    editing the data trains again. The test split is
    ``test_annotations`` or else the last ``test_size`` samples, held out by image. Training items get
    a random-resized crop and horizontal flip (boxes follow); test items are resized and center-cropped
    to ``image_size``. Items: ``image`` [3,S,S] normalised with CLIP's mean/std, ``caption``,
    ``sample_id`` (+ ``boxes`` [K,4], ``mentioned`` [K]). ``train_fraction`` keeps the first
    ceil(f * N) training samples. With ``label_column`` (capability ``labels``, for
    evaluator.linear_probe) items also carry ``label``: that column's class name (a string or an
    integer) as an index into ``class_names``, the names found in the whole training split sorted
    (by value when all are integers; every train_fraction shares them), -1 where a sample has none; a test label never seen in
    training is an error that lists them. The column's content is covered by the annotations' hash.

    With ``shards`` (WebDataset .tar files from ``vlpgraph data pack``; brace patterns, local paths)
    instead of ``annotations``, every sample is streamed once at build (webdataset) and checked like a
    folder's (same warnings, same ``max_bad_fraction``); training then reads the images in place by
    index, so the samples, sample ids, test split and batches are those of the packed folder, and a
    run resumed from a checkpoint replays the batches of an uninterrupted one (the trainer's data
    position is its step). ``test_shards`` is the test split (default: held out as above).
    """
    p = params

    def read(source: str, test: bool) -> tuple[list[Record], Path]:
        """Usable records of the annotations file or shards, and the path that names them in messages."""
        if p.shards:
            records, problems, named = shards.read_records(source, ctx.base_dir, p.boxes, p.label_column)
        else:
            ann, root, test_ann, test_root = resolve_paths(p, ctx.base_dir)
            named, problems = (test_ann if test else ann), None  # None: drop_bad_images opens the files
            records = read_annotations(named, test_root if test else root, p.boxes, p.label_column)
        records = drop_empty_captions(records, named, p.max_bad_fraction, ctx.log)
        if problems:  # a shard's images were checked as they streamed past: those of the records kept
            kept = {r.image for r in records}
            problems = {img: why for img, why in problems.items() if img in kept}
        return drop_bad_images(records, named, p.max_bad_fraction, ctx.log, problems), named

    records, ann = read(p.shards or p.annotations, test=False)
    test_source = p.test_shards if p.shards else p.test_annotations
    if test_source:
        test_records, _ = read(test_source, test=True)
        train_records = records
    else:
        train_records, test_records = hold_out_by_image(records, params.test_size, ann)
    n_train = max(1, math.ceil(round(params.train_fraction * len(train_records), 6)))
    train_tf, test_tf = transforms(params)
    names, train_labels, test_labels = [], None, None
    if params.label_column:  # classes from the whole training split, so every train_fraction shares them
        names, train_labels, test_labels = class_indices(train_records, test_records, ann, params.label_column)
        train_labels = train_labels[:n_train]
    train = CaptionSplit(train_records[:n_train], train_tf, params.boxes, train_labels)
    test = CaptionSplit(test_records, test_tf, params.boxes, test_labels)
    return CaptionsData(train, test, params, names)
