"""Decode one image file (JPEG, PNG or DICOM) to RGB uint8, or reject it with a reason.

Why it works this way:

- Content decides the format (magic bytes), never the file name: a PNG named .jpg is a PNG.
- Every decode reads the header first, checks width x height against `max_pixels`, and only then
  decodes, so a 40,000 x 40,000 PNG header costs a few bytes, not 4.8 GB. Pillow's plugin classes
  are used directly (not `Image.open`), so Pillow's own decompression-bomb check, with its
  process-wide limit, never fires: ours, with the user's setting, is the one the user sees.
- Ingest calls `check_bytes` on bytes it has already read and hashed, to find broken files now and
  not later on a GPU: all the compressed data is decoded, but the full-size pixels are never held
  (ingest keeps only the size), so memory per check stays small whatever the image's size: JPEG
  decodes at 1/8 scale (DCT scaling still decodes every coefficient), PNG's stream is inflated and
  every row checked in 1 MB pieces (`pngcheck.py`). A 14000 x 14000 photo took 2 GB to check in
  full. DICOM still decodes its first frame in full.
- `decode_bytes` returns pixels. It must be fast: no per-pixel Python, and the result is Pillow's
  own buffer (read-only) rather than a second copy. A decode that holds full-size pixels (PNG,
  DICOM, JPEG without DCT scaling) first takes its share of the process's pixel budget
  (`budget.py`), so `run`'s decode threads together stay within it.
- `max_side` is what the models need (448 px): JPEG decodes at 1/2..1/8 scale in Pillow's draft mode
  (a 12 MP photo in a fraction of the time), other formats decode fully and are then shrunk. The
  reported width/height are always the full size after EXIF orientation: masks live at that size.
- Photos become RGB: grayscale and palette are expanded, CMYK converted, alpha dropped, 16-bit
  scaled to 8 bits (high byte).
- Pillow is never told to load truncated images (LOAD_TRUNCATED_IMAGES stays False): a truncated
  file is rejected, as it would otherwise be catalogued with a grey band.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, PngImagePlugin

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging.budget import DECODE_BUDGET
from eczema_batch.imaging.camera import camera_name
from eczema_batch.imaging.dicom import (
    DICM_MAGIC,
    DICM_OFFSET,
    DicomTags,
    first_line,
    looks_like_dataset,
    open_dicom,
)
from eczema_batch.imaging.pngcheck import check_png_data
from eczema_batch.studyfiles import not_regular

Format = Literal["jpeg", "png", "dicom"]

#: JPEG SOI marker followed by the first marker's 0xFF.
JPEG_MAGIC = b"\xff\xd8\xff"
#: The 8-byte PNG signature.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: How many leading bytes `sniff_format` needs: the DICOM preamble (128) and "DICM" (4).
SNIFF_BYTES = DICM_OFFSET + len(DICM_MAGIC)

#: How a complete file ends: JPEG's EOI marker (FF D9 cannot occur inside entropy-coded data) and
#: PNG's IEND chunk. Looked for in the last _END_SEARCH bytes: some cameras append a trailer.
_END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND"}
_END_SEARCH = 4096

NOT_AN_IMAGE = "not an image: content is neither JPEG, PNG nor DICOM"

#: EXIF Orientation value -> the transpose that displays the image upright
#: (the same table as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Orientations that swap width and height.
_SIDEWAYS = frozenset({5, 6, 7, 8})
#: Pillow modes that hold 16-bit (or wider) gray values.
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Before the final resampling, shrink by whole factors until within this factor of the target
#: (Pillow's `reducing_gap`): fast box reduction, then bilinear for the last step.
_REDUCING_GAP = 2.0


@dataclass(frozen=True)
class ImageInfo:
    """What ingest keeps of an image it checked: the full size after EXIF orientation."""

    width: int
    height: int
    format: Format
    dicom: DicomTags | None = None
    #: the camera ("Make Model" from EXIF or DICOM), None when the file does not say
    device: str | None = None
    #: the picture shrunk to `check_bytes`'s sample_side (RGB uint8), when asked for and
    #: allowed (a PNG over PNG_SAMPLE_MAX_PIXELS is not sampled)
    sample: np.ndarray | None = None


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image.

    `pixels` is uint8 (h, w, 3) RGB, C-contiguous and read-only (copy it to change it). It is
    smaller than width x height when `max_side` was given; `width` and `height` are always the full
    size after EXIF orientation, which is what the catalogue stores and the size of its masks.
    """

    pixels: np.ndarray
    width: int
    height: int
    format: Format
    dicom: DicomTags | None = None
    #: the camera ("Make Model" from EXIF or DICOM), None when the file does not say
    device: str | None = None


def sniff_format(head: bytes) -> Format | None:
    """The format of a file from its first bytes (pass at least SNIFF_BYTES), or None.

    Content only: JPEG starts FF D8 FF, PNG with its signature, DICOM has 'DICM' at offset 128 or
    (without preamble) starts with a group 0002/0008 element.
    """
    if head[DICM_OFFSET:SNIFF_BYTES] == DICM_MAGIC:
        return "dicom"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    if looks_like_dataset(head):
        return "dicom"
    return None


def decode_bytes(
    data: bytes, *, max_pixels: int, max_side: int | None = None,
    pseudonym_key: bytes | None = None,
) -> DecodedImage:
    """Decode a whole file's content. Raises RejectedFileError (and only that) for bad content.

    `pseudonym_key`: a DICOM PatientID may become the subject code, as its keyed pseudonym
    (`eczema_batch.identifiers.pseudonym`); without it PatientID is never read.

    Warnings from pydicom and Pillow (a malformed UID, corrupt EXIF) are silenced: a file is either
    decoded or rejected with a reason, and the core never writes to the terminal. (The filter is
    process-wide for the duration of the call, as `warnings.catch_warnings` is before Python 3.14.)
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1, not {max_side}")
    kind = _kind(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dicom":
            return _decode_dicom(data, max_pixels=max_pixels, max_side=max_side,
                                 pseudonym_key=pseudonym_key)
        return _decode_photo(data, kind, max_pixels=max_pixels, max_side=max_side)


def _kind(data: bytes) -> Format:
    """The format its first bytes say; RejectedFileError for an empty file or any other format."""
    if not data:
        raise RejectedFileError("empty file")
    kind = sniff_format(data[:SNIFF_BYTES])
    if kind is None:
        raise RejectedFileError(NOT_AN_IMAGE)
    return kind


#: A PNG has no reduced-scale decode: its sample costs a full decode (3 bytes a pixel). Above
#: this size `check_bytes` gives none, so that ingest still never holds a large photo's pixels.
PNG_SAMPLE_MAX_PIXELS = 8_000_000


def check_bytes(data: bytes, *, max_pixels: int, pseudonym_key: bytes | None = None,
                sample_side: int | None = None) -> ImageInfo:
    """Decode a whole file's content as a check, keeping only its size (see the module's notes).

    Raises RejectedFileError (and only that) for bad content, with the reasons `decode_bytes`
    gives. `pseudonym_key` as in `decode_bytes`. `sample_side`: also keep a copy of the picture
    with this longest side (`ImageInfo.sample`, for the quality measures); a JPEG then decodes at
    the DCT scale that still covers it, a PNG of at most PNG_SAMPLE_MAX_PIXELS is decoded a second
    time in full (its check holds no pixels; a larger one gets no sample), DICOM shrinks the frame
    it decoded anyway.
    """
    kind = _kind(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "png":
            if sample_side is None or _png_pixels(data) > PNG_SAMPLE_MAX_PIXELS:
                return _check_png(data, max_pixels=max_pixels)
            # The sample needs every pixel: one full decode, which accepts and rejects exactly
            # what the check does, rather than the check and then the decode.
            decoded = _decode_photo(data, kind, max_pixels=max_pixels, max_side=sample_side)
            return ImageInfo(decoded.width, decoded.height, "png", device=decoded.device,
                             sample=decoded.pixels)
        if kind == "dicom":
            decoded = _decode_dicom(data, max_pixels=max_pixels, max_side=sample_side,
                                    pseudonym_key=pseudonym_key)
        else:
            # Without a sample, 1 px asked: the largest DCT scaling (1/8), then a resize to
            # nearly nothing.
            decoded = _decode_photo(data, kind, max_pixels=max_pixels, max_side=sample_side or 1)
    return ImageInfo(decoded.width, decoded.height, decoded.format, decoded.dicom,
                     device=decoded.device,
                     sample=decoded.pixels if sample_side is not None else None)


def _png_pixels(data: bytes) -> int:
    """Width x height as the IHDR chunk (always first) declares them; 0 when the file is too short
    to say (the decode then rejects it)."""
    if len(data) < _IHDR_END:
        return 0
    width, height = struct.unpack_from(">II", data, _IHDR_END - 8)
    return int(width) * int(height)


#: Where a PNG's IHDR width and height end: signature (8), chunk length and type (8), 8 bytes.
_IHDR_END = 24


def _check_png(data: bytes, *, max_pixels: int) -> ImageInfo:
    try:
        image = _open(data, "png")
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises SyntaxError, OSError, struct.error... for bad headers
        raise RejectedFileError(_photo_reason("png", data, exc)) from exc
    width, height = image.size
    check_pixel_limit(width, height, max_pixels)
    _after_pixels(image, data, check_png_data(data))
    # Image's own getexif: PngImageFile's would load (decode) the pixels to look for eXIf.
    try:
        orientation = int(Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1))
    except Exception:  # unreadable EXIF: the image as stored, as in decode_bytes
        orientation = 1
    if orientation in _SIDEWAYS:
        width, height = height, width
    return ImageInfo(width, height, "png")


def _after_pixels(image: ImageFile.ImageFile, data: bytes, end: int) -> None:
    """Read the chunks after the pixels with Pillow's own reader, as its full decode would.

    `load_end` is what Pillow's `load` calls once the pixels are decoded; it reads what follows
    them (a chunk cut short there makes the file truncated; eXIf there lands in `info`). Its count
    of IDAT bytes still unread is private (set by `load_prepare` from the one `_open` leaves):
    should a Pillow release rename it, decode the pixels in full instead.
    """
    try:
        if not hasattr(image, _IDAT_PREPARED) or image.fp is None:
            image.load()
        else:
            setattr(image, _IDAT_LEFT, 0)
            image.fp.seek(end)
            image.load_end()
    except MemoryError:
        raise
    except Exception as exc:
        raise RejectedFileError(_photo_reason("png", data, exc)) from exc


#: PngImageFile's private counts of IDAT bytes left to read (`self.__idat`), and the one `_open`
#: leaves for `load_prepare` (Pillow 9-13).
_IDAT_LEFT = "_PngImageFile__idat"
_IDAT_PREPARED = "_PngImageFile__prepare_idat"


def decode_path(path: Path, *, max_pixels: int, max_side: int | None = None) -> DecodedImage:
    """Decode a file. Unknown content is rejected from its first bytes, without reading the rest.

    Only a regular file is read (a FIFO would block, a device never end). Study files are read
    through `eczema_batch.studyfiles` instead, which also keeps to the study folder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise RejectedFileError(f"file cannot be read: {not_regular(mode)}")
            head = file.read(SNIFF_BYTES)
            if head and sniff_format(head) is None:
                raise RejectedFileError(NOT_AN_IMAGE)
            data = head + file.read()
    except OSError as exc:
        raise RejectedFileError(f"file cannot be read: {exc.strerror or first_line(exc)}") from exc
    return decode_bytes(data, max_pixels=max_pixels, max_side=max_side)


def check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    """Reject an image whose header declares more than `max_pixels` (a decompression bomb)."""
    if width <= 0 or height <= 0:
        raise RejectedFileError(f"image has no pixels: its header says {width}x{height}")
    pixels = width * height
    if pixels > max_pixels:
        raise RejectedFileError(
            f"image of {_amount(pixels)} ({width}x{height}) exceeds the limit of "
            f"{_amount(max_pixels)} (ECZEMA_BATCH_MAX_IMAGE_PIXELS)"
        )


def _amount(pixels: int) -> str:
    if pixels >= 100_000_000:
        return f"{pixels / 1e9:.3g} gigapixels"
    if pixels >= 100_000:
        return f"{pixels / 1e6:.3g} megapixels"
    return f"{pixels} pixels"


# --- JPEG and PNG (Pillow) ------------------------------------------------------------------------


def _decode_photo(
    data: bytes, kind: Literal["jpeg", "png"], *, max_pixels: int, max_side: int | None
) -> DecodedImage:
    image: Image.Image
    try:
        image = _open(data, kind)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises SyntaxError, OSError, struct.error... for bad headers
        raise RejectedFileError(_photo_reason(kind, data, exc)) from exc
    full_width, full_height = image.size
    check_pixel_limit(full_width, full_height, max_pixels)
    try:
        if max_side is not None and kind == "jpeg":
            # DCT scaling: decode at 1/2, 1/4 or 1/8 while staying >= max_side on both sides
            image.draft("RGB", (max_side, max_side))
        with DECODE_BUDGET.hold(_decode_bytes_needed(*image.size, max_side)):
            image.load()
            orientation = _orientation(image)  # after load: a PNG's eXIf may follow its pixels
            device = _exif_camera(image)
            image = _fit(_to_rgb(image), max_side)
            if orientation in _UPRIGHT:
                image = image.transpose(_UPRIGHT[orientation])
            pixels = np.asarray(image)
    except MemoryError:
        raise
    except Exception as exc:  # a broken or truncated stream
        raise RejectedFileError(_photo_reason(kind, data, exc)) from exc
    if orientation in _SIDEWAYS:
        full_width, full_height = full_height, full_width
    return _result(pixels, full_width, full_height, kind, device=device)


def _decode_bytes_needed(width: int, height: int, max_side: int | None) -> int:
    """Upper estimate of a decode's memory: Pillow keeps 4 bytes a pixel (RGB included), one
    converted copy, and the full-size array when no max_side shrinks it (DICOM: 16-bit samples
    and their 8-bit RGB)."""
    return width * height * (8 if max_side is not None else 11)


def _open(data: bytes, kind: Literal["jpeg", "png"]) -> ImageFile.ImageFile:
    """Parse the header only. The plugin classes skip Image.open's own bomb check (see above)."""
    if kind == "jpeg":
        return JpegImagePlugin.JpegImageFile(BytesIO(data))
    return PngImagePlugin.PngImageFile(BytesIO(data))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # unreadable EXIF: show the image as stored, as viewers do
        return 1


def _exif_camera(image: Image.Image) -> str | None:
    try:
        exif = image.getexif()
        return camera_name(exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model))
    except Exception:  # unreadable EXIF: the camera is unknown, the picture still fine
        return None


def _photo_reason(kind: Literal["jpeg", "png"], data: bytes, exc: BaseException) -> str:
    name = kind.upper()
    ends_early = _END_MARKERS[kind] not in data[-_END_SEARCH:]
    if ends_early or "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return f"truncated {name}"
    return f"{name} cannot be decoded: {first_line(exc)}"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY:
        wide = np.asarray(image)
        gray = (np.clip(wide, 0, 0xFFFF) >> 8).astype(np.uint8)  # keep the high byte
        return Image.fromarray(np.repeat(gray[:, :, np.newaxis], 3, axis=2))
    # Alpha is dropped; a palette's transparency too (Pillow warns when converting it to RGB).
    image.info.pop("transparency", None)
    return image.convert("RGB")


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longest side is at most max_side (never enlarge)."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (
        max(1, min(max_side, round(width * scale))),
        max(1, min(max_side, round(height * scale))),
    )
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)


# --- DICOM ---------------------------------------------------------------------------------------


def _decode_dicom(
    data: bytes, *, max_pixels: int, max_side: int | None, pseudonym_key: bytes | None
) -> DecodedImage:
    dicom = open_dicom(data, pseudonym_key=pseudonym_key)
    if dicom.width > 0 and dicom.height > 0:  # a missing size is reported by decode()
        check_pixel_limit(dicom.width, dicom.height, max_pixels)
    with DECODE_BUDGET.hold(_decode_bytes_needed(dicom.width, dicom.height, max_side)):
        pixels = dicom.decode()
        if max_side is not None and max(dicom.width, dicom.height) > max_side:
            pixels = np.asarray(_fit(Image.fromarray(pixels), max_side))
    return _result(pixels, dicom.width, dicom.height, "dicom", dicom.tags,
                   device=dicom.tags.device)


def _result(
    pixels: np.ndarray, width: int, height: int, kind: Format, tags: DicomTags | None = None,
    device: str | None = None,
) -> DecodedImage:
    pixels = np.ascontiguousarray(pixels)
    pixels.flags.writeable = False
    return DecodedImage(pixels=pixels, width=width, height=height, format=kind, dicom=tags,
                        device=device)
