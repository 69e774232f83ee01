"""Plain functions that write real files and rows for tests."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(size: tuple[int, int] = (64, 48), *, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_jpeg(path: Path, size: tuple[int, int] = (64, 48), *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(size, seed=seed).save(path, format="JPEG", quality=90)
    return path


def write_png(path: Path, size: tuple[int, int] = (64, 48), *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(size, seed=seed).save(path, format="PNG")
    return path


def write_mask(path: Path, size: tuple[int, int], *, box: tuple[int, int, int, int] | None = None
               ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box or (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2)
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask, "L").save(path, format="PNG")
    return path


def truncated_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    photo(size).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


MANIFEST_COLUMNS = ("path", "patient", "visit_date", "body_site", "severity", "mask")


def write_manifest(
    root: Path,
    rows: list[dict[str, str]],
    *,
    columns: tuple[str, ...] = MANIFEST_COLUMNS,
    delimiter: str = ",",
    bom: bool = False,
    line_end: str = "\n",
) -> Path:
    """manifest.csv as a spreadsheet saves it (a European one: `;`, a BOM and CRLF)."""
    lines = [delimiter.join(columns)]
    for row in rows:
        lines.append(delimiter.join(row.get(c, "") for c in columns))
    path = root / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("\ufeff" if bom else "") + line_end.join(lines) + line_end
    path.write_bytes(text.encode("utf-8"))
    return path


def write_dicom(
    path: Path, size: tuple[int, int] = (64, 48), *, seed: int = 0, **tags: object
) -> Path:
    """A VL Photographic Image (native RGB) of a random photo, with extra tags by keyword.

    Values are written as given, invalid ones included (a hostile or broken source).
    """
    from pydicom import uid as dicom_uid
    from pydicom.dataset import Dataset, FileMetaDataset

    with warnings.catch_warnings():  # pydicom warns about the invalid values asked for
        warnings.simplefilter("ignore")
        ds = Dataset()
        ds.SOPClassUID = dicom_uid.VLPhotographicImageStorage
        ds.SOPInstanceUID = dicom_uid.generate_uid(entropy_srcs=[str(path), str(seed)])
        ds.StudyInstanceUID = dicom_uid.generate_uid(entropy_srcs=[str(path.parent), "study"])
        ds.SeriesInstanceUID = dicom_uid.generate_uid(entropy_srcs=[str(path.parent), "series"])
        ds.Modality = "XC"
        ds.PatientName = ds.PatientID = ds.PatientBirthDate = ds.PatientSex = ""
        ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.StudyID = ""
        ds.InstanceNumber = 1
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        pixels = np.asarray(photo(size, seed=seed))
        ds.set_pixel_data(np.ascontiguousarray(pixels), "RGB", 8, generate_instance_uid=False)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return path
