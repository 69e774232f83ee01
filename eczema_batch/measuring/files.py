"""A catalogued image's pixels, read from its study folder.

Pixels are read under ingest's rules (`eczema_batch.studyfiles`: inside the study folder, no link
followed, a regular file) and only while the file is still the one catalogued: its size and
content SHA-256 must be the catalogue's, so a file replaced since ingest (by another picture, a
link, a FIFO) fails alone with its reason.
"""

from __future__ import annotations

from eczema_batch.catalogue.measurements import ImageRow
from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import DecodedImage, decode_bytes
from eczema_batch.studyfiles import StudyFileGoneError, read_catalogued


def load_pixels(row: ImageRow, *, max_pixels: int, max_side: int) -> DecodedImage:
    """Decode at reduced scale where the format allows; a clear reason when it cannot be read."""
    try:
        data = read_catalogued(row.root, row.rel, size_bytes=row.size_bytes, sha256=row.sha256)
    except StudyFileGoneError as exc:
        raise RejectedFileError(
            "the image file is gone from the study folder (moved or deleted): ingest the folder "
            "again, or mount it where the catalogue says (ECZEMA_BATCH_IMAGE_ROOT)"
        ) from exc
    return decode_bytes(data, max_pixels=max_pixels, max_side=max_side)
