"""``dataset.unpaired``: real unpaired corpora (VLMixer): an image corpus, a text corpus and a concept gallery.

- ``images``: a folder (every image file under it, recursively, in sorted path order) or a ``.txt`` list
  (one image path per line, relative to the list's folder). Missing or unreadable images are skipped and
  counted as in dataset.captions (``max_bad_fraction``, same warning, same error past it).
- ``texts``: a ``.txt`` file, one sentence per line (whitespace-normalised; blank lines are not sentences).
- ``instances`` (optional): a COCO instances ``.json`` (``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``category_id``/``bbox`` [x, y, w, h], ``categories`` with
  ``id``/``name``): each box of an image-corpus image becomes a region of its category's concept (the
  category name); it provides the ``gallery`` capability.
- ``test_annotations``: a paired COCO-captions ``.json`` (or ``.jsonl``/``.csv`` manifest) read as
  dataset.captions reads it (vlpgraph/files/annotations.py): the test split every evaluator uses.

Relative paths resolve against the graph file's folder. The node's identity covers the files' content and
the named images' sizes and mtimes, as dataset.captions's.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torchvision.transforms import v2

from vlpgraph.files.annotations import Record, drop_bad_images, drop_empty_captions, read_annotations
from vlpgraph.files.local import resolve_path, sha256_of
from vlpgraph.errors import UserError
from vlpgraph.files.gallery import BoxGallery
from vlpgraph.files.imagefiles import bad_images, stats_fingerprint, to_rgb
from vlpgraph.engine.ports import GALLERY, UNPAIRED, BuildContext, PairedData, collate_unpaired, default_collate
from vlpgraph.engine.registry import Params, register

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as dataset.captions
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UnpairedParams(Params):
    images: str = Field(description="the image corpus: a folder (every image file under it) or a .txt list of "
                        "image paths, one per line, relative to the list's folder (a relative path is relative to "
                        "the graph file's folder)")
    texts: str = Field(description="the text corpus: a .txt file, one sentence per line (a relative path is "
                       "relative to the graph file's folder)")
    test_annotations: str = Field(description="the paired test split: COCO-captions .json or a .jsonl/.csv "
                                  "manifest, as dataset.captions reads it (a relative path is relative to the "
                                  "graph file's folder)")
    test_images: str = Field("", description="root folder of the test annotations' image paths (default: the "
                             "test annotations' folder)")
    instances: str | None = Field(None, description="COCO instances .json whose boxes on image-corpus images make "
                                  "the concept gallery (concept = category name); None: no gallery")
    min_box_size: float = Field(8.0, ge=0.0, description="gallery: boxes narrower or lower than this (pixels of "
                                "the original image) are left out; crowd boxes (iscrowd) always are")
    region_size: int | None = Field(None, ge=8, le=4096, description="side of a gallery region (its box crop "
                                    "resized to region_size x region_size); None: image_size")
    image_size: int = Field(224, ge=16, le=4096, description="side of the square images fed to the model")
    random_resized_crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="area range of the training random-resized crop"
    )
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip in training")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="largest share of missing/unreadable images (of each file that names images), and of empty "
        "test captions, skipped (with a warning) before erroring",
    )
    train_fraction: float = Field(1.0, gt=0.0, le=1.0, description="use the first ceil(f * N) images and the "
                                  "first ceil(f * M) sentences")

    def problems(self) -> list[tuple[str, str]]:
        lo, hi = self.random_resized_crop_scale
        if not 0 < lo <= hi <= 1:
            return [("random_resized_crop_scale", f"must satisfy 0 < lo <= hi <= 1 (got [{lo}, {hi}])")]
        return []


# ------------------------------------------------------------------------------------------ reading


def list_images(source: Path) -> list[Path]:
    """The image corpus's paths: a folder's image files (recursively, sorted) or a .txt list's lines."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not source.is_file():
        raise UserError(f"{source}: image folder or list file not found")
    if source.suffix.lower() != ".txt":
        raise UserError(f"{source}: expected an image folder or a .txt list of image paths (got '{source.suffix}')")
    names = [ln.strip() for ln in source.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    return [Path(n) if Path(n).is_absolute() else source.parent / n for n in names]


def read_texts(path: Path) -> list[str]:
    """The text corpus: one whitespace-normalised sentence per non-blank line."""
    if not path.is_file():
        raise UserError(f"{path}: text file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return [" ".join(ln.split()) for ln in lines if ln.strip()]


def read_instances(path: Path, root: Path, min_box_size: float) -> tuple[list[str], list[tuple[Path, int, list[float]]]]:
    """(category names in id order, [(image path, category index, [x0, y0, x1, y1])]) of a COCO instances
    file; crowd boxes and boxes smaller than ``min_box_size`` on either side are left out."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: instances file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"{path}: not a COCO instances file (expected 'images', 'annotations' and 'categories' lists)")
    try:
        cats = sorted((c["id"], " ".join(str(c["name"]).split())) for c in data["categories"])
        files = {im["id"]: im["file_name"] for im in data["images"]}
    except (KeyError, TypeError):
        raise UserError(f"{path}: every category needs 'id' and 'name', every image 'id' and 'file_name'") from None
    index = {cid: k for k, (cid, _) in enumerate(cats)}
    boxes = []
    for n, a in enumerate(data["annotations"]):
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            image, cat = files[a["image_id"]], index[a["category_id"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: annotation {n}: needs 'image_id' and 'category_id' listed in the file and "
                            "'bbox' [x, y, w, h]") from None
        if a.get("iscrowd") or w < max(min_box_size, 1e-6) or h < max(min_box_size, 1e-6):
            continue
        p = Path(image)
        boxes.append((p if p.is_absolute() else root / p, cat, [x, y, x + w, y + h]))
    return [name for _, name in cats], boxes


# ----------------------------------------------------------------------------------------- datasets


def _load(path: Path, transform) -> torch.Tensor:
    with Image.open(path) as im:
        return transform(to_rgb(im)).as_subclass(torch.Tensor)


class UnpairedStream(torch.utils.data.Dataset):
    """The unpaired training stream (items: see ``ports.UNPAIRED``): item k is image k mod N of the image
    corpus and sentence k mod M of the text corpus (max(N, M) items, so an epoch sees every image and
    every sentence; the shorter corpus repeats). ``image_id``: the image's index in ``paths``; ``text_id``:
    the sentence's index in ``texts``."""

    def __init__(self, paths: list[Path], texts: list[str], transform):
        self.paths, self.texts, self.transform = paths, texts, transform

    def __len__(self) -> int:
        return max(len(self.paths), len(self.texts))

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"item {k} out of range 0..{len(self) - 1}")
        i, j = k % len(self.paths), k % len(self.texts)
        return {"image": _load(self.paths[i], self.transform), "image_id": i, "caption": self.texts[j],
                "text_id": j, "sample_id": k}


class PairSplit(torch.utils.data.Dataset):
    """Paired items (``image``, ``caption``, ``sample_id``) of annotation records."""

    def __init__(self, records: list[Record], transform):
        self.records, self.transform = records, transform
        self.captions = [r.caption for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[int(i)]
        return {"image": _load(r.image, self.transform), "caption": r.caption, "sample_id": int(i)}


class UnpairedData(PairedData):
    """``train``: the unpaired stream; ``test``: pairs; ``gallery`` (with ``instances``): regions of the image
    corpus's boxes. No training pairs exist, so :meth:`paired_train` refuses (frozen-transfer heads)."""

    def __init__(self, train: UnpairedStream, test: PairSplit, gallery: BoxGallery | None, p: UnpairedParams):
        self.train, self.test, self.gallery = train, test, gallery
        self.params = p
        self.capabilities = _provides(p)
        self.zeroshot = None
        self.image_size = p.image_size
        self.mean, self.std = MEAN, STD

    def train_captions(self) -> list[str]:
        return list(self.train.texts)

    def collate(self, items: list[dict]) -> dict:
        return collate_unpaired(items) if items and "text_id" in items[0] else default_collate(items)

    def paired_train(self):
        raise UserError("dataset.unpaired has no image-caption pairs for training (its corpora are unpaired): an "
                        "evaluator that trains a head on training pairs (linear_probe, transfer_retrieval, "
                        "captioning) cannot run on it; evaluate with the test split's evaluators (e.g. retrieval)")


def transforms(p: UnpairedParams) -> tuple[v2.Transform, v2.Transform]:
    """(train, test) transforms, as dataset.captions's without boxes."""
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(p.image_size, scale=tuple(p.random_resized_crop_scale),
                                                           antialias=True), v2.RandomHorizontalFlip(p.hflip), *tail])
    test = v2.Compose([v2.ToImage(), v2.Resize(p.image_size, antialias=True), v2.CenterCrop(p.image_size), *tail])
    return train, test


def build_gallery(p: UnpairedParams, instances: Path, root: Path, corpus: list[Path], log) -> BoxGallery:
    """Regions of the instances' boxes (file names relative to ``root``) that lie on images of ``corpus``
    (others are left out, with a warning); the corpus holds only readable images."""
    names, boxes = read_instances(instances, root, p.min_box_size)
    index = {path: i for i, path in enumerate(corpus)}
    kept = [(index[img], cat, box) for img, cat, box in boxes if img in index]
    if len(kept) < len(boxes):
        log(f"warning: {instances}: left out {len(boxes) - len(kept)} of {len(boxes)} boxes whose image is not a "
            "readable image of the image corpus (the gallery is cut from the image corpus only)")
    if not kept:
        raise UserError(f"{instances}: no box lies on a readable image of the image corpus")

    return BoxGallery(names, [c for _, c, _ in kept], [i for i, _, _ in kept], np.array([b for _, _, b in kept]),
                      CorpusImages(corpus), MEAN, STD, p.region_size or p.image_size)


class CorpusImages:
    """``load(image_id) -> uint8 [H, W, 3]``: the corpus image, decoded in full (a gallery's boxes are in
    original pixels); the last ``keep`` decoded images are kept, as a gallery often cuts several regions of
    one image. A plain object, so a data object holding it pickles (DataLoader workers)."""

    def __init__(self, paths: list[Path], keep: int = 32):
        self.paths, self.keep = paths, keep
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, i: int) -> np.ndarray:
        if i not in self._recent:
            with Image.open(self.paths[i]) as im:
                self._recent[i] = np.asarray(to_rgb(im))
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        self._recent.move_to_end(i)
        return self._recent[i]


# ------------------------------------------------------------------------ identity and static facts


def corpus_root(p: UnpairedParams, base_dir: Path) -> Path:
    """The folder the instances' file names are relative to: the image folder, or the list file's folder."""
    source = resolve_path(p.images, base_dir)
    return source if source.is_dir() else source.parent


def resolve_paths(p: UnpairedParams, base_dir: Path) -> dict[str, Path | None]:
    test = resolve_path(p.test_annotations, base_dir)
    return {
        "images": resolve_path(p.images, base_dir),
        "texts": resolve_path(p.texts, base_dir),
        "instances": resolve_path(p.instances, base_dir) if p.instances else None,
        "test_annotations": test,
        "test_images": resolve_path(p.test_images, base_dir) if p.test_images else test.parent,
    }


def fingerprint(p: UnpairedParams, base_dir: Path) -> dict:
    """Part of the node's hash: each file's content hash (``"missing"`` when absent) and a fingerprint of the
    images the corpus and the test annotations name (path, size, mtime; nothing is decoded)."""
    paths = resolve_paths(p, base_dir)
    out: dict = {}
    for key in ("texts", "instances", "test_annotations"):
        if paths[key] is not None:
            out[key] = sha256_of(paths[key]) if paths[key].is_file() else "missing"
    try:
        corpus = list_images(paths["images"])
        out["images"] = stats_fingerprint(corpus, corpus_root(p, base_dir))
        if paths["images"].is_file():
            out["image_list"] = sha256_of(paths["images"])
        test = read_annotations(paths["test_annotations"], paths["test_images"], False)
        out["test_images"] = stats_fingerprint(dict.fromkeys(r.image for r in test), paths["test_images"])
    except UserError:
        pass  # build reports it, with the reason
    return out


def facts(p: UnpairedParams, base_dir: Path) -> dict:
    """An upper bound of the training items (max of the corpora's sizes after train_fraction; unreadable
    images are dropped at build, hence ``at_most``); only image_size when a file does not read."""
    out: dict = {"image_size": p.image_size}
    paths = resolve_paths(p, base_dir)
    try:
        n_img, n_txt = len(list_images(paths["images"])), len(read_texts(paths["texts"]))
    except UserError:
        return out
    f = p.train_fraction
    out["train_size"] = max(math.ceil(round(f * n_img, 6)), math.ceil(round(f * n_txt, 6)))
    out["at_most"] = True
    return out


def _provides(p: UnpairedParams) -> frozenset[str]:
    return frozenset({UNPAIRED} | ({GALLERY} if p.instances else set()))


@register("dataset.unpaired", params=UnpairedParams, output=PairedData, provides=_provides,
          fingerprint=fingerprint, facts=facts)
def build(params: UnpairedParams, inputs: dict, ctx: BuildContext) -> PairedData:
    """Real unpaired corpora (VLMixer): an image corpus, a text corpus, a concept gallery; a paired test split.

    ``images``: a folder (every image file under it, sorted) or a .txt list of paths; ``texts``: one sentence
    per line. Missing or unreadable images are skipped and counted as in dataset.captions (same warning,
    same ``max_bad_fraction`` error past it). Training items (capability ``unpaired``): item k is image
    k mod N (random-resized crop and flip) with sentence k mod M: max(N, M) items an epoch, the shorter
    corpus repeating; ``image``, ``image_id``, ``caption``, ``text_id``, ``sample_id``; nothing pairs an
    image with a sentence. ``train_fraction`` keeps the first ceil(f * N) images and ceil(f * M)
    sentences. With ``instances`` (a COCO instances .json; capability ``gallery``): every box of an
    image-corpus image (not crowd, both sides >= min_box_size) is a region of its category's name; a
    region is the box cropped from the original image, resized to region_size (default image_size) and
    normalised like the images; boxes on other images are left out with a warning. ``test_annotations``:
    the paired test split (COCO-captions or a manifest, read as dataset.captions reads it; resized and
    center-cropped). Deviation from VLMixer: the gallery comes from given boxes, not from a detector's
    tags. There are no training pairs: evaluators that train a head on them refuse (use retrieval-style
    evaluators on the test split).
    """
    p = params
    paths = resolve_paths(p, ctx.base_dir)
    corpus = list_images(paths["images"])
    if not corpus:
        raise UserError(f"{paths['images']}: no image files")
    bad = bad_images(corpus, paths["images"], p.max_bad_fraction, ctx.log)
    corpus = [img for img in corpus if img not in bad]
    texts = read_texts(paths["texts"])
    if not texts:
        raise UserError(f"{paths['texts']}: no sentences")
    corpus = corpus[: max(1, math.ceil(round(p.train_fraction * len(corpus), 6)))]
    texts = texts[: max(1, math.ceil(round(p.train_fraction * len(texts), 6)))]
    test = read_annotations(paths["test_annotations"], paths["test_images"], False)
    test = drop_empty_captions(test, paths["test_annotations"], p.max_bad_fraction, ctx.log)
    test = drop_bad_images(test, paths["test_annotations"], p.max_bad_fraction, ctx.log)
    gallery = (build_gallery(p, paths["instances"], corpus_root(p, ctx.base_dir), corpus, ctx.log)
               if paths["instances"] else None)
    train_tf, test_tf = transforms(p)
    return UnpairedData(UnpairedStream(corpus, texts, train_tf), PairSplit(test, test_tf), gallery, p)
