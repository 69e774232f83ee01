"""Images in, RGB uint8 out: JPEG and PNG photos, DICOM objects, and lesion masks.

Every function here rejects a bad file with `RejectedFileError` and a reason the user can act on;
nothing else escapes for any input bytes (MemoryError aside: that is the machine, not the file).
"""

from eczema_batch.imaging.dicom import DicomTags
from eczema_batch.imaging.masks import decode_mask_png, encode_mask_png, read_mask
from eczema_batch.imaging.photo import (
    SNIFF_BYTES,
    DecodedImage,
    Format,
    ImageInfo,
    check_bytes,
    check_pixel_limit,
    decode_bytes,
    decode_path,
    sniff_format,
)

__all__ = [
    "SNIFF_BYTES",
    "DecodedImage",
    "DicomTags",
    "Format",
    "ImageInfo",
    "check_bytes",
    "check_pixel_limit",
    "decode_bytes",
    "decode_mask_png",
    "decode_path",
    "encode_mask_png",
    "read_mask",
    "sniff_format",
]
