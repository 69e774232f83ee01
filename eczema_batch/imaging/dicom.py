"""DICOM objects: the few tags the catalogue needs, and the first frame as RGB uint8.

Why it looks the way it does:

- Privacy. `DicomTags` keeps a subject *code* (ClinicalTrialSubjectID), never a name, birth date
  or any other identifying tag; the pydicom dataset lives only inside one call and no identifying
  element is ever accessed, so its value is never even decoded. A hospital PatientID is read only
  when the caller passes a pseudonym key, and leaves this module as its keyed pseudonym. A tag
  value is never quoted in a message: `subject_problem` says what is wrong, not what the value is.
- `BurnedInAnnotation` or `RecognizableVisualFeatures` = YES says the pixels themselves identify
  the patient (text burnt into the picture, a face): `identifying_pixels` names the tag.
- A multi-frame object is catalogued as its first frame; `DicomTags.frames` records how many it
  has. Only frame 0 is decoded (pydicom decodes a single frame when given `index=0`).
- Reading happens in two steps, `open_dicom` (header and tags) then `OpenedDicom.decode` (pixels),
  so the caller can refuse a decompression bomb from Rows x Columns before anything is allocated.
- Every failure becomes a `RejectedFileError` whose reason tells the user what to do: a missing
  optional decoder names the package to install (and its licence when it is GPL-3, which this
  Apache-2.0 project never installs for you).

Colour: pydicom 3 converts YBR_FULL / YBR_FULL_422 to RGB by default (`raw=False`) and the JPEG
2000 and JPEG decoders undo YBR_ICT / YBR_RCT, so the decoder's output photometric interpretation
is used, not the one in the header. PALETTE COLOR goes through `apply_color_lut`; MONOCHROME1 is
inverted; grayscale of more than 8 bits gets the Modality LUT / rescale and the VOI LUT / window
when present, then a min-max stretch to 0..255, and is replicated to three channels. Colour of more
than 8 bits keeps its high bits (by BitsStored).
"""

from __future__ import annotations

import datetime
import re
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)

from eczema_batch.errors import RejectedFileError
from eczema_batch.identifiers import IdentifierError, normalise_code, pseudonym
from eczema_batch.imaging.camera import camera_name

#: A DICOM Part 10 file has a 128-byte preamble, then these four bytes.
DICM_OFFSET = 128
DICM_MAGIC = b"DICM"

#: Groups a dataset written without preamble/meta header can start with: (0002,xxxx) File Meta
#: Information, (0008,xxxx) Identifying (SOP Common) elements.
_FIRST_GROUPS = (0x0002, 0x0008)
#: Every two-letter DICOM value representation: an explicit-VR dataset has one at bytes 4..5.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
    b"US UT UV".split()
)
#: An implicit-VR first element (group 0008) is a short string: its 32-bit length is small.
_MAX_FIRST_LENGTH = 0x10000

_JPEG2000 = frozenset(dicom_uid.JPEG2000TransferSyntaxes)  # includes HTJ2K
#: A JPEG 2000 frame may be wrapped in JP2 boxes: it then starts with the 12-byte JP2 signature
#: box (length 12, type "jP  ", content 0D 0A 87 0A), and the codestream is in the "jp2c" box.
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JP2_CODESTREAM_BOX = b"jp2c"
#: JPEG 2000 codestream: SOC marker then SIZ marker (Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, ...).
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
#: JPEG frame headers (SOF0-3, 5-7, 9-11, 13-15) and JPEG-LS SOF55 (0xF7) hold the frame size.
_JPEG_FRAME_MARKERS = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC)} | {*range(0xCD, 0xD0), 0xF7}
)
#: Start of scan: past it, no frame header is coming.
_JPEG_SOS = 0xDA
#: Where a frame's header must be: within the first bytes (JP2 boxes may come first).
_HEADER_SEARCH = 65536
_JPEG_LS = frozenset(dicom_uid.JPEGLSTransferSyntaxes)
#: JPEG Lossless, Process 14 (and its Selection Value 1 variant): neither Pillow nor pyjpegls
#: decodes it; python-gdcm or pylibjpeg-libjpeg do.
_LOSSLESS_JPEG = frozenset({dicom_uid.JPEGLossless, dicom_uid.JPEGLosslessSV1})

_NEEDS_DICOM_EXTRA = "JPEG 2000 needs the optional decoder: pip install 'eczema-batch[dicom]'"
#: pyjpegls (MIT; highdicom, in the [dicom] extra, depends on it) or pylibjpeg-libjpeg (GPL-3).
_NEEDS_JPEG_LS = (
    "JPEG-LS needs a decoder that is not installed: pip install pyjpegls (MIT), "
    "or pylibjpeg with pylibjpeg-libjpeg (GPL-3)"
)
_NEEDS_LIBJPEG = (
    "{what} needs a decoder that is not installed: pip install python-gdcm, "
    "or pylibjpeg with pylibjpeg-libjpeg (GPL-3)"
)

#: Pydicom joins the errors of all its plugins under this first line; the useful part follows.
_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins"
_MAX_DETAIL = 120
#: pydicom's message for native pixel data shorter than Rows x Columns x frames x samples needs.
_SHORT_PIXEL_DATA = re.compile(r"less than expected \((\d+) vs (\d+) bytes\)")


@dataclass(frozen=True)
class DicomTags:
    """What the catalogue keeps from a DICOM header; nothing here identifies a person."""

    #: ClinicalTrialSubjectID, normalised (`eczema_batch.identifiers`); else, when a pseudonym key
    #: was given, the keyed pseudonym of PatientID; else None
    subject_code: str | None
    #: "ClinicalTrialSubjectID" | "PatientID-HMAC" | None
    subject_source: str | None
    #: the first valid date of StudyDate, AcquisitionDateTime, AcquisitionDate, ContentDate
    visit_date: datetime.date | None
    #: the keyword of the tag that gave visit_date
    date_source: str | None
    #: ClinicalTrialTimePointID
    timepoint: str | None
    #: BodyPartExamined, else AnatomicRegionSequence[0].CodeMeaning
    body_site: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    modality: str | None
    #: NumberOfFrames, or 1; only the first frame is catalogued
    frames: int
    #: why a subject tag that is present was not used (it never quotes the value), or None
    subject_problem: str | None = None
    #: the tag that says the pixels identify the patient (BurnedInAnnotation,
    #: RecognizableVisualFeatures), or None
    identifying_pixels: str | None = None
    #: Manufacturer and ManufacturerModelName as one "Make Model" (`camera.camera_name`), or None
    device: str | None = None


def first_line(exc: BaseException, limit: int = _MAX_DETAIL) -> str:
    """The first line of an exception's message, cut to `limit` characters, for a reason string."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def looks_like_dataset(head: bytes) -> bool:
    """Whether `head` starts like a DICOM dataset written without the preamble and 'DICM'.

    Such files exist (old writers, pydicom's own test data). We accept them only when the first
    element is in group 0002 or 0008 *and* is followed by a valid explicit VR or a short implicit
    length, so that text or random bytes named .dcm are not read with `force=True`.
    """
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, _element = struct.unpack(order + "HH", head[:4])
        if group not in _FIRST_GROUPS:
            continue
        if head[4:6] in _VRS:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if order == "<" and length < _MAX_FIRST_LENGTH:  # implicit VR is always little endian
            return True
    return False


class OpenedDicom:
    """A parsed DICOM header: its tags and size, and the means to decode the first frame."""

    def __init__(self, ds: Dataset, *, pseudonym_key: bytes | None = None) -> None:
        self._ds = ds
        self._syntax: dicom_uid.UID | None = None
        self.tags = _read_tags(ds, pseudonym_key)
        self.width = _int(ds, "Columns") or 0
        self.height = _int(ds, "Rows") or 0

    def decode(self) -> np.ndarray:
        """The first frame as RGB uint8 (h, w, 3), C-contiguous, at full size."""
        if self.width <= 0 or self.height <= 0:
            raise RejectedFileError("DICOM pixel data cannot be decoded: Rows or Columns missing")
        try:
            return np.ascontiguousarray(self._decode_first_frame())
        except RejectedFileError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # pydicom and its plugins raise many types for broken data
            raise RejectedFileError(_decode_failure_reason(self._syntax, exc)) from exc

    def _decode_first_frame(self) -> np.ndarray:
        ds = self._ds
        self._syntax = transfer_syntax = _transfer_syntax(ds)
        try:
            decoder = get_decoder(transfer_syntax)
        except NotImplementedError:
            raise RejectedFileError(
                f"DICOM pixel data uses {transfer_syntax.name}, which eczema-batch cannot decode"
            ) from None
        if not decoder.is_available:
            raise RejectedFileError(_missing_decoder_reason(transfer_syntax))
        if transfer_syntax.is_encapsulated and "PixelData" in ds:
            if transfer_syntax in _JPEG2000:
                _refuse_looping_jp2(ds.PixelData)
            declared = _declared_size(ds.PixelData, transfer_syntax)
            if declared is not None and declared[0] * declared[1] > self.width * self.height:
                # The plugins (CharLS, OpenJPEG) allocate what the frame says, not what the
                # header says: a corrupt frame header would be a decompression bomb.
                raise RejectedFileError(
                    f"DICOM pixel data cannot be decoded: its frame is {declared[0]}x"
                    f"{declared[1]} but Rows x Columns say {self.width}x{self.height}"
                )
            _allow_pillow_size(self.width * self.height)
        options = as_pixel_options(ds)
        frame, meta = decoder.as_array(ds, index=0, validate=True, raw=False, **options)
        return _to_rgb8(frame, str(meta.get("photometric_interpretation", "")), ds)


def open_dicom(data: bytes, *, pseudonym_key: bytes | None = None) -> OpenedDicom:
    """Parse a DICOM file's header (pixel data stays encoded). Raises RejectedFileError.

    With `pseudonym_key`, a PatientID (when there is no ClinicalTrialSubjectID) becomes the subject
    code as its keyed pseudonym.
    """
    has_preamble = data[DICM_OFFSET : DICM_OFFSET + 4] == DICM_MAGIC
    if not has_preamble and not looks_like_dataset(data[:8]):
        raise RejectedFileError("not an image: content is neither JPEG, PNG nor DICOM")
    try:
        ds = dcmread(BytesIO(data), force=not has_preamble)
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types for broken headers
        raise RejectedFileError(f"DICOM header cannot be read: {first_line(exc)}") from exc
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise RejectedFileError("DICOM has no pixel data")
    return OpenedDicom(ds, pseudonym_key=pseudonym_key)


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# --- tags -----------------------------------------------------------------------------------------


def _read_tags(ds: Dataset, pseudonym_key: bytes | None) -> DicomTags:
    subject_code, subject_source, subject_problem = _subject(ds, pseudonym_key)
    visit_date, date_source = _visit_date(ds)
    body_site = _text(ds, "BodyPartExamined")
    if body_site is None:
        body_site = _first_code_meaning(ds, "AnatomicRegionSequence")
    frames = _int(ds, "NumberOfFrames") or 1
    return DicomTags(
        subject_code=subject_code,
        subject_source=subject_source,
        visit_date=visit_date,
        date_source=date_source,
        timepoint=_text(ds, "ClinicalTrialTimePointID"),
        body_site=body_site,
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
        sop_uid=_uid(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality"),
        frames=max(frames, 1),
        subject_problem=subject_problem,
        identifying_pixels=next(
            (k for k in _IDENTIFYING_PIXELS if (_text(ds, k) or "").upper() == "YES"), None
        ),
        device=camera_name(_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")),
    )


#: Tags whose YES says the pixels identify the patient: text burnt into the picture (names,
#: numbers, dates) or recognisable features such as a face.
_IDENTIFYING_PIXELS = ("BurnedInAnnotation", "RecognizableVisualFeatures")
#: PatientID: the hospital's number (an MRN), sometimes a name; only ever stored as a pseudonym.
PATIENT_ID_SOURCE = "PatientID-HMAC"


def _subject(
    ds: Dataset, pseudonym_key: bytes | None
) -> tuple[str | None, str | None, str | None]:
    """(subject code, its source, why a subject tag present was not used); never quotes a value."""
    problem = None
    keywords = ("ClinicalTrialSubjectID", "PatientID") if pseudonym_key else (
        "ClinicalTrialSubjectID",)
    for keyword in keywords:
        value = _value(ds, keyword)
        if isinstance(value, MultiValue) and len(value) > 1:
            problem = problem or f"{keyword} has {len(value)} values, a subject has one"
            continue
        text = _text(ds, keyword)
        if not text:
            continue
        try:
            if keyword == "PatientID":
                assert pseudonym_key is not None
                return pseudonym(pseudonym_key, text), PATIENT_ID_SOURCE, problem
            return normalise_code(text), keyword, problem
        except IdentifierError as exc:
            problem = problem or f"{keyword} {exc}"
    return None, None, problem


#: Where the visit date comes from, in order of preference.
_DATE_KEYWORDS = ("StudyDate", "AcquisitionDateTime", "AcquisitionDate", "ContentDate")
#: DA is YYYYMMDD; ACR-NEMA 2 wrote YYYY.MM.DD; DT starts with YYYYMMDD.
_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
#: Outside these years a date is a placeholder (00010101, 99991231), not a visit.
_PLAUSIBLE_YEARS = range(1900, 2200)


def _visit_date(ds: Dataset) -> tuple[datetime.date | None, str | None]:
    for keyword in _DATE_KEYWORDS:
        text = _text(ds, keyword)
        match = _DATE.match(text) if text else None
        if match is None:
            continue
        year, month, day = (int(part) for part in match.groups())
        if year not in _PLAUSIBLE_YEARS:
            continue
        try:
            return datetime.date(year, month, day), keyword
        except ValueError:
            continue
    return None, None


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # a malformed value (bad VR, bad number) must not cost the whole image
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = str(value).strip(" \x00\t\r\n")
    return text or None


#: A UID (PS3.5 9.1): numeric components separated by dots, at most 64 characters. Leading zeros,
#: which the standard forbids, are common in real files and harmless, so they are let through.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*", re.ASCII)
_MAX_UID = 64


def is_uid(text: str | None) -> bool:
    return text is not None and len(text) <= _MAX_UID and _UID.fullmatch(text) is not None


def _uid(ds: Dataset, keyword: str) -> str | None:
    """A UID tag's value; None when it is not a UID (it would not fit the catalogue or a name)."""
    text = _text(ds, keyword)
    return text if is_uid(text) else None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _first_code_meaning(ds: Dataset, keyword: str) -> str | None:
    sequence = _value(ds, keyword)
    try:
        return _text(sequence[0], "CodeMeaning") if sequence else None
    except Exception:  # a sequence item that is not a dataset
        return None


# --- pixels ---------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> dicom_uid.UID:
    """The dataset's transfer syntax; for files without one, the encoding pydicom read them with."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return dicom_uid.UID(str(syntax))
    # No meta header (or no 0002,0010): only native pixel data can be read, as stored.
    element = ds["PixelData"] if "PixelData" in ds else None
    if element is not None and element.is_undefined_length:
        raise RejectedFileError(
            "DICOM pixel data cannot be decoded: compressed, but the file has no transfer syntax"
        )
    implicit, little = ds.original_encoding
    if implicit:
        syntax = dicom_uid.ImplicitVRLittleEndian
    elif little:
        syntax = dicom_uid.ExplicitVRLittleEndian
    else:
        syntax = dicom_uid.ExplicitVRBigEndian
    if file_meta is None:
        ds.file_meta = file_meta = FileMetaDataset()
    file_meta.TransferSyntaxUID = syntax
    return syntax


def _missing_decoder_reason(syntax: dicom_uid.UID) -> str:
    if syntax in _JPEG2000:
        return _NEEDS_DICOM_EXTRA
    if syntax in _JPEG_LS:
        return _NEEDS_JPEG_LS
    if syntax in _LOSSLESS_JPEG:
        return _NEEDS_LIBJPEG.format(what="lossless JPEG")
    return f"{syntax.name} needs a decoder that is not installed: see pydicom's decoder docs"


def _decode_failure_reason(syntax: dicom_uid.UID | None, exc: Exception) -> str:
    message = str(exc).strip()
    if message.startswith(_ALL_PLUGINS_FAILED):
        # "...plugins:\n  pillow: broken data stream" -> "broken data stream"
        details = [line.split(":", 1)[-1].strip() for line in message.splitlines()[1:]]
        message = "; ".join(dict.fromkeys(detail for detail in details if detail)) or message
    if syntax == dicom_uid.JPEGExtended12Bit and "12-bit" in message:
        return _NEEDS_LIBJPEG.format(what="12-bit JPEG")
    short = _SHORT_PIXEL_DATA.search(message)
    if short:
        found, expected = short.groups()
        return f"truncated DICOM: pixel data has {found} bytes, its header needs {expected}"
    if "decompression bomb" in message:
        # Pillow read a size from the compressed frame far beyond Rows x Columns.
        message = "the compressed frame declares a far larger image than Rows x Columns"
    detail = first_line(RuntimeError(message))
    return f"DICOM pixel data cannot be decoded: {detail}"


def _declared_size(pixel_data: bytes, syntax: dicom_uid.UID) -> tuple[int, int] | None:
    """(width, height) from the first frame's own JPEG, JPEG-LS or JPEG 2000 header, if readable."""
    items = generate_fragments(pixel_data)
    next(items, None)  # the Basic Offset Table
    frame = next(items, b"")
    if syntax in _JPEG2000:
        start = frame.find(_J2K_SOC_SIZ, 0, _HEADER_SEARCH)
        siz = frame[start + len(_J2K_SOC_SIZ) : start + len(_J2K_SOC_SIZ) + 20]
        if start < 0 or len(siz) < 20:
            return None
        _length, _capabilities, xsiz, ysiz, xosiz, yosiz = struct.unpack(">HHIIII", siz)
        return max(xsiz - xosiz, 0), max(ysiz - yosiz, 0)
    if not frame.startswith(b"\xff\xd8"):  # JPEG and JPEG-LS start with SOI
        return None
    position = 2
    while position + 9 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_FRAME_MARKERS:  # Lf(2) P(1) Y(2) X(2)
            height, width = struct.unpack(">HH", frame[position + 5 : position + 9])
            return width, height
        if marker == _JPEG_SOS:
            return None
        position += 2 + int.from_bytes(frame[position + 2 : position + 4], "big")
    return None


def _refuse_looping_jp2(pixel_data: bytes) -> None:
    """Refuse a JP2-wrapped first frame that would hang pydicom.

    pydicom 3.0's `get_j2k_parameters` walks the JP2 boxes before the codestream box with
    `offset += length` and never ends on a box of length 0 (found by fuzzing corrupt files), so we
    walk them first, the same way, over the first frame's fragments.
    """
    items = generate_fragments(pixel_data)
    next(items, None)  # the Basic Offset Table
    first = next(items, b"")
    if not first.startswith(_JP2_SIGNATURE):
        return
    frame = b"".join([first, *items])  # the walk may cross into later fragments, as pydicom's does
    offset = len(_JP2_SIGNATURE)
    while offset < len(frame):
        if frame[offset + 4 : offset + 8] == _JP2_CODESTREAM_BOX:
            return
        length = int.from_bytes(frame[offset : offset + 4], "big")
        if length == 0:
            raise RejectedFileError(
                "DICOM pixel data cannot be decoded: a JPEG 2000 box has length 0"
            )
        offset += length


def _allow_pillow_size(pixels: int) -> None:
    """Let pydicom's Pillow plugin decode a frame we have already checked against our own limit.

    Pillow refuses frames over 2 x Image.MAX_IMAGE_PIXELS (and warns over 1 x); our limit
    (ECZEMA_BATCH_MAX_IMAGE_PIXELS) is checked before this. The global is only ever raised, to a
    size we accepted, so concurrent calls cannot lower it under one another.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and pixels > current:
        Image.MAX_IMAGE_PIXELS = pixels


def _to_rgb8(frame: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray:
    bits_stored = _int(ds, "BitsStored") or frame.dtype.itemsize * 8
    if frame.ndim == 2:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)[..., :3]  # an Enhanced Palette may add alpha
            # 16-bit LUT entries (descriptor bits = 16) come back as uint16
            return rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8)
        gray = _gray_to_uint8(frame, ds, bits_stored)
        if photometric == "MONOCHROME1":  # 0 is white
            gray = 255 - gray
        return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    if frame.ndim == 3 and frame.shape[2] == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # only if a decoder left it as YCbCr
            frame = convert_color_space(frame, photometric, "RGB")
        elif photometric not in ("RGB", ""):
            raise RejectedFileError(f"DICOM colour space {photometric} is not supported")
        return _colour_to_uint8(frame, bits_stored)
    samples = frame.shape[2] if frame.ndim == 3 else 0
    raise RejectedFileError(
        f"DICOM with {samples} samples per pixel ({photometric or 'unknown'}) is not supported"
    )


def _gray_to_uint8(frame: np.ndarray, ds: Dataset, bits_stored: int) -> np.ndarray:
    if frame.dtype == np.uint8:
        if bits_stored < 8:  # e.g. 1-bit images unpacked to 0/1
            return (frame * (255 // ((1 << bits_stored) - 1))).astype(np.uint8)
        return frame
    values: np.ndarray = frame
    try:
        values = apply_modality_lut(values, ds)  # rescale slope/intercept or Modality LUT
        values = apply_voi_lut(values, ds, index=0)  # VOI LUT or window centre/width
    except Exception:  # a broken LUT or window: fall back to the stored values
        values = frame
    return _stretch(values)


def _colour_to_uint8(frame: np.ndarray, bits_stored: int) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype.kind in "ui":
        shift = min(max(bits_stored, 8), frame.dtype.itemsize * 8) - 8
        clipped = np.clip(frame, 0, None) if frame.dtype.kind == "i" else frame
        return np.minimum(clipped >> shift, 255).astype(np.uint8)
    return _stretch(frame)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max to 0..255: the display range when the header gives none."""
    values = np.nan_to_num(values.astype(np.float32), copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low)) + 0.5
    return scaled.astype(np.uint8)
