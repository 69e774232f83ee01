"""Write a synthetic photograph as a DICOM VL Photographic Image.

Two encodings, as clinical archives hold both: uncompressed RGB (Explicit VR Little Endian,
planar configuration 0) and JPEG baseline (the JPEG bytes Pillow makes, encapsulated, YBR_FULL_422).
Identity is a subject code only: Patient's Name is present but empty, there is no birth date.
UIDs derive from the study seed, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLPhotographicImageStorage,
    generate_uid,
)
from pydicom.valuerep import VR

from eczema_batch.synth.plan import BODY_PART, Format, ImageSpec

#: JPEG quality inside DICOM when no visit's camera conditions give one (see camera.QUALITY)
JPEG_QUALITY = 90


def _uid(seed: int, *parts: str) -> UID:
    return generate_uid(entropy_srcs=["eczema-batch synthetic study", str(seed), *parts])


def study_uid(seed: int, spec: ImageSpec) -> UID:
    """One Study Instance UID per visit."""
    return _uid(seed, "study", spec.patient.code, spec.visit_date.isoformat())


def series_uid(seed: int, spec: ImageSpec) -> UID:
    """One Series Instance UID per visit (the visit's photographs)."""
    return _uid(seed, "series", spec.patient.code, spec.visit_date.isoformat())


def instance_uid(seed: int, spec: ImageSpec) -> UID:
    """One SOP Instance UID per picture."""
    return _uid(seed, "instance", spec.path)


def encode_jpeg(rgb: NDArray[np.uint8], quality: int = JPEG_QUALITY, subsampling: int = 0) -> bytes:
    """JPEG baseline bytes of an RGB picture (Pillow; deterministic). subsampling: Pillow's
    0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def build_dataset(rgb: NDArray[np.uint8], spec: ImageSpec, seed: int, *,
                  quality: int = JPEG_QUALITY) -> Dataset:
    """The DICOM dataset (with file meta) of one picture; `spec.format` picks the encoding."""
    compressed = spec.format is Format.DICOM_JPEG
    sop_uid = instance_uid(seed, spec)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLPhotographicImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    day = spec.visit_date.strftime("%Y%m%d")
    # SOP Common, General Study, Patient, Clinical Trial Subject
    ds.SOPClassUID = VLPhotographicImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = day
    ds.StudyTime = "090000"
    ds.SeriesTime = "090000"
    ds.ContentTime = f"09{spec.site_index % 60:02d}00"  # a minute apart
    ds.AccessionNumber = ""
    ds.Modality = "XC"
    ds.Manufacturer, ds.ManufacturerModelName = spec.patient.camera
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic eczema photographs"
    ds.SeriesDescription = "Clinical photographs"
    ds.PatientName = ""
    ds.PatientID = spec.patient.code
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ClinicalTrialSponsorName = "eczema-batch synthetic study"
    ds.ClinicalTrialProtocolID = f"SYNTH-{seed}"
    ds.ClinicalTrialProtocolName = ""
    ds.ClinicalTrialSiteID = ""
    ds.ClinicalTrialSiteName = ""
    ds.ClinicalTrialSubjectID = spec.patient.code
    ds.BodyPartExamined = BODY_PART[spec.body_site]
    ds.StudyInstanceUID = study_uid(seed, spec)
    ds.SeriesInstanceUID = series_uid(seed, spec)
    ds.StudyID = f"V{spec.visit_index + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = spec.site_index + 1
    ds.PatientOrientation = ""
    ds.ContentSequence = Sequence()  # Acquisition Context (type 2: present, empty)
    ds.BurnedInAnnotation = "NO"

    rows, cols = rgb.shape[:2]
    if not compressed:
        ds.LossyImageCompression = "00"
        ds.set_pixel_data(np.ascontiguousarray(rgb), "RGB", 8, generate_instance_uid=False)
        return ds
    jpeg = encode_jpeg(rgb, quality=quality, subsampling=1)  # 4:2:2, as YBR_FULL_422 says
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{rows * cols * 3 / len(jpeg):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([jpeg])
    # PS3.5 A.4: encapsulated pixel data is OB of undefined length
    elem = ds["PixelData"]
    elem.VR = VR.OB
    elem.is_undefined_length = True
    return ds


def write_dicom(path: Path, rgb: NDArray[np.uint8], spec: ImageSpec, seed: int, *,
                quality: int = JPEG_QUALITY) -> None:
    """Write one picture as a DICOM Part 10 file (its JPEG at `quality`)."""
    build_dataset(rgb, spec, seed, quality=quality).save_as(path, enforce_file_format=True)
