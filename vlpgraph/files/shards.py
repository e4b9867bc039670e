"""WebDataset shards: writing them (``vlpgraph data pack``) and reading them (``dataset.captions`` and
``dataset.interleaved`` with ``shards``).

A shard is a plain ``.tar`` file in the WebDataset layout: the files of one sample share a key (the
name up to the first dot), here ``KEY.png`` (or ``.jpg``, ...: the image's bytes as they were on
disk), ``KEY.txt`` (the caption, for other WebDataset tools) and ``KEY.json`` (the whole manifest
row: ``image`` (the image's original name), ``caption``, and every other column, e.g. ``boxes`` or a
label). Shards written by other tools (e.g. img2dataset: ``jpg`` + ``txt`` + ``json``) read as well:
the caption is the JSON's ``caption`` or else the ``.txt``, the image's name the JSON's ``image`` or
else the key. MMC4-style interleaved documents (dataset.interleaved's .jsonl) pack into one sample per
document: ``KEY.json`` (the document as it was: ``text_list``, ``image_info``, ...), its images
``KEY.0.jpg``, ``KEY.1.png``, ... in ``image_info``'s order, and ``KEY.line`` (the document's line in
the .jsonl, from which dataset.interleaved draws its image placement, so that shards and the .jsonl
place every image alike even when the file has blank lines); ``read_document_samples`` reads them.

Reading takes two passes over the local shards, both at build: the ``webdataset`` library streams
every sample (captions or documents, metadata, and every image checked by PIL, as a folder's images
are checked), and the tar headers give each image member's offset, so that training then reads any
image by index without unpacking anything. Index access is what the trainer needs: its batches are
index permutations per (seed, epoch) (train.EpochBatches), so a run resumed at step s from its
checkpoint replays exactly the batches of an uninterrupted run, and shards give the same batches as
the folder they were packed from.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from vlpgraph.files.documents import Document, parse_document, read_documents
from vlpgraph.files.annotations import Member, Record, raw_rows, read_annotations, records_from_rows
from vlpgraph.files.local import resolve_path
from vlpgraph.errors import UserError
from vlpgraph.files.imagefiles import image_problem, stats_fingerprint

# member extensions taken as a sample's image, in this order of preference
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
SHARD_NAME = "shard-%06d.tar"


# ------------------------------------------------------------------------------------------ reading


def expand(pattern: str, base_dir: Path | None) -> list[Path]:
    """The shard files of ``pattern`` (brace patterns like ``data/shard-{000000..000009}.tar``, several
    joined by ``::``, as webdataset expands them), relative ones resolved against ``base_dir`` (the
    graph file's folder). UserError when one is missing or is not a ``.tar``."""
    paths = [resolve_path(url, base_dir) for url in expand_urls(pattern)]
    if not paths:
        raise UserError(f"shards '{pattern}': the pattern names no file")
    not_tar = [p for p in paths if p.suffix.lower() != ".tar"]
    if not_tar:
        raise UserError(f"shards '{pattern}': {not_tar[0]} is not a .tar file (shards are plain .tar files; "
                        "`vlpgraph data pack` writes them)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"shards '{pattern}': {len(missing)} of {len(paths)} shard file(s) not found: {shown}")
    return paths


def members(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """{(sample key, extension): (offset, size)} of every file in the plain tar ``path``, from its
    headers only; memoised on the file's size and mtime (validation and build both ask)."""
    st = path.stat()
    return _members(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _members(path: str, size: int, mtime_ns: int) -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so that members can be read in place
            for info in tar:
                if info.isreg():
                    key, ext = base_plus_ext(info.name)
                    if key is not None:
                        out[(key, ext.lower())] = (info.offset_data, info.size)
            end = tar.offset  # where the end-of-archive marker (zero blocks) starts
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path}: not a readable plain .tar shard ({e})") from None
    # a file cut short (an interrupted copy or download) reads as a shorter archive without its marker:
    # said here, since its lost samples would otherwise just be missing
    if size - end < tarfile.BLOCKSIZE:
        raise UserError(f"{path}: truncated shard (it ends without the end-of-archive marker, {size} bytes): "
                        "copy or pack it again")
    return out


def count_samples(paths: Iterable[Path]) -> int:
    """Samples (distinct keys) in the shards, from their headers."""
    return sum(len({key for key, _ in members(p)}) for p in paths)


def _stream(paths: list[Path], source: Path) -> Iterator[tuple[dict, str, dict, Path]]:
    """(sample, where (``shard-000000.tar sample KEY``, for messages), its shard's member index, the
    shard) for every sample of ``paths`` in order, streamed by ``webdataset``; UserError for a key seen
    twice in one shard or a shard that does not read."""
    for path in paths:
        index = members(path)
        keys: set[str] = set()  # a key twice in one shard would make its index entry ambiguous
        stream = wds.WebDataset([str(path)], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                empty_check=False)
        try:
            for sample in stream:
                key = sample["__key__"]
                where = f"{path.name} sample {key}"
                if key in keys:
                    raise UserError(f"{source}: {where}: the key appears twice in the shard (its files must "
                                    "be consecutive: a sample is the run of files sharing a key)")
                keys.add(key)
                yield sample, where, index, path
        except (tarfile.TarError, ValueError, OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable WebDataset shard ({type(e).__name__}: {e})") from None


def _row(sample: dict, source: Path, where: str) -> dict:
    """The sample's ``.json`` member as a dict (``{}`` when it has none)."""
    row = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(row, dict):
        raise UserError(f"{source}: {where}: its .json member is not a JSON object")
    return row


def read_records(pattern: str, base_dir: Path | None, want_boxes: bool,
                 label_column: str | None) -> tuple[list[Record], dict[Path, str], Path]:
    """(records in shard order, {image name: why} for the missing or unreadable images, the pattern
    resolved, which names the data in messages). Each record's ``image`` is the sample's image name
    (not a file: its bytes are the record's ``member``); a bad image is found here, as the samples
    stream past, and is skipped by ``annotations.drop_bad_images`` with the same wording as a folder's."""
    source = resolve_path(pattern, base_dir)
    rows: list[tuple] = []
    found: list[Member | None] = []
    problems: dict[Path, str] = {}
    paths = expand(pattern, base_dir)
    for sample, where, index, path in _stream(paths, source):
        row = _row(sample, source, where)
        caption = row.get("caption")
        if not isinstance(caption, str):  # shards of other tools: the caption may be in .txt only
            caption = sample["txt"].decode("utf-8") if "txt" in sample else None
        if caption is None:
            raise UserError(f"{source}: {where}: no caption (no 'caption' in its .json, no .txt member)")
        if want_boxes and "boxes" not in row:
            raise UserError(f"{source}: {where}: no 'boxes' in its .json (set boxes: false, or pack a "
                            "manifest with a boxes column)")
        name = str(row.get("image") or sample["__key__"])
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        why = image_problem(io.BytesIO(sample[ext]) if ext else None)
        if why:
            problems.setdefault(Path(name), why)
        rows.append((name, caption, row.get("boxes"), where, row.get(label_column) if label_column else None))
        found.append(Member(str(path), *index[(sample["__key__"], ext)]) if ext else None)
    if not rows:
        raise UserError(f"{source}: no samples in {len(paths)} shard(s)")
    return records_from_rows(rows, source, None, want_boxes, label_column, found), problems, source


@dataclass
class DocumentSample:
    """One interleaved document read from shards, as ``dataset.interleaved`` parses it: ``row`` (the
    document's JSON: ``text_list``, ``image_info``, ...), ``line`` (its line in the .jsonl it was packed
    from, which ``pack`` records in a ``KEY.line`` member; for shards without one, the document's
    1-based position in the shards, which is its line in a .jsonl without blank lines), ``where`` (for
    messages), ``images`` (image_info[i]'s bytes in the shard, None when the sample has no member
    ``KEY.i.<ext>``) and ``problems`` (why each image is missing or unreadable, None when it opens)."""

    row: dict
    line: int
    where: str
    images: list[Member | None]
    problems: list[str | None]


def read_document_samples(pattern: str, base_dir: Path | None) -> tuple[list[DocumentSample], Path]:
    """(the interleaved documents of the shards in order, the pattern resolved, which names them in
    messages). Every image member is checked by PIL as the samples stream past (nothing is decoded
    afterwards until training reads it, by index, through its ``Member``); the rows are not parsed here
    (dataset.interleaved parses them as it parses its .jsonl lines). UserError for an unreadable shard,
    a sample without a JSON object or shards without samples."""
    source = resolve_path(pattern, base_dir)
    paths = expand(pattern, base_dir)
    docs: list[DocumentSample] = []
    for sample, where, index, path in _stream(paths, source):
        if "json" not in sample:
            raise UserError(f"{source}: {where}: no .json member (an interleaved document is packed as KEY.json "
                            "with its images KEY.0.jpg, KEY.1.png, ...)")
        row = _row(sample, source, where)
        try:
            line = int(sample["line"]) if "line" in sample else len(docs) + 1
        except ValueError:
            raise UserError(f"{source}: {where}: its .line member is not a line number") from None
        info = row.get("image_info")
        images: list[Member | None] = []
        problems: list[str | None] = []
        for i in range(len(info) if isinstance(info, list) else 0):
            ext = next((f"{i}.{e}" for e in IMAGE_EXTS if f"{i}.{e}" in sample), None)
            problems.append(image_problem(io.BytesIO(sample[ext]) if ext else None))
            images.append(Member(str(path), *index[(sample["__key__"], ext)]) if ext else None)
        docs.append(DocumentSample(row, line, where, images, problems))
    if not docs:
        raise UserError(f"{source}: no samples in {len(paths)} shard(s)")
    return docs, source


def read_shard_documents(pattern: str, base_dir: Path) -> tuple[list[Document], dict[Path, str], Path]:
    """(the documents of WebDataset shards, {image name: why} for their missing or unreadable images,
    the pattern resolved, which names them in messages), read by :func:`vlpgraph.files.read_document_samples`
    (images checked as they stream past) and parsed as .jsonl lines are. Each image is its name in
    ``image_info`` (which names it in messages, as a folder's file name does), read from its member."""
    samples, source = read_document_samples(pattern, base_dir)
    docs, problems = [], {}
    for s in samples:
        texts, images = parse_document(s.row, f"{source}: {s.where}", None)
        for (img, _), why in zip(images, s.problems):
            if why:
                problems.setdefault(img, why)
        docs.append(Document(texts, images, s.line, members=s.images, where=s.where))
    return docs, problems, source


def source_problems(p, annotations_are: str) -> list[tuple[str, str]]:
    """The param problems of a reader with a folder source (``annotations``, ``images``,
    ``test_annotations``) or a shard source (``shards``, ``test_shards``): exactly one source, and no
    param of the other one (a shard holds its images and rows: the folder params mean nothing with it).
    ``annotations_are`` says what the annotations file is, for the message."""
    out = []
    if bool(p.annotations) == bool(p.shards):
        out.append(("annotations", f"set either annotations ({annotations_are}) or shards (WebDataset .tar "
                    "files), not " + ("both" if p.shards else "neither")))
    if p.shards:
        out += [(name, "is for annotations; with shards use test_shards for the test split")
                for name in ("images", "test_annotations") if getattr(p, name)]
    elif p.test_shards:
        out.append(("test_shards", "needs shards (with annotations, use test_annotations)"))
    return out


def fingerprint(pattern: str, base_dir: Path | None) -> dict:
    """Part of a data node's hash: ``shards`` (a hash of each shard's name, size and mtime, like
    imagefiles.stats_fingerprint for image files: a rewritten shard is new data) and ``n_shards``;
    ``shards: "missing"`` when the pattern's files are not all there (build says which)."""
    try:
        paths = expand(pattern, base_dir)
    except UserError:
        return {"shards": "missing"}
    return {"shards": stats_fingerprint(paths, paths[0].parent), "n_shards": len(paths)}


# ------------------------------------------------------------------------------------------ writing


@dataclass
class Packed:
    out: Path
    samples: int
    shards: int
    missing: int  # image files that were not there (left out of their samples)

    @property
    def pattern(self) -> str:
        """The pattern naming every shard written, for the ``shards`` param of dataset.captions (or
        dataset.interleaved, for documents)."""
        numbers = "000000" if self.shards == 1 else f"{{000000..{self.shards - 1:06d}}}"
        return str(self.out.resolve() / f"shard-{numbers}.tar")


def is_documents(source: Path) -> bool:
    """True for an MMC4-style .jsonl of interleaved documents (dataset.interleaved's input): its first
    object has ``text_list`` and ``image_info``."""
    if source.suffix.lower() != ".jsonl" or not source.is_file():
        return False
    with open(source, encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "text_list" in obj and "image_info" in obj


def _samples(source: Path, root: Path) -> list[tuple[dict, str | None, list[tuple[str, Path]], int | None]]:
    """(row, caption or None, [(member extension prefix, image file)], line or None) per sample of
    ``source``, checked by the reader of its kind (UserError for a bad file): an annotations row is one
    sample with one image; an interleaved document is one sample whose images are members ``KEY.0.jpg``,
    ``KEY.1.png``, ... (its sentences are in the row's ``text_list``) and whose line in the .jsonl is
    kept (dataset.interleaved draws each document's image placement from it)."""
    if is_documents(source):
        docs = read_documents(source, root)
        lines = source.read_text(encoding="utf-8-sig").splitlines()  # as read_documents numbers them
        return [(json.loads(lines[doc.line - 1]), None, [(f"{i}.", path) for i, (path, _) in enumerate(doc.images)],
                 doc.line) for doc in docs]
    records = read_annotations(source, root, want_boxes=False)
    return [(row, r.caption, [("", r.image)], None) for row, r in zip(raw_rows(source), records)]


def pack(source: Path, out: Path, shard_size: int = 10_000, images: Path | None = None,
         log: Callable[[str], None] = print, track: Callable[[Iterable], Iterable] = lambda rows: rows) -> Packed:
    """Writes the samples of ``source`` into ``out/shard-000000.tar``, ... with ``shard_size`` samples
    each, in the source's order: an annotations file (COCO-captions .json, .jsonl or .csv manifest, as
    dataset.captions reads it: one sample per row) or an MMC4-style .jsonl of documents (as
    dataset.interleaved reads it: one sample per document, its images ``KEY.0.jpg``, ``KEY.1.png``, ...
    and the document in ``KEY.json``). Relative image paths resolve against ``images`` (default: the
    source's folder). An image file that is missing is left out of its sample, so that the reader
    counts it as missing exactly as it would in the folder; ``track`` wraps the samples (a progress
    bar). UserError for a bad source, a bad ``shard_size`` or an ``out`` that already holds shards;
    nothing is written then."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 (got {shard_size})")
    if not source.exists():
        raise UserError(f"{source}: source not found")
    root = images if images is not None else source.parent
    if not root.is_dir():
        raise UserError(f"{root}: images folder not found")
    samples = _samples(source, root)
    for n, (_, _, files, _) in enumerate(samples):
        for _, path in files:
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTS:
                raise UserError(f"{source}: sample {n + 1}: image {path.name} has an extension that is not an image "
                                f"type WebDataset tools know ({', '.join(IMAGE_EXTS)})")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, expected a folder")
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise UserError(f"--out {out} already holds shards: choose a new folder (old shards would mix with the new)")
    out.mkdir(parents=True, exist_ok=True)
    missing = n_images = 0
    # encoder=False: every member is bytes already; mtime 0: the same data packs into the same bytes
    with wds.ShardWriter(str(out / SHARD_NAME), maxcount=shard_size, verbose=0, encoder=False, mtime=0) as sink:
        for n, (row, caption, files, line) in enumerate(track(samples)):
            sample = {"__key__": f"{n:09d}", "json": json.dumps(row, ensure_ascii=False).encode("utf-8")}
            if caption is not None:
                sample["txt"] = caption.encode("utf-8")
            if line is not None:
                sample["line"] = str(line).encode("ascii")
            for prefix, path in files:
                n_images += 1
                try:
                    sample[prefix + path.suffix.lower().lstrip(".")] = path.read_bytes()
                except FileNotFoundError:
                    missing += 1
                except OSError as e:
                    raise UserError(f"{path}: cannot read ({e})") from None
            sink.write(sample)
        shards = sink.shard
    if missing:
        log(f"warning: {source}: {missing} of {n_images} image files are missing; their samples are packed "
            "without them (a reader counts them as missing images)")
    return Packed(out=out, samples=len(samples), shards=shards, missing=missing)
