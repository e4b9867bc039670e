"""MMC4-style interleaved documents: one JSON object per .jsonl line (``text_list``, ``image_info``
with ``image_name`` and ``matched_text_index``), or the same objects packed into WebDataset shards.

The one reader of that format: ``dataset.interleaved`` builds on it and ``vlpgraph data pack`` packs
from it (files/ needs no node module, and no node module imports another).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlpgraph.errors import UserError
from vlpgraph.files.annotations import Member, jsonl_lines
from vlpgraph.files.imagefiles import bad_images, skip_bad_images


@dataclass
class Document:
    """One line of the file: ``texts`` (whitespace-normalised sentences), ``images`` [(path, matched
    sentence index)] in the file's order, ``line`` (1-based, for messages and the placement draws).
    A document read from shards has the line it had in the .jsonl it was packed from, its image names
    as ``images`` and their bytes as ``members`` (parallel to ``images``; None: read the files), and
    ``where`` names its sample in messages (default: ``line N``)."""

    texts: list[str]
    images: list[tuple[Path, int]]
    line: int
    members: list[Member | None] | None = None
    where: str = ""

    def named(self) -> str:
        return self.where or f"line {self.line}"

    def sources(self) -> list[Path | Member]:
        """Where each image's bytes are: its file, or its shard member."""
        return [img for img, _ in self.images] if self.members is None else list(self.members)


def parse_document(obj, where: str, images_root: Path | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sentences, [(image path, matched sentence index)]) of one document object (a .jsonl line or a
    shard sample's JSON); relative image names resolve against ``images_root`` (None: kept as named).
    A malformed document is a ``UserError`` starting with ``where``."""
    texts, info = (obj.get("text_list"), obj.get("image_info")) if isinstance(obj, dict) else (None, None)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(info, list):
        raise UserError(f"{where}: expected an object with 'text_list' (a list of strings) and 'image_info' (a list)")
    images = []
    for im in info:
        name = im.get("image_name") if isinstance(im, dict) else None
        k = im.get("matched_text_index") if isinstance(im, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(k, int) or isinstance(k, bool):
            raise UserError(f"{where}: every 'image_info' entry needs 'image_name' (a path) and "
                            "'matched_text_index' (an integer)")
        if not 0 <= k < len(texts):
            raise UserError(f"{where}: matched_text_index {k} is outside text_list (0..{len(texts) - 1})")
        img = Path(name)
        images.append((img if img.is_absolute() or images_root is None else images_root / img, k))
    return [" ".join(t.split()) for t in texts], images


def read_documents(path: Path, images_root: Path) -> list[Document]:
    """The documents of an MMC4-style JSONL file; a malformed line is a ``UserError`` naming it."""
    if not path.is_file():
        raise UserError(f"{path}: annotations file not found")
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: unsupported format '{path.suffix}' (expected an MMC4-style .jsonl)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    docs = [Document(*parse_document(obj, f"{path}:{n}", images_root), n) for n, obj in jsonl_lines(path, text)]
    if not docs:
        raise UserError(f"{path}: no documents")
    return docs


def drop_bad(docs: list[Document], ann: Path, max_bad_fraction: float, log,
             problems: dict[Path, str] | None = None) -> list[Document]:
    """Documents without their missing/unreadable images (counted and judged by
    :func:`vlpgraph.files.imagefiles.bad_images`, as dataset.captions does; ``problems`` ({image: why}) when
    they are known already, as for shards, whose images were checked as they streamed past); a document
    left with no image is dropped, and counted in a warning."""
    if problems is None:
        bad = bad_images((img for d in docs for img, _ in d.images), ann, max_bad_fraction, log)
    else:
        bad = problems
        skip_bad_images(bad, len({img for d in docs for img, _ in d.images}), ann, max_bad_fraction, log)
    kept = []
    for d in docs:
        keep = [j for j, (img, _) in enumerate(d.images) if img not in bad]
        if keep:
            members = None if d.members is None else [d.members[j] for j in keep]
            kept.append(Document(d.texts, [d.images[j] for j in keep], d.line, members, d.where))
    if len(kept) < len(docs):
        dropped = [d.named() for d in docs if not [1 for img, _ in d.images if img not in bad]]
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        log(f"warning: {ann}: dropped {len(dropped)} of {len(docs)} documents left without a readable image: {shown}")
    if not kept:
        raise UserError(f"{ann}: no document has a readable image")
    return kept
