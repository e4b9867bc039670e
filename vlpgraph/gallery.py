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

from vlpgraph.ports import Gallery


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

    def crop(self, image: np.ndarray, box: Sequence[float]) -> torch.Tensor:
        """The pixels of ``box`` (at least one pixel) of a uint8 [H, W, 3] image, resized and normalised."""
        H, W = image.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in box)
        c0 = min(max(int(math.floor(x0)), 0), W - 1)
        r0 = min(max(int(math.floor(y0)), 0), H - 1)
        c1 = max(min(int(math.ceil(x1)), W), c0 + 1)
        r1 = max(min(int(math.ceil(y1)), H), r0 + 1)
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
