"""``dataset.shapes``: the procedural benchmark every method is tested on.

Images of 1-4 coloured shapes on a low-contrast textured background, captions that name some of the
objects (colour, shape, size, position, relations computed from geometry), per-object boxes, which
objects each caption names, a ``caption_noise`` knob for misaligned training captions, a clean
disjoint test split and single-object test images for zero-shot probes.

Sample ``i`` of a split is a pure function of ``(data_seed, split, i)`` (plus the generation params
that change what an image may contain, such as ``image_size``). The splits are generated once into
``<cache_root>/shapes/<hash>/`` and reused by every ``train_fraction`` of a sweep.

With ``pairing: interleaved`` the training items are documents (capability ``interleaved``): runs of
1..``max_images`` consecutive training scenes, each image before or after its own sentence. They are
built on the fly from the same cached scenes, so both pairings train on exactly the same images.

With ``pairing: unpaired`` (capabilities ``unpaired`` and ``gallery``) the training items come from two
disjoint sets of scenes: the image corpus is training scenes 0..n-1 (the very images a paired run of the
same params trains on) and the text corpus is the captions of training scenes N..N+n-1 (N = train_size,
n = ceil(train_fraction * N)), which are never drawn. The gallery cuts regions from the image corpus's
own boxes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_serializer

from vlpgraph.engine import ports
from vlpgraph.files.gallery import BoxGallery
from vlpgraph.engine.ports import (
    BOXES, CLASSES, GALLERY, INTERLEAVED, LABELS, PAIRED, SCENES, UNPAIRED, BuildContext, PairedData, ZeroShotSet,
    collate_documents, collate_unpaired, default_collate,
)
from vlpgraph.engine.registry import Params, register

# Bump when the generator's output changes: it is part of the cache key.
GENERATOR_VERSION = 1

COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
COLOUR_RGB = np.array(
    [(220, 40, 40), (40, 180, 60), (45, 85, 235), (235, 215, 40), (155, 55, 205), (40, 205, 215)],
    dtype=np.float32,
)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # label = colour * 4 + shape
BACKGROUNDS = ("noisy", "striped", "shaded")
MAX_OBJECTS = 4
SPLIT_IDS = {"train": 0, "test": 1}

# Normalisation constants (close to the measured per-channel statistics of the generated images).
MEAN = (0.46, 0.465, 0.46)
STD = (0.195, 0.18, 0.195)

_SIZE_WORDS = (("small", "tiny", "little"), ("large", "big"))
_COUNT_WORDS = ("no", "one", "two", "three", "four")
_POSITION = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
_PREFIXES = (
    "", "", "a picture of ", "an image of ", "a photo of ", "a drawing of ", "there is ", "we see ",
    "<count>", "<count>",
)
_MAX_WORDS = 20  # optional prefix/suffix are dropped past this (text towers use max_len ~24)
_RADIUS = ((0.10, 0.14), (0.17, 0.22))  # radius / image_size for small and large objects
_NOISE_TILES = 64
# The random stream of document boundaries, placements and fillers (scenes use the split ids 0 and 1).
DOC_STREAM = 2
TEST_DOC_STREAM = 3  # the held-out documents' sizes and layouts (evaluator.documents): not the training ones
# Filler sentences of interleaved documents: they describe nothing in any image (no colour, shape,
# size, count or position word), like the chatter between a web page's pictures.
FILLERS = (
    "here is another picture from the set",
    "we made these for a class project",
    "thanks for looking at our collection",
    "more pictures follow below",
    "this took a while to make",
    "what do you think of this",
    "it is part of a bigger series",
    "we will add more of these soon",
    "some of them are quite old",
    "let us know which is your favourite",
    "the whole set is on our page",
    "these were drawn by a program",
)
# Params that only change how the cached scenes are grouped into documents (not in the cache key).
DOCUMENT_PARAMS = ("pairing", "max_images", "image_first_p", "filler_sentences")
# Params added after results were stored, left out of the params' dump (hence of the node hash and the
# cache key) while unset (None), so every graph that does not set them keeps its trials' ids.
LATE_PARAMS = ("region_size",)
# The text corpus of ``pairing: unpaired`` (captions of the scenes after the image corpus), cached here.
TEXT_CORPUS = "unpaired_text.json"


class ShapesParams(Params):
    train_size: int = Field(8000, ge=1, le=10_000_000, description="number of training images")
    test_size: int = Field(1000, ge=1, le=1_000_000, description="number of test images (always clean)")
    image_size: int = Field(32, ge=16, le=512, description="image side in pixels, a multiple of 8")
    max_objects: int = Field(4, ge=1, le=MAX_OBJECTS, description="most objects per image")
    min_objects: int = Field(1, ge=1, le=MAX_OBJECTS, description="fewest objects per image")
    caption_noise: float = Field(0.0, ge=0.0, le=1.0, description="fraction of training captions misaligned")
    noise_partial: float = Field(
        0.5, ge=0.0, le=1.0,
        description="share of noisy captions that are partly wrong (one object's colour or shape changed) "
        "rather than replaced by another sample's caption",
    )
    train_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="use the first ceil(f * train_size) training samples (nested subsets)"
    )
    data_seed: int = Field(0, ge=0, description="seed of the generated data (independent of the trial seed)")
    zeroshot_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="share of test images with exactly one object (zero-shot material)"
    )
    pairing: Literal["paired", "interleaved", "unpaired"] = Field(
        "paired", description="training items: image-caption pairs; interleaved documents of 1..max_images "
        "scenes with their sentences (capability 'interleaved'); or unpaired: an image corpus and a text corpus "
        "of different scenes, plus a concept gallery (capabilities 'unpaired', 'gallery'). The same training "
        "images in every pairing; the test split stays paired",
    )
    max_images: int = Field(6, ge=1, le=64, description="interleaved: most images per document (1..max_images, "
                            "uniformly; LCL: up to 6)")
    image_first_p: float = Field(
        0.5, ge=0.0, le=1.0,
        description="interleaved: probability that an image stands before its sentence rather than after it (LCL: 0.5)",
    )
    filler_sentences: float = Field(
        0.0, ge=0.0, le=1.0,
        description="interleaved: probability, per image, of one filler sentence that describes nothing, at a "
        "random place in the document",
    )
    region_size: int | None = Field(
        None, ge=8, le=512, description="unpaired: side of a gallery region (its box crop resized to region_size "
        "x region_size); None: image_size, so the vision tower embeds a region as it embeds an image",
    )

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"image_size must be a multiple of 8 (got {v})")
        return v

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.min_objects > self.max_objects:
            found.append(("min_objects", f"min_objects ({self.min_objects}) is greater than max_objects ({self.max_objects})"))
        if self.pairing == "unpaired" and self.caption_noise > 0:
            found.append(("caption_noise", f"caption_noise ({self.caption_noise}) misaligns captions with their images, "
                                           "but pairing: unpaired has no image-caption pairs; set caption_noise: 0"))
        return found

    @model_serializer(mode="wrap")
    def _leave_out_unset_late_params(self, handler):
        """The dump without the LATE_PARAMS that are None (see LATE_PARAMS)."""
        out = handler(self)
        for k in LATE_PARAMS:
            if k in out and out[k] is None:
                del out[k]
        return out


# ------------------------------------------------------------------------------------------ scenes


@dataclass
class Scene:
    """One sample before drawing: objects, background and caption (pixel units, y down)."""

    n: int
    colour: list[int]
    shape: list[int]
    size: list[int]
    r: list[float]
    cx: list[float]
    cy: list[float]
    jitter: list[tuple[float, float, float]]
    bg: tuple  # (type, c1 rgb, c2 rgb, angle, freq, phase, blotch a, b, c, tile_a, tile_b, offset x, y)
    caption: str = ""
    mentioned: list[bool] | None = None
    noise_kind: int = 0  # 0 clean, 1 partly wrong, 2 replaced by another sample's caption


def _rng_uniforms(data_seed: int, split_id: int, i: int) -> list[float]:
    return np.random.default_rng([data_seed, split_id, i]).random(176).tolist()


def _layout(u: list[float], n: int, sizes: list[int], S: int) -> tuple[list[float], list[float], list[float]]:
    """Radii and centres of ``n`` objects whose boxes do not touch (gap >= ~4% of S)."""
    gap = max(1.0, 0.04 * S)
    rs = [S * (_RADIUS[sizes[k]][0] + u[24 + k] * (_RADIUS[sizes[k]][1] - _RADIUS[sizes[k]][0])) for k in range(n)]
    cxs: list[float] = []
    cys: list[float] = []
    pool = 48  # u[48:112]: 32 (x, y) tries shared by all objects
    ok = True
    for k in range(n):
        r = rs[k]
        placed = False
        for _ in range(10):
            if pool >= 112:
                break
            x = r + u[pool] * (S - 2 * r)
            y = r + u[pool + 1] * (S - 2 * r)
            pool += 2
            if all(max(abs(x - cxs[j]), abs(y - cys[j])) - r - rs[j] >= gap for j in range(k)):
                cxs.append(x)
                cys.append(y)
                placed = True
                break
        if not placed:
            ok = False
            break
    if ok:
        return rs, cxs, cys
    # Fallback: one object per quadrant (a large object always fits in a quadrant).
    order = sorted(range(4), key=lambda q: u[112 + q])
    cxs, cys = [], []
    half = S / 2
    for k in range(n):
        q = order[k]
        x0, y0 = (q % 2) * half, (q // 2) * half
        r = min(rs[k], half / 2 - gap / 2)
        rs[k] = r
        lo, span = r + gap / 2, half - 2 * r - gap
        cxs.append(x0 + lo + u[116 + 2 * k] * span)
        cys.append(y0 + lo + u[117 + 2 * k] * span)
    return rs, cxs, cys


def _scene(data_seed: int, split_id: int, i: int, p: ShapesParams) -> tuple[Scene, list[float]]:
    """The objects and background of sample ``i`` (no caption yet) and its uniforms.

    Uniform layout: u[0:4] noise decisions and object count, u[4:20] background, u[20:48] objects,
    u[48:124] layout, u[124:168] caption, u[168:172] caption noise. Content never depends on caption_noise.
    """
    S = p.image_size
    u = _rng_uniforms(data_seed, split_id, i)
    if split_id == SPLIT_IDS["test"] and u[2] < p.zeroshot_fraction:
        n = 1
    else:
        lo = p.min_objects if split_id == SPLIT_IDS["train"] or p.max_objects < 2 else max(p.min_objects, 2)
        n = lo + min(int(u[3] * (p.max_objects - lo + 1)), p.max_objects - lo)
    # Distinct (colour, shape) classes, so a phrase like "red circle" names one object.
    classes: list[int] = []
    for k in range(n):
        c = int(u[20 + k] * len(CLASS_NAMES))
        while c in classes:
            c = (c + 1) % len(CLASS_NAMES)
        classes.append(c)
    sizes = [int(u[28 + k] < 0.5) for k in range(n)]
    rs, cxs, cys = _layout(u, n, sizes, S)
    jitter = [((u[32 + 3 * k] - 0.5) * 36, (u[33 + 3 * k] - 0.5) * 36, (u[34 + 3 * k] - 0.5) * 36) for k in range(n)]
    grey = 65 + 100 * u[4]
    c1 = (grey + (u[5] - 0.5) * 28, grey + (u[6] - 0.5) * 28, grey + (u[7] - 0.5) * 28)
    delta = (22 + 22 * u[8]) * (1 if u[9] < 0.5 else -1)
    c2 = tuple(c + delta + (u[10 + j] - 0.5) * 10 for j, c in enumerate(c1))
    bg = (
        int(u[13] * 3),
        c1,
        c2,
        u[14] * 2 * math.pi,
        2.5 + 3.5 * u[15],
        u[16] * 2 * math.pi,
        u[17],
        u[18],
        u[19],
        int(u[44] * _NOISE_TILES),
        int(u[45] * _NOISE_TILES),
        int(u[46] * S),
        int(u[47] * S),
    )
    scene = Scene(
        n=n,
        colour=[c // len(SHAPES) for c in classes],
        shape=[c % len(SHAPES) for c in classes],
        size=sizes,
        r=rs,
        cx=cxs,
        cy=cys,
        jitter=jitter,
        bg=bg,
    )
    return scene, u


def _box(s: Scene, k: int, S: int) -> tuple[float, float, float, float]:
    r = s.r[k]
    return (max(0.0, s.cx[k] - r), max(0.0, s.cy[k] - r), min(float(S), s.cx[k] + r), min(float(S), s.cy[k] + r))


def _relations(s: Scene, a: int, b: int, S: int) -> list[str]:
    """Relations 'a <rel> b' that hold in the image's geometry (boxes never overlap)."""
    ax0, ay0, ax1, ay1 = _box(s, a, S)
    bx0, by0, bx1, by1 = _box(s, b, S)
    rels = []
    if ax1 <= bx0:
        rels.append("to the left of")
    if ax0 >= bx1:
        rels.append("to the right of")
    if ay1 <= by0:
        rels.append("above")
    if ay0 >= by1:
        rels.append("below")
    if max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) <= 0.15 * S:
        rels.append("next to")
    return rels


def _caption(s: Scene, cu: list[float], S: int, colour: list[int], shape: list[int]) -> tuple[str, list[bool]]:
    """A caption naming some objects of ``s`` (with ``colour``/``shape`` as given) and the mentioned mask.

    All choices come from the uniforms ``cu``, so the same ``cu`` with one attribute changed yields the
    same sentence with that one word changed (partial caption noise).
    """
    n = s.n
    # How many objects to name: all with probability 0.45, otherwise fewer; at most 3.
    if n == 1 or cu[0] < 0.45:
        m = n
    else:
        m = 1 + int(cu[1] * (n - 1))
    m = min(m, 3)
    order = sorted(range(n), key=lambda k: cu[2 + k])[:m]
    mentioned = [k in order for k in range(n)]

    def phrase(k: int, j: int) -> str:
        words = COLOURS[colour[k]] + " " + SHAPES[shape[k]]
        if cu[8 + j] < 0.65:
            choices = _SIZE_WORDS[s.size[k]]
            words = choices[int(cu[12 + j] * len(choices))] + " " + words
        return "a " + words

    def pos(k: int) -> str:
        col = min(int(3 * s.cx[k] / S), 2)
        row = min(int(3 * s.cy[k] / S), 2)
        return _POSITION[row][col]

    def rel(a: int, b: int) -> str:
        rels = _relations(s, a, b, S)
        return rels[int(cu[16] * len(rels))]

    P = [phrase(k, j) for j, k in enumerate(order)]
    t = cu[17]
    if m == 1:
        body = P[0] + (" " + pos(order[0]) if t < 0.8 else "")
    elif m == 2:
        a, b = order
        if t < 0.3:
            body = f"{P[0]} and {P[1]}"
        elif t < 0.75:
            body = f"{P[0]} {rel(a, b)} {P[1]}"
        else:
            body = f"{P[0]} {pos(a)} and {P[1]} {pos(b)}"
    else:
        a, b, c = order
        if t < 0.4:
            body = f"{P[0]}, {P[1]} and {P[2]}"
        else:
            body = f"{P[0]} {rel(a, b)} {P[1]}, and {P[2]}"
    prefix = _PREFIXES[int(cu[18] * len(_PREFIXES))]
    if prefix == "<count>":
        count = _COUNT_WORDS[n] + (" shapes" if n > 1 else " shape")
        prefix = f"{count}: " if m == n else f"{count}, including "
    suffix = f" on a {BACKGROUNDS[s.bg[0]]} background" if cu[19] < 0.35 else ""
    caption = prefix + body + suffix
    if len(caption.split()) > _MAX_WORDS:
        caption = prefix + body
    if len(caption.split()) > _MAX_WORDS:
        caption = body
    return caption, mentioned


def make_scene(data_seed: int, split: str, i: int, p: ShapesParams) -> Scene:
    """Sample ``i`` of ``split`` with its (possibly noisy) caption, before drawing."""
    split_id = SPLIT_IDS[split]
    s, u = _scene(data_seed, split_id, i, p)
    cu = u[124:168]
    caption, mentioned = _caption(s, cu, p.image_size, s.colour, s.shape)
    if split == "train" and u[0] < p.caption_noise:
        if u[1] < p.noise_partial:
            # Change one mentioned object's colour or shape to a class absent from the image.
            named = [k for k in range(s.n) if mentioned[k]]
            k = named[int(u[168] * len(named))]
            colour, shape = list(s.colour), list(s.shape)
            present = {c * len(SHAPES) + h for c, h in zip(s.colour, s.shape)}
            change_colour = u[169] < 0.5
            step = 1 + int(u[170] * ((len(COLOURS) if change_colour else len(SHAPES)) - 1))
            for _ in range(len(CLASS_NAMES)):
                if change_colour:
                    colour[k] = (colour[k] + step) % len(COLOURS)
                else:
                    shape[k] = (shape[k] + step) % len(SHAPES)
                if colour[k] * len(SHAPES) + shape[k] not in present:
                    break
                step = 1
            caption, _ = _caption(s, cu, p.image_size, colour, shape)
            # ``mentioned`` marks objects the caption describes correctly; the altered one is not.
            mentioned = list(mentioned)
            mentioned[k] = False
            s.noise_kind = 1
        else:
            # The clean caption of an earlier sample (so it is in every nested subset that holds i).
            j = int(u[171] * i) if i > 0 else 1
            other, ou = _scene(data_seed, split_id, j, p)
            caption, _ = _caption(other, ou[124:168], p.image_size, other.colour, other.shape)
            mentioned = [False] * s.n
            s.noise_kind = 2
    s.caption = caption
    s.mentioned = mentioned
    return s


# ----------------------------------------------------------------------------------------- drawing


def _noise_bank(data_seed: int, S: int) -> np.ndarray:
    """Noise tiles [T, 3, 2S, 2S] shared by all samples (a pure function of seed and size); a sample
    takes an S x S window of one tile (see :func:`draw`)."""
    tiles = int(np.clip(16e6 // (48 * S * S), 4, _NOISE_TILES))  # at most ~16 MB
    rng = np.random.default_rng([data_seed, 7919, S])
    return rng.standard_normal((tiles, 3, 2 * S, 2 * S), dtype=np.float32)


def draw(scenes: list[Scene], S: int, bank: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Render scenes into uint8 images [N, S, S, 3] (written into ``out`` when given).

    Vectorised over the batch, channel-first in float32; call with ~128 scenes so the work stays in
    cache.
    """
    N = len(scenes)
    f32 = np.float32
    T = bank.shape[0]
    ar = np.arange(S, dtype=f32) + f32(0.5)
    xx, yy = ar[None, None, :], ar[None, :, None]  # [1,1,S], [1,S,1]
    windows = np.lib.stride_tricks.sliding_window_view(bank, (S, S), axis=(2, 3))  # [T,3,S+1,S+1,S,S]

    bg = [s.bg for s in scenes]
    bg_type = np.array([b[0] for b in bg])
    c1 = np.array([b[1] for b in bg], f32)
    dc = np.array([b[2] for b in bg], f32) - c1
    ang = np.array([b[3] for b in bg], f32)[:, None, None]
    freq = np.array([b[4] for b in bg], f32)[:, None, None]
    phase = np.array([b[5] for b in bg], f32)[:, None, None]
    bl = np.array([b[6:9] for b in bg], f32)[:, :, None, None]
    tile_a = np.array([b[9] for b in bg]) % T
    tile_b = np.array([b[10] for b in bg]) % T
    off_x = np.array([b[11] for b in bg])
    off_y = np.array([b[12] for b in bg])

    # Background: two close colours c1, c1+dc mixed by a pattern in [-1, 1].
    pattern = np.empty((N, S, S), f32)
    m = bg_type == 0  # noisy: coarse speckle
    if m.any():
        pattern[m] = np.clip(windows[tile_a[m], 0, off_y[m], off_x[m]] * f32(0.6), -1, 1)
    m = bg_type != 0
    if m.any():
        proj = (xx - S / 2) * np.cos(ang[m]) + (yy - S / 2) * np.sin(ang[m])
        striped = (bg_type[m] == 1)[:, None, None]
        pattern[m] = np.where(striped, np.sin(proj * (2 * np.pi / S) * freq[m] + phase[m]), proj / f32(0.71 * S))
    pattern *= 0.5
    pattern += 0.5
    # Low-frequency blotches on every background (a few grey levels).
    pattern_grey = np.sin((bl[:, 0] * xx + bl[:, 1] * yy) * f32(4 * np.pi / S) + bl[:, 2] * f32(2 * np.pi))
    img = np.multiply(dc[:, :, None, None], pattern[:, None], dtype=f32)  # [N,3,S,S]
    img += c1[:, :, None, None]
    img += (pattern_grey * f32(6))[:, None]

    # Objects: signed distance fields on a W x W window around each object, antialiased over a pixel.
    # One pass draws at most one object per image, so the scattered windows never collide.
    W = int(math.ceil(2 * _RADIUS[1][1] * S)) + 3
    win = np.arange(W)
    views = np.lib.stride_tricks.sliding_window_view(img, (W, W), axis=(2, 3), writeable=True)
    for k in range(MAX_OBJECTS):
        idx = np.array([i for i, s in enumerate(scenes) if k < s.n], dtype=np.int64)
        if not len(idx):
            break
        sc = [scenes[i] for i in idx]
        shp = np.array([s.shape[k] for s in sc])
        cx = np.array([s.cx[k] for s in sc], f32)
        cy = np.array([s.cy[k] for s in sc], f32)
        r = np.array([s.r[k] for s in sc], f32)
        rgb = np.clip(COLOUR_RGB[[s.colour[k] for s in sc]] + np.array([s.jitter[k] for s in sc], f32), 0, 255)
        ox = np.clip(np.floor(cx - r).astype(np.int64) - 1, 0, S - W)
        oy = np.clip(np.floor(cy - r).astype(np.int64) - 1, 0, S - W)
        dxs = np.abs(ox[:, None] + win + f32(0.5) - cx[:, None])[:, None, :]  # [M,1,W]
        dys = (oy[:, None] + win + f32(0.5) - cy[:, None])[:, :, None]  # [M,W,1]
        r3 = r[:, None, None]
        d = np.empty((len(idx), W, W), f32)
        m = shp == 0
        if m.any():
            d[m] = np.sqrt(dxs[m] ** 2 + dys[m] ** 2) - r3[m]
        m = shp == 1
        if m.any():
            d[m] = np.maximum(dxs[m], np.abs(dys[m])) - r3[m]
        m = shp == 2  # upward triangle: apex (cx, cy-r), base y = cy+r
        if m.any():
            d[m] = np.maximum(dys[m] - r3[m], (dxs[m] - (dys[m] + r3[m]) * 0.5) * f32(0.8944))
        m = shp == 3
        if m.any():
            t, dx, ady, rr = r3[m] * f32(0.36), dxs[m], np.abs(dys[m]), r3[m]
            d[m] = np.minimum(np.maximum(dx - rr, ady - t), np.maximum(dx - t, ady - rr))
        alpha = np.clip(0.5 - d, 0, 1)[:, None]  # [M,1,W,W]
        patch = views[idx, :, oy, ox]  # [M,3,W,W] (a copy)
        patch += (rgb[:, :, None, None] - patch) * alpha
        views[idx, :, oy, ox] = patch

    # Sensor noise everywhere, then round to uint8 (channel-last).
    fine = windows[tile_b, :, off_x, off_y]  # another window of another tile
    fine *= 5
    img += fine
    img += 0.5
    np.clip(img, 0, 255, out=img)
    if out is None:
        out = np.empty((N, S, S, 3), np.uint8)
    out[...] = img.transpose(0, 2, 3, 1)
    return out


# ------------------------------------------------------------------------------------ materialise


def generate_split(p: ShapesParams, split: str, n: int, out: dict | None = None, chunk: int | None = None) -> dict:
    """Generate samples 0..n-1 of ``split``: arrays (images [n,S,S,3] uint8, boxes [n,4,4], ...) + captions."""
    S = p.image_size
    chunk = chunk or int(np.clip(131072 // (S * S), 4, 128))  # ~1.5 MB of float32 pixels per chunk
    bank = _noise_bank(p.data_seed, S)
    out = out if out is not None else {"images": np.empty((n, S, S, 3), np.uint8)}
    counts = np.zeros(n, np.int8)
    boxes = np.zeros((n, MAX_OBJECTS, 4), np.float32)
    mentioned = np.zeros((n, MAX_OBJECTS), bool)
    colour = np.full((n, MAX_OBJECTS), -1, np.int8)
    shape = np.full((n, MAX_OBJECTS), -1, np.int8)
    size = np.full((n, MAX_OBJECTS), -1, np.int8)
    noise_kind = np.zeros(n, np.int8)
    captions: list[str] = []
    for a in range(0, n, chunk):
        scenes = [make_scene(p.data_seed, split, i, p) for i in range(a, min(n, a + chunk))]
        draw(scenes, S, bank, out=out["images"][a : a + len(scenes)])
        for j, s in enumerate(scenes):
            i = a + j
            counts[i] = s.n
            for k in range(s.n):
                boxes[i, k] = _box(s, k, S)
            mentioned[i, : s.n] = s.mentioned
            colour[i, : s.n] = s.colour
            shape[i, : s.n] = s.shape
            size[i, : s.n] = s.size
            noise_kind[i] = s.noise_kind
            captions.append(s.caption)
    labels = np.where(counts == 1, colour[:, 0].astype(np.int64) * len(SHAPES) + shape[:, 0], -1)
    out.update(
        counts=counts, boxes=boxes, mentioned=mentioned, colour=colour, shape=shape, size=size,
        noise_kind=noise_kind, labels=labels, captions=captions,
    )
    return out


def cache_key(p: ShapesParams) -> str:
    """The generated arrays' folder: every param that changes a scene (not train_fraction, nor how the
    scenes are grouped into documents or corpora, so every pairing shares one folder)."""
    gen = p.model_dump(exclude={"train_fraction", *DOCUMENT_PARAMS, *LATE_PARAMS})
    gen["generator_version"] = GENERATOR_VERSION
    return hashlib.sha256(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:16]


_ARRAYS = ("counts", "boxes", "mentioned", "colour", "shape", "size", "noise_kind", "labels")


def _write_split(d: Path, split: str, p: ShapesParams, n: int) -> None:
    """Write ``{split}_images.npy``, ``{split}.npz`` and ``{split}_captions.json`` into ``d``, each
    under a temporary name first (several processes may generate the same folder at once)."""
    S = p.image_size
    tmp_img = d / f".{split}_images.{os.getpid()}.npy"
    tmp_npz = d / f".{split}.{os.getpid()}.npz"
    tmp_caps = d / f".{split}_captions.{os.getpid()}.json"
    try:
        images = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.uint8, shape=(n, S, S, 3))
        arrays = generate_split(p, split, n, out={"images": images})
        images.flush()
        del images, arrays["images"]
        with open(tmp_npz, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in _ARRAYS})
        tmp_caps.write_text(json.dumps(arrays["captions"]))
        os.replace(tmp_img, d / f"{split}_images.npy")
        os.replace(tmp_npz, d / f"{split}.npz")
        os.replace(tmp_caps, d / f"{split}_captions.json")
    finally:
        for tmp in (tmp_img, tmp_npz, tmp_caps):
            tmp.unlink(missing_ok=True)


def materialise(p: ShapesParams, cache_root: Path, log=print) -> Path:
    """Generate both splits into ``cache_root/shapes/<key>/`` unless already there; return the folder."""
    d = Path(cache_root) / "shapes" / cache_key(p)
    done = d / "meta.json"
    if done.exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"shapes: generating {p.train_size} train + {p.test_size} test images ({p.image_size} px) into {d}")
    for split, n in (("train", p.train_size), ("test", p.test_size)):
        _write_split(d, split, p, n)
    dt = time.perf_counter() - t0
    meta = {"params": p.model_dump(exclude={"train_fraction", *DOCUMENT_PARAMS, *LATE_PARAMS}), "generator_version": GENERATOR_VERSION,
            "seconds": round(dt, 3)}
    tmp = d / f".meta.{os.getpid()}.json"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, done)  # written last: marks the folder complete
    log(f"shapes: generated {p.train_size + p.test_size} images in {dt:.1f} s")
    return d


# ---------------------------------------------------------------------------------------- datasets


class ShapesSplit(torch.utils.data.Dataset):
    """One split (or a nested prefix of it). Items follow ``PairedData``'s contract plus ``label``
    (class index of a single-object image, -1 otherwise).

    Public arrays (first ``len(self)`` rows): ``images`` [N,S,S,3] uint8, ``captions``, ``boxes``
    [N,4,4], ``counts`` [N], ``mentioned`` [N,4] (objects the caption describes correctly),
    ``colour``/``shape``/``size`` [N,4] (-1 padded), ``labels`` [N], ``noise_kind`` [N]
    (0 clean, 1 partly wrong, 2 another sample's caption).
    """

    def __init__(self, folder: Path, split: str, n: int | None, mean, std):
        images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
        with np.load(folder / f"{split}.npz") as z:
            arrays = {k: z[k] for k in _ARRAYS}
        captions = json.loads((folder / f"{split}_captions.json").read_text())
        n = len(images) if n is None else n
        self.images = np.asarray(images[:n])  # a plain ndarray view of the memory map (faster indexing)
        self.captions = captions[:n]
        for k, v in arrays.items():
            setattr(self, k, v[:n])
        self._scale = (1.0 / (255.0 * torch.tensor(std))).view(3, 1, 1)
        self._shift = (torch.tensor(mean) / torch.tensor(std)).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.captions)

    def _item(self, i: int, image: torch.Tensor) -> dict:
        k = int(self.counts[i])
        return {
            "image": image,
            "caption": self.captions[i],
            "sample_id": i,
            "boxes": torch.from_numpy(self.boxes[i, :k].copy()),
            "mentioned": torch.from_numpy(self.mentioned[i, :k].copy()),
            "label": int(self.labels[i]),
        }

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        img = torch.from_numpy(self.images[i].copy()).permute(2, 0, 1).float()
        return self._item(i, img.mul_(self._scale).sub_(self._shift))

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Batched fetch (``DataLoader`` uses it): one conversion for the whole batch."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        imgs = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float()
        imgs = imgs.mul_(self._scale).sub_(self._shift)
        return [self._item(int(i), im) for i, im in zip(idx, imgs)]

    def scene(self, i: int) -> ports.Scene:
        """The scene graph of item ``i`` (capability ``scenes``): its objects' colour, shape and size names
        and boxes (pixels), from the public arrays."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        return ports.Scene(objects=[
            ports.SceneObject(colour=COLOURS[self.colour[i, k]], shape=SHAPES[self.shape[i, k]],
                              size=SIZES[self.size[i, k]], box=tuple(float(v) for v in self.boxes[i, k]))
            for k in range(int(self.counts[i]))
        ])


# ---------------------------------------------------------------------------------------- unpaired


def text_corpus(p: ShapesParams, folder: Path) -> list[str]:
    """The captions of training scenes train_size .. 2 * train_size - 1 (scene i is a pure function of
    (data_seed, "train", i), as for the cached ones; nothing is drawn), cached in ``folder/TEXT_CORPUS``.
    The sentences of ``pairing: unpaired``: never the caption of a drawn training image (those are scenes
    0 .. train_size - 1), and clean (unpaired data refuses caption_noise, whose replaced captions would
    copy earlier scenes' captions)."""
    path = folder / TEXT_CORPUS
    if path.exists():
        return json.loads(path.read_text())
    N = p.train_size
    texts = [make_scene(p.data_seed, "train", N + j, p).caption for j in range(N)]
    tmp = folder / f".{TEXT_CORPUS}.{os.getpid()}"
    tmp.write_text(json.dumps(texts))
    os.replace(tmp, path)  # several processes may write it at once: each writes whole, the last one wins
    return texts


class ShapesUnpaired(torch.utils.data.Dataset):
    """The unpaired training stream (items: see ``ports.UNPAIRED``).

    Item k: image k of the image corpus ``images`` (``image_id`` k, a training scene index) and sentence
    k of ``texts`` (``text_id`` = ``text_ids[k]``, the training scene the sentence describes: never an
    image-corpus scene). ``sample_id`` k.
    """

    def __init__(self, images: ShapesSplit, texts: list[str], text_ids: list[int]):
        if not len(images) == len(texts) == len(text_ids):
            raise ValueError(f"{len(images)} images, {len(texts)} sentences and {len(text_ids)} text ids")
        self.images = images
        self.texts = texts
        self.text_ids = text_ids

    def __len__(self) -> int:
        return len(self.texts)

    def _item(self, k: int, image: torch.Tensor) -> dict:
        return {"image": image, "image_id": k, "caption": self.texts[k], "text_id": int(self.text_ids[k]),
                "sample_id": k}

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        return self._item(k, self.images[k]["image"])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self._item(int(k), it["image"]) for k, it in zip(indices, self.images.__getitems__(indices))]


def shapes_gallery(images: ShapesSplit, region_size: int) -> BoxGallery:
    """Every object of the image corpus ``images`` as a region of its concept (``CLASS_NAMES``: colour +
    shape as captions write them, e.g. "red circle"), in (image, object) order; cut from the image
    corpus's own pixels and boxes."""
    scene, obj = np.nonzero(np.arange(MAX_OBJECTS)[None, :] < images.counts[:, None])
    concept = images.colour[scene, obj].astype(np.int64) * len(SHAPES) + images.shape[scene, obj]
    load = functools.partial(operator.getitem, images.images)  # image i's pixels (picklable, for loader workers)
    return BoxGallery(CLASS_NAMES, concept, scene, images.boxes[scene, obj], load, MEAN, STD, region_size)


# --------------------------------------------------------------------------------------- documents


def document_bounds(p: ShapesParams, n_scenes: int, stream: int = DOC_STREAM) -> np.ndarray:
    """Document d holds training scenes ``bounds[d] .. bounds[d+1]-1``: consecutive runs of 1..max_images
    scenes (uniform sizes from one stream of (data_seed, DOC_STREAM)), the last one cut at ``n_scenes``.
    The runs do not depend on ``n_scenes``, so a smaller train_fraction keeps a prefix of the documents
    (its last one possibly shorter) and every scene is in exactly one document."""
    u = np.random.default_rng([p.data_seed, stream]).random(n_scenes)
    sizes = 1 + np.minimum((u * p.max_images).astype(np.int64), p.max_images - 1)
    ends = np.cumsum(sizes)
    n_docs = int(np.searchsorted(ends, n_scenes)) + 1  # the first document reaching n_scenes is the last
    return np.concatenate([[0], np.minimum(ends[:n_docs], n_scenes)])


def document_layout(p: ShapesParams, d: int, m: int, stream: int = DOC_STREAM) -> tuple[list[tuple[str, int]], list[str]]:
    """The reading order of document ``d`` with ``m`` scenes, and its filler sentences.

    Texts 0..m-1 are the scenes' sentences (text j belongs to image j); fillers are texts m, m+1, ...
    Image j stands right before its sentence with probability ``image_first_p``, else right after it
    (LCL's rule); each image brings a filler with probability ``filler_sentences``, placed before one
    of the m (image, sentence) units or at the end. A pure function of (data_seed, d, m) and the params;
    the draws for image j do not depend on m (a document cut short keeps its first images' layout).
    """
    k = p.max_images
    u = np.random.default_rng([p.data_seed, stream, d]).random(4 * k)
    units = [[("image", j), ("text", j)] if u[j] < p.image_first_p else [("text", j), ("image", j)] for j in range(m)]
    # (place, image it came with, sentence): place i = before unit i, m = at the end
    drawn = sorted(
        (min(int(u[2 * k + j] * (m + 1)), m), j, FILLERS[min(int(u[3 * k + j] * len(FILLERS)), len(FILLERS) - 1)])
        for j in range(m) if u[k + j] < p.filler_sentences
    )
    layout: list[tuple[str, int]] = []
    for i in range(m + 1):  # fillers are numbered m, m+1, ... in reading order
        layout += [("text", m + n) for n, f in enumerate(drawn) if f[0] == i]
        layout += units[i] if i < m else []
    return layout, [f[2] for f in drawn]


class ShapesDocuments(torch.utils.data.Dataset):
    """The training scenes grouped into interleaved documents (items: see ``ports.INTERLEAVED``).

    ``scenes``: the paired split the documents are made of (``image_ids`` index it); ``bounds``: see
    :func:`document_bounds`; ``stream``: the random stream of the sizes and layouts (DOC_STREAM for
    training, TEST_DOC_STREAM for the held-out documents of the test scenes)."""

    def __init__(self, scenes: "ShapesSplit", p: ShapesParams, stream: int = DOC_STREAM):
        self.scenes = scenes
        self.params = p
        self.stream = stream
        self.bounds = document_bounds(p, len(scenes), stream)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def document(self, d: int) -> tuple[list[int], list[str], list[tuple[str, int]]]:
        """(scene ids, texts, layout) of document ``d``, without pixels."""
        if not 0 <= d < len(self):
            raise IndexError(f"document {d} out of range 0..{len(self) - 1}")
        ids = list(range(int(self.bounds[d]), int(self.bounds[d + 1])))
        layout, fillers = document_layout(self.params, d, len(ids), self.stream)
        return ids, [self.scenes.captions[i] for i in ids] + fillers, layout

    def __getitem__(self, d: int) -> dict:
        d = int(d)
        ids, texts, layout = self.document(d)
        images = torch.stack([it["image"] for it in self.scenes.__getitems__(ids)])
        return {"images": images, "texts": texts, "layout": layout, "sample_id": d, "image_ids": ids}

    def sentences(self) -> list[str]:
        """Every sentence of every document (the scenes' captions and the fillers), in order."""
        return [t for d in range(len(self)) for t in self.document(d)[1]]


class ShapesData(PairedData):
    """The shapes benchmark: ``train`` (a nested prefix of the train split), ``test``, ``zeroshot``;
    ``class_names`` (24, label = colour * 4 + shape) name the ``label`` of single-object images in both
    splits (capability ``labels``).

    With ``pairing: interleaved``, ``train`` holds documents (capability ``interleaved``) and
    ``train_pairs`` the same training scenes as paired items; ``test`` and ``zeroshot`` are unchanged;
    ``test_documents`` groups the test scenes into held-out documents the same way (own random stream).
    With ``pairing: unpaired``, ``train`` is the unpaired stream (:class:`ShapesUnpaired`), ``train_pairs``
    the image corpus as paired items and ``gallery`` its regions (:func:`shapes_gallery`)."""

    colours = COLOURS
    shapes = SHAPES
    class_names = CLASS_NAMES

    def __init__(self, folder: Path, p: ShapesParams):
        n_train = facts(p, folder)["train_images"]
        self.params = p
        self.folder = folder
        self.image_size = p.image_size
        self.mean, self.std = MEAN, STD
        self.capabilities = _provides(p)
        self.train_pairs = ShapesSplit(folder, "train", n_train, MEAN, STD)
        if p.pairing == "interleaved":
            self.train = ShapesDocuments(self.train_pairs, p)
        elif p.pairing == "unpaired":
            texts = text_corpus(p, folder)[:n_train]
            self.train = ShapesUnpaired(self.train_pairs, texts, [p.train_size + j for j in range(n_train)])
            self.gallery = shapes_gallery(self.train_pairs, p.region_size or p.image_size)
        else:
            self.train = self.train_pairs
        self.test = ShapesSplit(folder, "test", None, MEAN, STD)
        # held-out documents of the (clean) test scenes, for evaluator.documents; evaluators that read
        # pairs keep using ``test``
        self.test_documents = ShapesDocuments(self.test, p, TEST_DOC_STREAM) if p.pairing == "interleaved" else None
        single = np.nonzero(self.test.labels >= 0)[0]
        self.zeroshot = ZeroShotSet(
            indices=single.tolist(),
            labels=self.test.labels[single].tolist(),
            class_names=list(CLASS_NAMES),
            prompt="a {}",
        )

    def train_captions(self) -> list[str]:
        """Every training sentence: the documents' (interleaved), the text corpus's (unpaired), else the
        captions."""
        if isinstance(self.train, ShapesDocuments):
            return self.train.sentences()
        if isinstance(self.train, ShapesUnpaired):
            return list(self.train.texts)
        return list(self.train.captions)

    def collate(self, items: list[dict]) -> dict:
        """Documents -> :func:`ports.collate_documents`, unpaired items -> :func:`ports.collate_unpaired`;
        paired items (test, train_pairs) as before."""
        if items and "layout" in items[0]:
            return collate_documents(items)
        if items and "text_id" in items[0]:
            return collate_unpaired(items)
        return default_collate(items)


def _provides(p: ShapesParams) -> frozenset[str]:
    """Interleaved and unpaired data drop ``paired`` (their training items are not pairs); boxes, classes,
    labels and scenes stay: they describe the test split and ``train_pairs``."""
    first = {"paired": {PAIRED}, "interleaved": {INTERLEAVED}, "unpaired": {UNPAIRED, GALLERY}}[p.pairing]
    return frozenset({*first, BOXES, CLASSES, LABELS, SCENES})


def facts(p: ShapesParams, base_dir: Path) -> dict:
    """Exact split sizes and image size: pure functions of the params (nothing is read from disk).
    ``train_images``: training images; ``train_size``: training items (documents when interleaved; one
    per image when unpaired)."""
    n_images = max(1, math.ceil(round(p.train_fraction * p.train_size, 6)))
    n_items = len(document_bounds(p, n_images)) - 1 if p.pairing == "interleaved" else n_images
    return {"train_size": n_items, "train_images": n_images, "test_size": p.test_size, "image_size": p.image_size}


@register("dataset.shapes", params=ShapesParams, output=PairedData, provides=_provides, facts=facts)
def build(params: ShapesParams, inputs: dict, ctx: BuildContext) -> PairedData:
    """Procedural benchmark: coloured shapes on textured backgrounds, captions, boxes, zero-shot classes.

    Each image holds min_objects..max_objects shapes (6 colours x 4 shapes: circle, square, triangle,
    cross; small or large) at random non-overlapping positions on a low-contrast noisy, striped or
    shaded background. Captions name some of the objects with colour, shape, size, position and
    relations (left of / above / next to ...) that are true in the image. Items: ``image`` [3,S,S]
    normalised, ``caption``, ``sample_id``, ``boxes`` [K,4] (pixels), ``mentioned`` [K] (objects the
    caption describes correctly), ``label`` (class of a single-object image, else -1, in both splits:
    capability ``labels``, for evaluator.linear_probe).
    A ``caption_noise`` share of training captions is misaligned: ``noise_partial`` of them have one
    named object's colour or shape changed, the rest carry another sample's caption. The test split is
    disjoint and clean; ``zeroshot_fraction`` of its images have one object and form the zero-shot set
    (24 classes like "red circle", prompt "a {}"). ``train_fraction`` takes the first
    ceil(f * train_size) training samples, so fractions are nested and sample ids stable. Both splits
    are generated once into <cache>/shapes/<hash>/ and shared by every train_fraction.

    ``pairing: interleaved`` (capability ``interleaved`` instead of ``paired``): training items are
    documents, consecutive runs of 1..max_images (uniform) of the same training scenes, each image
    standing before its own sentence with probability image_first_p (0.5, LCL's rule) and after it
    otherwise, so the context before an image sometimes describes it and sometimes not; with
    filler_sentences, each image brings a sentence that describes nothing with that probability. Caption
    noise applies per sentence (a sentence is its scene's caption). ``train_size`` counts images in both
    pairings, so paired and interleaved runs see the same images; the documents' count follows
    (about train_size / ((max_images + 1) / 2)). Items: ``images`` [M,3,S,S], ``texts``, ``layout``,
    ``sample_id``, ``image_ids`` (scene indices); ``train_pairs`` holds the scenes as paired items; the
    test split and zero-shot set are the paired ones (``test_documents``: the test scenes grouped the same
    way, for evaluator.documents). ``max_images: 1`` is paired data as LCL trains on
    it (one image, first or last at p = 0.5). Deviation from LCL: a document's scenes are independent
    (nothing links one image or sentence to the next, unlike a web page).

    ``pairing: unpaired`` (capabilities ``unpaired`` and ``gallery`` instead of ``paired``; VLMixer's
    setting): two corpora of disjoint scenes, so no pair information reaches training. The image corpus
    is training scenes 0..n-1 (n = ceil(train_fraction * train_size): the very images a paired run of the
    same params trains on, so ``train_size`` still counts images); the text corpus is the n captions of
    training scenes train_size..train_size+n-1 (generated like the others, never drawn), so an unpaired
    run sees as many images and as many sentences as a paired run at equal data, from the same
    distribution, but no sentence of its images. Item k: ``image`` (image corpus image k), ``image_id``
    k, ``caption`` (sentence k), ``text_id`` train_size + k, ``sample_id`` k; batches: ``images``,
    ``captions``, ``image_ids``, ``text_ids``, ``sample_ids``. ``gallery``: every object of the image
    corpus as a region of its concept ("red circle": colour + shape, as captions phrase them; 24
    concepts), the box cropped from its image, resized to region_size (default image_size) and normalised
    like the images. ``train_pairs``: the image corpus with its own captions, for frozen-transfer heads
    only (evaluators may see pairs); the test split and zero-shot set are the paired ones. caption_noise
    must be 0 (there are no pairs to misalign). Every pairing also provides ``scenes``: ``split.scene(i)``
    is item i's scene graph (objects with colour, shape, size, box).
    """
    folder = materialise(params, ctx.cache_root, log=ctx.log)
    return ShapesData(folder, params)
