"""Concept galleries cut from object boxes (``ports.Gallery``), shared by dataset.shapes and dataset.unpaired.

A region is one object box of one image of the image corpus, labelled with its concept. Nothing is cut
in advance: the index (concept, image, box per region) is a few arrays, and ``region(rid)`` crops the
box from the source image, resizes it to ``region_size`` x ``region_size`` (bilinear, antialiased; the
aspect ratio is not kept, as a box fed to a tower as an image) and normalises it like the data's images.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlpgraph.engine.ports import Gallery


class BoxGallery(Gallery):
    """Regions from boxes.

    names: every concept a region may have (index -> phrase); ``concepts`` keeps those with a region, in
    this order. region_concept [R] (index into ``names``), region_image [R] (the source image_id passed to
    ``load``), boxes [R, 4] (x0, y0, x1, y1 in pixels of the loaded image). load(image_id) -> uint8
    [H, W, 3]. mean/std: the data's normalisation (per channel, on [0, 1] values).
    """

    def __init__(self, names: Sequence[str], region_concept: np.ndarray, region_image: np.ndarray,
                 boxes: np.ndarray, load: Callable[[int], np.ndarray], mean, std, region_size: int):
        self.names = list(names)
        self.region_concept = np.asarray(region_concept, dtype=np.int64)
        self.region_image = np.asarray(region_image, dtype=np.int64)
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.load = load
        self.region_size = int(region_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        order = np.argsort(self.region_concept, kind="stable")  # each concept's regions in region order
        starts = np.searchsorted(self.region_concept[order], np.arange(len(self.names) + 1))
        self._by_concept = {self.names[c]: order[starts[c]:starts[c + 1]].tolist()
                            for c in range(len(self.names)) if starts[c + 1] > starts[c]}
        self.concepts = [n for n in self.names if n in self._by_concept]

    def __len__(self) -> int:
        return len(self.region_concept)

    def regions(self, concept: str) -> list[int]:
        return list(self._by_concept.get(concept, []))

    @staticmethod
    def bounds(shape: tuple[int, ...], box: Sequence[float]) -> tuple[int, int, int, int]:
        """The pixel rows/columns a box covers in an image of ``shape`` (H, W, ...): (c0, r0, c1, r1), at
        least one pixel, clipped to the image."""
        H, W = shape[:2]
        x0, y0, x1, y1 = (float(v) for v in box)
        c0 = min(max(int(math.floor(x0)), 0), W - 1)
        r0 = min(max(int(math.floor(y0)), 0), H - 1)
        return c0, r0, max(min(int(math.ceil(x1)), W), c0 + 1), max(min(int(math.ceil(y1)), H), r0 + 1)

    def crop(self, image: np.ndarray, box: Sequence[float]) -> torch.Tensor:
        """The pixels of ``box`` of a uint8 [H, W, 3] image, resized and normalised."""
        c0, r0, c1, r1 = self.bounds(image.shape, box)
        patch = torch.from_numpy(np.ascontiguousarray(image[r0:r1, c0:c1])).permute(2, 0, 1).float().div_(255.0)
        s = self.region_size
        patch = F.interpolate(patch[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        return (patch - self._mean) / self._std

    def region(self, rid: int) -> tuple[torch.Tensor, str, int, tuple[float, float, float, float]]:
        rid = int(rid)
        if not 0 <= rid < len(self):
            raise IndexError(f"region {rid} out of range 0..{len(self) - 1}")
        image_id = int(self.region_image[rid])
        box = tuple(float(v) for v in self.boxes[rid])
        return self.crop(self.load(image_id), box), self.names[self.region_concept[rid]], image_id, box

    def region_images(self, rids: Sequence[int]) -> torch.Tensor:
        """Float[K, 3, region_size, region_size] of regions ``rids``: the same pixels as ``region(rid)``.

        When the source images share one size and no box is larger than a region (every shapes gallery),
        all crops are resampled in one ``grid_sample`` call at the very positions ``F.interpolate`` reads on
        each crop (pixel centres, clamped to the crop): measured on the shared 2-core machine at 32 px, 256
        regions take ~13 ms (~50 us a region, half of it grid_sample) against ~130 us a region one by one.
        Otherwise region by region (antialiased).
        """
        rids = [int(r) for r in rids]
        s = self.region_size
        if not rids:
            return torch.empty(0, 3, s, s)
        images = [self.load(int(self.region_image[r])) for r in rids]
        if len({im.shape for im in images}) > 1:
            return torch.stack([self.region(r)[0] for r in rids])
        H, W = images[0].shape[:2]
        box = self.boxes[rids]  # bounds() for every box at once
        c0 = np.clip(np.floor(box[:, 0]), 0, W - 1)
        r0 = np.clip(np.floor(box[:, 1]), 0, H - 1)
        c1 = np.maximum(np.minimum(np.ceil(box[:, 2]), W), c0 + 1)
        r1 = np.maximum(np.minimum(np.ceil(box[:, 3]), H), r0 + 1)
        if ((c1 - c0) > s).any() or ((r1 - r0) > s).any():
            return torch.stack([self.region(r)[0] for r in rids])
        c0, r0, c1, r1 = (torch.from_numpy(v.astype(np.float32)) for v in (c0, r0, c1, r1))
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)  # [K, 3, H, W]
        t = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # output pixel centres, in [0, 1]

        def positions(lo, hi, size):  # [K, s] pixel-index positions, clamped to the crop, as grid coords
            pos = torch.minimum(torch.maximum(lo[:, None] + t * (hi - lo)[:, None] - 0.5, lo[:, None]), hi[:, None] - 1)
            return pos * (2.0 / max(size - 1, 1)) - 1.0

        xs, ys = positions(c0, c1, W), positions(r0, r1, H)
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # [K, s, s, (x, y)]
        out = F.grid_sample(batch, grid, mode="bilinear", align_corners=True)
        return (out - self._mean) / self._std
