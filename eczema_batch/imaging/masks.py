"""Lesion masks: manual mask files from a study folder, and the 1-bit PNGs the catalogue stores.

A manual mask is a PNG the size of its image (after EXIF orientation) in which nonzero means lesion.
Annotation tools save them in every PNG mode, so the rule is:

- 1, L, I, I;16: nonzero is lesion.
- RGB: any nonzero channel is lesion.
- RGBA and LA (and palettes, read through their colours): when the alpha channel varies, the mask
  was painted on a transparent layer and alpha > 0 is lesion, whatever colour the transparent
  pixels hide; when alpha is uniform (an opaque image saved with alpha), the colour decides as
  for RGB / L.

A mask with no lesion pixel, or one that is lesion everywhere (usually an inverted mask: lesion
black on white), is rejected: neither can prompt the segmenter. The catalogue stores masks as
1-bit PNG (`encode_mask_png`), which `decode_mask_png` reads back exactly.
"""

from __future__ import annotations

import warnings
from io import BytesIO

import numpy as np
from PIL import Image, PngImagePlugin

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging.dicom import first_line
from eczema_batch.imaging.photo import PNG_MAGIC

#: zlib level for stored masks. Measured on synthetic lesion masks: level 9 took 1.8 ms a mask
#: for 10% fewer bytes than level 6 (0.3 ms); ingest and the pipeline write one per image.
_COMPRESS_LEVEL = 6


def read_mask(data: bytes, *, image_size: tuple[int, int]) -> np.ndarray:
    """A manual mask file -> bool (height, width), True = lesion. image_size is (width, height)."""
    with warnings.catch_warnings():  # a mask is read or rejected; Pillow's warnings are noise
        warnings.simplefilter("ignore")
        return _read_mask(data, image_size)


def _read_mask(data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    image = _open_png(data)
    if image.size != tuple(image_size):
        mask_width, mask_height = image.size
        width, height = image_size
        raise RejectedFileError(
            f"mask is {mask_width}x{mask_height} but its image is {width}x{height}"
        )
    mask = _lesion(_load(image))
    if not mask.any():
        raise RejectedFileError("mask has no lesion pixels (all zero)")
    if mask.all():
        raise RejectedFileError(
            "mask is lesion everywhere (no zero pixels): is it inverted? "
            "Lesion must be nonzero on a zero background"
        )
    return mask


def encode_mask_png(mask: np.ndarray) -> bytes:
    """bool (h, w) -> a 1-bit PNG (nonzero input counts as True)."""
    array = np.asarray(mask)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"a mask is a non-empty 2-D array, not shape {array.shape}")
    if array.dtype != np.bool_:
        array = array != 0
    height, width = array.shape
    # Pillow's raw "1" layout is numpy's packbits: 8 pixels a byte, MSB first, rows padded.
    image = Image.frombytes("1", (width, height), np.packbits(array, axis=1).tobytes())
    buffer = BytesIO()
    image.save(buffer, format="PNG", compress_level=_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """A stored mask PNG -> bool (h, w); the exact inverse of encode_mask_png.

    Masks in other PNG modes are read with the rule in the module docstring.
    """
    return _lesion(_load(_open_png(data)))


def _open_png(data: bytes) -> PngImagePlugin.PngImageFile:
    if not data:
        raise RejectedFileError("mask is an empty file")
    if not data.startswith(PNG_MAGIC):
        raise RejectedFileError("mask is not a PNG image")
    try:
        return PngImagePlugin.PngImageFile(BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises SyntaxError, struct.error... for broken headers
        raise RejectedFileError(f"mask PNG cannot be decoded: {first_line(exc)}") from exc


def _load(image: PngImagePlugin.PngImageFile) -> Image.Image:
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt stream
        if "truncated" in str(exc) or isinstance(exc, EOFError):
            raise RejectedFileError("truncated mask PNG") from exc
        raise RejectedFileError(f"mask PNG cannot be decoded: {first_line(exc)}") from exc
    return image


def _lesion(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        width, height = image.size
        packed = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, -1)
        return np.unpackbits(packed, axis=1, count=width).view(np.bool_)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA"):
        array = np.asarray(image)
        alpha = array[:, :, -1]
        if alpha.min() != alpha.max():
            return alpha > 0
        return np.asarray(array[:, :, :-1].any(axis=2))
    if mode == "RGB":
        return np.asarray(np.asarray(image).any(axis=2))
    if mode not in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = image.convert("L")
    return np.asarray(image) != 0
