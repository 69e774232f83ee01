"""Step 4 of the method: cut the lesion out for the second embedding.

The crop is the mask's bounding box with everything outside the mask zeroed. The mask is at the
image's full size while the pixels may have been decoded at a reduced scale (JPEG draft mode), so
the box is scaled to the pixels and each pixel keeps its value when its centre falls on the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eczema_batch.pipeline.preprocess import check_image, check_mask


@dataclass(frozen=True)
class CropResult:
    """Lesion pixels (uint8, background zeroed) and the box (left, top, right, bottom).

    `box` is in the mask's (full-size) coordinates, right/bottom exclusive. `empty` means the
    mask had no lesion pixel and `pixels` is the whole image (the caller flags it: "SegGPT found
    no lesion: whole image used").
    """

    pixels: np.ndarray
    box: tuple[int, int, int, int]
    empty: bool


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the True pixels, exclusive ends; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_mask(image: np.ndarray, mask: np.ndarray) -> CropResult:
    """The lesion crop of `image` (H, W, 3 uint8) under `mask` (bool, any size, same framing)."""
    image = check_image(image)
    mask = check_mask(mask)
    box = mask_box(mask)
    mask_h, mask_w = mask.shape
    if box is None:
        return CropResult(pixels=image.copy(), box=(0, 0, mask_w, mask_h), empty=True)
    left, top, right, bottom = box
    height, width = image.shape[:2]
    sy, sx = height / mask_h, width / mask_w
    # Pixel box: every pixel that the mask box touches, at least one pixel.
    p_left, p_top = min(math.floor(left * sx), width - 1), min(math.floor(top * sy), height - 1)
    p_right = max(min(math.ceil(right * sx), width), p_left + 1)
    p_bottom = max(min(math.ceil(bottom * sy), height), p_top + 1)
    if (height, width) == (mask_h, mask_w):
        keep = mask[p_top:p_bottom, p_left:p_right]
    else:
        # Mask value at each pixel centre (nearest-exact sampling of the full-size mask).
        rows = np.minimum(((np.arange(p_top, p_bottom) + 0.5) / sy).astype(np.int64), mask_h - 1)
        cols = np.minimum(((np.arange(p_left, p_right) + 0.5) / sx).astype(np.int64), mask_w - 1)
        keep = mask.take(rows, axis=0).take(cols, axis=1)
    region = image[p_top:p_bottom, p_left:p_right]
    # Zero the background by multiplying with the 0/1 mask repeated per channel: numpy's loops
    # over a trailing axis of 3 (boolean indexing, broadcasting) were 5x slower, and this ran
    # for every image of a chunk.
    keep3 = np.repeat(keep.view(np.uint8), 3, axis=1).reshape(region.shape)
    return CropResult(pixels=region * keep3, box=box, empty=False)
