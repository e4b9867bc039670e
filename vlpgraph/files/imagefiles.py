"""Image files of real datasets: reading any mode as 8-bit RGB, and skipping missing or unreadable files.

Shared by the file-reading dataset kinds (dataset.captions, dataset.interleaved), so both tolerate bad
images the same way (param ``max_bad_fraction``) and fail with the same message past it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from vlpgraph.errors import UserError

WHITE = (255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``im`` that keeps its real range, whatever its mode.

    ``convert("RGB")`` clips rather than scales high bit depths (a 16-bit PNG turns almost white), so:
    16-bit modes (``I;16*``) are scaled by 255/65535; ``I`` (32-bit integers) by its bit depth,
    read from the values (up to 255: 8 bit, up to 65535: 16 bit, else 32 bit; negatives clip to 0);
    ``F`` (floats) is taken as [0, 1] when it lies there, else as [0, 255] and clipped. Images with
    transparency (``RGBA``, ``LA``, ``PA``, or a palette/grey image with a transparent colour) are
    composited onto white, as a viewer shows them, rather than showing whatever colour lies under
    transparent pixels. Everything else (``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``) is PIL's ``convert``.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if mode == "F":
            a = a * 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else a
        else:
            top = a.max() if a.size else 0.0
            bits = 16 if mode.startswith("I;16") else (8 if top <= 255 else 16 if top <= 65535 else 32)
            a = a * (255.0 / (2.0**bits - 1))
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return im.convert("RGB")


def image_problem(path: Path | io.BytesIO | None) -> str | None:
    """None when ``path`` is a file (or in-memory bytes, e.g. a shard member) PIL can open and verify,
    else why not ("missing", "unreadable: ..."); None stands for an image that is not there."""
    if path is None or (isinstance(path, Path) and not path.is_file()):
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad file
        return f"unreadable: {type(e).__name__}"
    return None


def bad_images(images: Iterable[Path], ann: Path, max_bad_fraction: float, log) -> dict[Path, str]:
    """{image: why} for the missing or unreadable ones among ``images`` (each checked once), logged as a
    warning naming them; more than ``max_bad_fraction`` of the distinct images is a ``UserError``."""
    distinct = list(dict.fromkeys(images))
    problems = {img: why for img in distinct if (why := image_problem(img))}
    skip_bad_images(problems, len(distinct), ann, max_bad_fraction, log)
    return problems


def skip_bad_images(problems: dict[Path, str], n_images: int, ann: Path | str, max_bad_fraction: float, log) -> None:
    """Says that the images of ``problems`` ({image: why}, named by file name) of ``n_images`` are skipped
    (a warning through ``log``), or raises ``UserError`` when they are more than ``max_bad_fraction`` of
    them: the one wording for every reader (image folders, WebDataset shards)."""
    if not problems:
        return
    names = ", ".join(f"{p.name} ({why})" for p, why in list(problems.items())[:5])
    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
    if len(problems) > max_bad_fraction * n_images:
        raise UserError(
            f"{ann}: {len(problems)} of {n_images} images are missing or unreadable, "
            f"more than max_bad_fraction={max_bad_fraction}: {names}{more}"
        )
    log(f"warning: {ann}: skipped {len(problems)} of {n_images} images: {names}{more}")


def stats_fingerprint(images: Iterable[Path], root: Path) -> str:
    """sha256 of each named image's (path relative to ``root``, size, mtime): part of a data node's hash,
    so an image replaced under the same name makes a new trial. A missing file counts as (-1, -1)."""
    stats = []
    for img in images:
        try:
            name = str(img.relative_to(root))
        except ValueError:
            name = str(img)
        try:
            ist = img.stat()
            stats.append((name, ist.st_size, ist.st_mtime_ns))
        except OSError:
            stats.append((name, -1, -1))
    return hashlib.sha256(json.dumps(sorted(stats)).encode()).hexdigest()
