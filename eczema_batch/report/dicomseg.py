"""Predicted lesion masks of DICOM images as DICOM Segmentation objects (highdicom).

Each SEG references its source instance, re-read from the study folder; it names the algorithm
(eczema-batch and its version) and, as algorithm parameters, the segmenter (name and weights
digest) and the prompts that made the mask. UIDs derive from the source instance and the mask, so
exporting twice writes the same files. Images whose mask is flagged (SegGPT found no lesion) or
empty are skipped with the reason.

Identifying data. A SEG carries the UIDs that reference its source (study, series, instance,
frame of reference) and nothing else of the patient: highdicom is handed an allow-list copy of the
source (`_referencing_source`), so the Patient and General Study attributes a SEG must have
(type 2) are present and empty, and names, birth dates, hospital numbers, accession numbers,
institutions and stations never reach the file, whatever the source holds. A round trip to the
user's PACS, which needs them, is asked for explicitly (`keep_patient_tags`, the CLI's
`--keep-patient-tags`). Either way a source that cannot be made into a SEG is skipped with a
reason that names the attribute at fault and never quotes a value.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch import __version__
from eczema_batch.catalogue.models import Image, Mask, Patient, Study, Visit
from eczema_batch.errors import EczemaBatchError, RejectedFileError
from eczema_batch.imaging import decode_mask_png
from eczema_batch.imaging.dicom import is_uid
from eczema_batch.output import OutputFolder, safe_name
from eczema_batch.report.queries import (
    HeadInfo,
    check_scope,
    choose_head,
    image_files,
    iter_image_records,
    model_refs,
)
from eczema_batch.studyfiles import CataloguedFile

#: SNOMED CT 49755003 "Morphologically abnormal structure" (DICOM CID 7150 segmentation category)
#: and 43116000 "Eczema" (the property segmented).
CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
PROPERTY = ("43116000", "SCT", "Eczema")
#: Algorithm Source (LO: at most 64 characters); the segmenter's identity is a parameter.
ALGORITHM_SOURCE = "SegGPT prompted by reference masks (arXiv 2504.15193)"
#: Series number of the SEG series (away from the photographs' own series numbers).
SEG_SERIES_NUMBER = 901
log = logging.getLogger(__name__)
#: The UIDs a SEG references its source by; each must be a valid UID or the image is skipped.
_REFERENCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: What highdicom reads from a source to build a SEG of it, besides the patient: the frame's size
#: and geometry, the frame of reference, its instance number and whether it was compressed
#: lossily (carried over).
_FRAME_KEYWORDS = (
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Modality", "InstanceNumber", "Rows",
    "Columns",
    "NumberOfFrames", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
    "SliceThickness", "SpacingBetweenSlices", "LossyImageCompression",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
#: Patient and General Study attributes a SEG must have (type 2: present, may be empty); highdicom
#: reads each of them from the source. Empty unless the user keeps the source's.
_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


class _SourceProblem(Exception):
    """Why a source cannot be made into a SEG; the message never quotes a tag's value."""


@dataclass
class SegExport:
    written: list[Path] = field(default_factory=list)
    #: image id -> why it has no SEG
    skipped: dict[int, str] = field(default_factory=dict)
    head: HeadInfo | None = None


@dataclass(frozen=True)
class _MaskRow:
    id: int
    png: bytes
    model_id: int | None
    prompt_ids: list[Any]
    prompt_similarities: list[Any]
    flag: str | None
    variant: str


def _masks(session: Session, image_ids: list[int], chosen: dict[int, int]) -> dict[int, _MaskRow]:
    """The mask per image: the one its prediction was cropped with, else its newest predicted
    (`run` and `evaluate` share masks: one made from the same prompts is the same mask)."""
    rows = session.execute(
        select(Mask.image_id, Mask.id, Mask.png, Mask.model_id, Mask.prompt_ids,
               Mask.prompt_similarities, Mask.flag, Mask.variant)
        .where(Mask.image_id.in_(image_ids), Mask.kind == "predicted")
        .order_by(Mask.id)
    )
    out: dict[int, _MaskRow] = {}
    for iid, mid, *rest in rows:
        if iid in chosen and chosen[iid] != mid:
            continue
        out[iid] = _MaskRow(mid, *rest)
    return out


def _segmentation(source: Any, mask: np.ndarray, row: _MaskRow, segmenter: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    prompts = ",".join(str(p) for p in row.prompt_ids) or "none"
    sims = ",".join(f"{float(s):.4f}" for s in row.prompt_similarities) or "none"
    algorithm = hd.AlgorithmIdentificationSequence(
        name="eczema-batch",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source=ALGORITHM_SOURCE,
        parameters={"segmenter": segmenter, "mask_variant": row.variant,
                    "prompt_image_ids": prompts, "prompt_similarities": sims},
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="eczema lesion",
        segmented_property_category=hd.sr.CodedConcept(*CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*PROPERTY),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    digest = hashlib.sha256(row.png).hexdigest()
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(entropy_srcs=[
            "eczema-batch SEG series", str(source.SeriesInstanceUID), segmenter]),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[
            "eczema-batch SEG", str(source.SOPInstanceUID), digest]),
        instance_number=int(getattr(source, "InstanceNumber", None) or 1),
        manufacturer="eczema-batch",
        manufacturer_model_name="eczema-batch",
        software_versions=__version__,
        device_serial_number="none",
        content_label="ECZEMA",
        content_description="Eczema lesion (predicted)",
    )
    if "PatientOrientation" not in seg:
        # General Image, type 2C: required (may be empty) when the source has no patient frame,
        # as clinical photographs do not; highdicom leaves it out.
        seg.PatientOrientation = ""
    return seg


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns and logs an invalid value *with* the value: keep both off while a source is
    read, so that a name or birth date never reaches a terminal or a log."""
    logger = logging.getLogger("pydicom")

    def drop(record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)


def _check_reference_uids(source: Any) -> None:
    for keyword in _REFERENCE_UIDS:
        try:
            value = source.get(keyword)
        except Exception:
            value = None
        if not is_uid(str(value).strip("\0 ") if value is not None else None):
            raise _SourceProblem(f"the source's {keyword} is not a valid DICOM UID")


def _referencing_source(source: Any, *, keep_patient_tags: bool) -> Any:
    """What highdicom is given as the source: an allow-list copy, or (kept) the checked source."""
    from pydicom import config
    from pydicom.dataset import Dataset
    from pydicom.multival import MultiValue

    _check_reference_uids(source)
    if keep_patient_tags:
        # highdicom copies these as they are: a malformed one would fail inside it with the
        # value in the message, so each is checked first, by name only.
        with config.strict_reading():
            for keyword in _PATIENT_STUDY:
                try:
                    value = source.get(keyword)
                except Exception:
                    raise _SourceProblem(
                        f"the source's {keyword} is not a valid DICOM value") from None
                if isinstance(value, MultiValue):  # each of them has one value (VM 1)
                    raise _SourceProblem(f"the source's {keyword} has several values")
                if value is None:
                    setattr(source, keyword, "")
        return source
    copy = Dataset()
    for keyword in _REFERENCE_UIDS + _FRAME_KEYWORDS:
        if keyword in source:
            try:
                copy[keyword] = deepcopy(source[keyword])
            except Exception:
                raise _SourceProblem(f"the source's {keyword} cannot be read") from None
    for keyword in _PATIENT_STUDY:
        setattr(copy, keyword, "")
    return copy


def _seg_of(file: CataloguedFile, sop_uid: str | None, mask: np.ndarray, row: _MaskRow,
            segmenter: str, *, keep_patient_tags: bool) -> tuple[Any, str]:
    """(the SEG, its source's SOP Instance UID). Raises _SourceProblem."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # Read under ingest's rules: no link followed, the catalogued content or nothing.
        source = pydicom.dcmread(BytesIO(file.read()))
    except RejectedFileError as exc:
        raise _SourceProblem(f"source DICOM cannot be read: {exc}") from None
    except OSError as exc:
        raise _SourceProblem(f"source DICOM cannot be read: {exc.strerror or 'I/O error'}"
                             ) from None
    except InvalidDicomError:
        raise _SourceProblem("source DICOM cannot be read: not a DICOM file") from None
    seg_source = _referencing_source(source, keep_patient_tags=keep_patient_tags)
    source_uid = str(seg_source.SOPInstanceUID)
    if sop_uid and source_uid != sop_uid:
        raise _SourceProblem("the source file changed since ingest (another SOP Instance UID)")
    if mask.shape != (int(seg_source.Rows), int(seg_source.Columns)):
        raise _SourceProblem(f"mask {mask.shape} does not match the image's size")
    return _segmentation(seg_source, mask, row, segmenter), source_uid


def export_dicom_seg(
    session: Session,
    out_dir: Path,
    *,
    study: str | None = None,
    patient: str | None = None,
    head_id: int | None = None,
    image_root: str | None = None,
    keep_patient_tags: bool = False,
) -> SegExport:
    """Write OUT/<study>/<patient>/<source SOP Instance UID>.seg.dcm for each DICOM image.

    `keep_patient_tags`: copy the source's Patient and Study attributes (name, birth date,
    PatientID, accession number...) into the SEG, for a round trip to the PACS they came from.
    The folder names are `safe_name`s of the study and subject code; an image whose SOP Instance
    UID is not a DICOM UID (digits and dots) is skipped. Nothing is written outside OUT or through
    a symbolic link (eczema_batch/output.py).
    """
    try:
        import highdicom  # noqa: F401
    except ImportError as exc:
        raise EczemaBatchError(
            "DICOM SEG export needs highdicom: pip install 'eczema-batch[dicom]'") from exc

    check_scope(session, study=study, patient=patient)
    head = choose_head(session, head_id=head_id)
    result = SegExport(head=head)
    stmt = (select(Image.id, Study.name, Patient.subject_code, Image.sop_uid)
            .join(Visit, Image.visit_id == Visit.id).join(Patient, Visit.patient_id == Patient.id)
            .join(Study, Patient.study_id == Study.id).where(Image.format == "dicom")
            .order_by(Image.id))
    if study is not None:
        stmt = stmt.where(Study.name == study)
    if patient is not None:
        stmt = stmt.where(Patient.subject_code == patient)
    images = session.execute(stmt).all()
    ids = [row[0] for row in images]
    if not ids:
        return result
    chosen = {r.image_id: r.mask_id for r in iter_image_records(session, head=head, image_ids=ids)
              if r.mask_id is not None}
    masks = _masks(session, ids, chosen)
    files = image_files(session, ids, image_root=image_root)
    refs = model_refs(session)
    with OutputFolder(out_dir) as folder:
        _write_segs(result, folder, images, masks, files, refs,
                    keep_patient_tags=keep_patient_tags)
    return result


def _write_segs(result: SegExport, folder: OutputFolder, images: Any, masks: dict[int, _MaskRow],
                files: dict[int, CataloguedFile], refs: dict[int, Any], *,
                keep_patient_tags: bool) -> None:
    for iid, study_name, code, sop_uid in images:
        row = masks.get(iid)
        if row is None:
            result.skipped[iid] = "no predicted mask: run `eczema-batch run` first"
            continue
        if row.flag:
            result.skipped[iid] = f"mask flagged: {row.flag}"
            continue
        mask = decode_mask_png(row.png)
        if not mask.any():
            result.skipped[iid] = "mask is empty"
            continue
        ref = refs.get(row.model_id) if row.model_id is not None else None
        segmenter = f"{ref.name}@{ref.digest[:16]}" if ref else "unknown"
        try:
            with _quiet_pydicom():
                seg, source_uid = _seg_of(files[iid], sop_uid, mask, row, segmenter,
                                          keep_patient_tags=keep_patient_tags)
                encoded = BytesIO()
                seg.save_as(encoded)
        except _SourceProblem as exc:
            result.skipped[iid] = str(exc)
            continue
        except MemoryError:
            raise
        except Exception as exc:  # highdicom and pydicom raise many types; their messages may
            # quote a value of the source (a name, a birth date), so only the type is kept
            log.info("image %d: no DICOM SEG (%s)", iid, type(exc).__name__)
            result.skipped[iid] = (
                f"a DICOM SEG cannot be made from this source ({type(exc).__name__}; its "
                "values are not shown): check the source with dciodvfy"
            )
            continue
        # source_uid was checked to be a UID (digits and dots): a plain file name.
        with folder.folder(safe_name(study_name)) as in_study, \
                in_study.folder(safe_name(code)) as in_patient:
            in_patient.write_bytes(f"{source_uid}.seg.dcm", encoded.getvalue())
            result.written.append(in_patient.path / f"{source_uid}.seg.dcm")
