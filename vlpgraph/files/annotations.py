"""Image-caption annotation files (COCO-captions .json, .jsonl or .csv manifests) read into records.

Shared by the file-reading dataset kinds that take paired annotations: dataset.captions (its training
and test splits) and dataset.unpaired (its paired test split). Node modules never import each other, so
the reader lives here. Formats: see dataset.captions. Bad files are ``UserError``s naming the file (and
the line or annotation); missing/unreadable images and empty captions are skipped and counted
(:func:`drop_bad_images`, :func:`drop_empty_captions`) up to ``max_bad_fraction``. WebDataset shards
(vlpgraph/files/shards.py) hold the same rows, one JSON member per sample, and become records through the
same checks (:func:`records_from_rows`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from vlpgraph.errors import UserError
from vlpgraph.files.imagefiles import bad_images, skip_bad_images


@dataclass(frozen=True)
class Member:
    """Where one file of a WebDataset shard lies: ``size`` bytes at ``offset`` of the plain tar ``shard``."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Record:
    image: Path  # the image file; for a shard sample, the image's name (its group for holding out by image)
    caption: str
    boxes: list[list[float]] | None
    where: str = ""  # where in the annotations file, for messages ("line 4", "annotation 3")
    label: str | None = None  # the label column's class name (None: no label)
    member: Member | None = None  # a shard sample's image bytes (None: read the file ``image``)

    def open_image(self):
        """The image, opened by PIL (a context manager), from its file or its shard member."""
        return Image.open(io.BytesIO(self.member.read()) if self.member is not None else self.image)


# ------------------------------------------------------------------------------------------ reading


def file_error(path: Path, what: str) -> UserError:
    """A UserError naming the file first, as every data error does."""
    return UserError(f"{path}: {what}")


def _parse_boxes(value, path: Path, where: str) -> list[list[float]]:
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise file_error(path, f"{where}: 'boxes' is not a JSON list ({e.msg})") from None
    ok = isinstance(value, list) and all(
        isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in value
    )
    if not ok:
        raise file_error(path, f"{where}: 'boxes' must be a list of [x0, y0, x1, y1] (got {str(value)[:60]})")
    return [[float(v) for v in b] for b in value]


def _check_columns(path: Path, columns: list[str], want_boxes: bool) -> None:
    listed = ", ".join(columns) if columns else "none"
    for col in ("image", "caption") + (("boxes",) if want_boxes else ()):
        if col not in columns:
            hint = " (set boxes: false, or add a boxes column)" if col == "boxes" else ""
            raise file_error(path, f"no '{col}' column (columns: {listed}){hint}")


def _rows_coco(path: Path, data, want_boxes: bool, label_column: str | None = None) -> list[tuple]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise file_error(path, "not a COCO-captions file (expected an object with 'images' and 'annotations' lists)")
    files: dict = {}
    image_boxes: dict = {}
    image_labels: dict = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise file_error(path, "every entry of 'images' needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
        if "boxes" in im:
            image_boxes[im["id"]] = im["boxes"]
        if label_column and label_column in im:
            image_labels[im["id"]] = im[label_column]
    anns = data["annotations"]
    if not anns:
        return []
    columns = sorted(k for a in anns[:1] if isinstance(a, dict) for k in a)
    if "image_id" in columns:  # the image column of a COCO file
        columns = sorted(set(columns) | {"image"})
    if want_boxes and image_boxes:
        columns.append("boxes")
    _check_columns(path, columns, want_boxes)
    rows = []
    for n, a in enumerate(anns):
        where = f"annotation {n}"
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise file_error(path, f"{where}: needs 'image_id' and 'caption'")
        if a["image_id"] not in files:
            raise file_error(path, f"{where}: image_id {a['image_id']!r} is not in 'images'")
        boxes = a.get("boxes", image_boxes.get(a["image_id"])) if want_boxes else None
        if want_boxes and boxes is None:
            raise file_error(path, f"{where}: no 'boxes' (on the annotation or its image)")
        label = a.get(label_column, image_labels.get(a["image_id"])) if label_column else None
        rows.append((files[a["image_id"]], a["caption"], boxes, where, label))
    return rows


def jsonl_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed JSON) of each non-blank line of ``text`` (the file ``path``'s); a line
    that is not JSON is a UserError naming ``path:line``. Shared by the JSONL manifests and MMC4 documents."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _rows_jsonl(path: Path, text: str, want_boxes: bool, label_column: str | None = None) -> list[tuple]:
    rows = []
    checked = False
    for n, obj in jsonl_lines(path, text):
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")
        if not checked:
            _check_columns(path, list(obj), want_boxes)
            checked = True
        for col in ("image", "caption") + (("boxes",) if want_boxes else ()):
            if col not in obj:
                raise UserError(f"{path}:{n}: no '{col}'")
        label = obj.get(label_column) if label_column else None
        rows.append((obj["image"], obj["caption"], obj.get("boxes") if want_boxes else None, f"line {n}", label))
    return rows


def _rows_csv(path: Path, text: str, want_boxes: bool, label_column: str | None = None) -> list[tuple]:
    try:
        reader = csv.DictReader(text.splitlines())
        columns = list(reader.fieldnames or [])
        _check_columns(path, columns, want_boxes)
        return [
            (r["image"], r["caption"], r.get("boxes") if want_boxes else None, f"line {reader.line_num}",
             r.get(label_column) if label_column else None)
            for r in reader
        ]
    except csv.Error as e:
        raise file_error(path, f"not a readable CSV ({e})") from None


def _parse_label(value, path: Path, where: str, column: str) -> str | None:
    """A class name from the label column: strings (stripped) and integers (as their decimal text);
    None for an absent, null or empty value; anything else is an error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise file_error(path, f"{where}: '{column}' must be a class name (a string or an integer), got {str(value)[:60]}")


def read_annotations(path: Path, images_root: Path, want_boxes: bool, label_column: str | None = None) -> list[Record]:
    """Records of an annotations file; raises ``UserError`` (one line, naming the file) when it is bad.
    Captions are whitespace-normalised; empty ones are kept here (see :func:`drop_empty_captions`).
    With ``label_column`` each record's ``label`` is that column's class name (None where empty)."""
    if path.is_dir():
        raise file_error(path, "is a directory, expected an annotations file (.json, .jsonl or .csv)")
    if not path.is_file():
        raise file_error(path, "annotations file not found")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise file_error(path, f"unsupported annotations format '{suffix}' (expected .json, .jsonl or .csv)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise file_error(path, f"cannot read ({e})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise file_error(path, f"not valid JSON (line {e.lineno}: {e.msg})") from None
        rows = _rows_coco(path, data, want_boxes, label_column)
    elif suffix == ".jsonl":
        rows = _rows_jsonl(path, text, want_boxes, label_column)
    else:
        rows = _rows_csv(path, text, want_boxes, label_column)
    return records_from_rows(rows, path, images_root, want_boxes, label_column)


def records_from_rows(rows: list[tuple], path: Path | str, images_root: Path | None, want_boxes: bool,
                      label_column: str | None, members: list[Member | None] | None = None) -> list[Record]:
    """Records of ``rows`` ((image, caption, boxes, where, label) each), checked: ``path`` names the
    source in errors; relative image paths resolve against ``images_root`` (None: kept as they are, the
    names of shard samples, whose bytes are ``members``, one per row)."""
    records = []
    paths: dict[str, Path] = {}  # one Path per image (COCO has ~5 captions an image; Path() is slow)
    for n, (image, caption, boxes, where, label) in enumerate(rows):
        if not isinstance(image, str) or not image.strip():
            raise file_error(path, f"{where}: 'image' must be a non-empty path")
        if not isinstance(caption, str):
            raise file_error(path, f"{where}: 'caption' must be a string")
        if image not in paths:
            img = Path(image)
            paths[image] = img if img.is_absolute() or images_root is None else images_root / img
        records.append(
            Record(
                image=paths[image],
                caption=" ".join(caption.split()),
                boxes=_parse_boxes(boxes, path, where) if want_boxes else None,
                where=where,
                label=_parse_label(label, path, where, label_column) if label_column else None,
                member=members[n] if members is not None else None,
            )
        )
    if not records:
        raise file_error(path, "no samples")
    return records


def raw_rows(path: Path) -> list[dict]:
    """Every row of an annotations file with all its columns, for ``vlpgraph data pack`` (call
    :func:`read_annotations` first: it reports a bad file). A COCO row is its annotation's keys over its
    image entry's (so an annotation's ``boxes`` or label wins, as when reading), ``image`` the file name."""
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        images = {im["id"]: im for im in data["images"]}
        rows = []
        for a in data["annotations"]:
            im = images[a["image_id"]]
            extra = {k: v for k, v in im.items() if k not in ("id", "file_name")}
            rows.append({**extra, **{k: v for k, v in a.items() if k != "image_id"}, "image": im["file_name"]})
        return rows
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [dict(r) for r in csv.DictReader(text.splitlines())]


def drop_bad_images(records: list[Record], ann: Path, max_bad_fraction: float, log,
                    problems: dict[Path, str] | None = None) -> list[Record]:
    """Records whose image exists and opens; more than ``max_bad_fraction`` bad images is an error
    (:func:`vlpgraph.files.imagefiles.bad_images`). ``problems`` ({image: why}) when they are known already
    (shard samples are checked as they stream past): then no file is opened here."""
    if problems is None:
        bad = bad_images((r.image for r in records), ann, max_bad_fraction, log)
    else:
        bad = problems
        skip_bad_images(bad, len({r.image for r in records}), ann, max_bad_fraction, log)
    return [r for r in records if r.image not in bad] if bad else records


def drop_empty_captions(records: list[Record], ann: Path, max_bad_fraction: float, log) -> list[Record]:
    """Records with a non-empty caption; more than ``max_bad_fraction`` empty ones is an error (an
    empty caption is a bad sample, like an unreadable image: counted, named, skipped)."""
    empty = [r for r in records if not r.caption]
    if not empty:
        return records
    where = ", ".join(r.where for r in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if len(empty) > max_bad_fraction * len(records):
        raise UserError(
            f"{ann}: {len(empty)} of {len(records)} captions are empty, more than "
            f"max_bad_fraction={max_bad_fraction}: {where}"
        )
    log(f"warning: {ann}: skipped {len(empty)} of {len(records)} samples whose caption is empty: {where}")
    return [r for r in records if r.caption]
