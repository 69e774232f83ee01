"""Predicted lesion masks of DICOM images as DICOM Segmentation objects (highdicom).

Each SEG references its source instance, re-read from the study folder so the patient, study and
frame attributes are the source's own; it names the algorithm (eczema-batch and its version) and,
as algorithm parameters, the segmenter (name and weights digest) and the prompts that made the
mask. UIDs derive from the source instance and the mask, so exporting twice writes the same files.
Images whose mask is flagged (SegGPT found no lesion) or empty are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import re
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
from eczema_batch.report.queries import (
    HeadInfo,
    check_scope,
    choose_head,
    image_files,
    iter_image_records,
    model_refs,
)

#: SNOMED CT 49755003 "Morphologically abnormal structure" (DICOM CID 7150 segmentation category)
#: and 43116000 "Eczema" (the property segmented).
CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
PROPERTY = ("43116000", "SCT", "Eczema")
#: Algorithm Source (LO: at most 64 characters); the segmenter's identity is a parameter.
ALGORITHM_SOURCE = "SegGPT prompted by reference masks (arXiv 2504.15193)"
#: Series number of the SEG series (away from the photographs' own series numbers).
SEG_SERIES_NUMBER = 901
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
    """The mask per image: the one its prediction was cropped with, else its newest predicted."""
    rows = session.execute(
        select(Mask.image_id, Mask.id, Mask.png, Mask.model_id, Mask.prompt_ids,
               Mask.prompt_similarities, Mask.flag, Mask.variant)
        .where(Mask.image_id.in_(image_ids), Mask.kind == "predicted",
               # evaluation's per-fold masks (variant "...:p<prompt set>") are not results
               ~Mask.variant.like("%:p%"))
        .order_by(Mask.id)
    )
    out: dict[int, _MaskRow] = {}
    for iid, mid, *rest in rows:
        if iid in chosen and chosen[iid] != mid:
            continue
        out[iid] = _MaskRow(mid, *rest)
    return out


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._") or "unnamed"


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


def export_dicom_seg(
    session: Session,
    out_dir: Path,
    *,
    study: str | None = None,
    patient: str | None = None,
    head_id: int | None = None,
    image_root: str | None = None,
) -> SegExport:
    """Write OUT/<study>/<patient>/<source SOP Instance UID>.seg.dcm for each DICOM image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    for iid, study_name, code, sop_uid in images:
        row = masks.get(iid)
        if row is None:
            result.skipped[iid] = "no predicted mask: run `eczema-batch run` first"
            continue
        if row.flag:
            result.skipped[iid] = f"mask flagged: {row.flag}"
            continue
        try:
            source = pydicom.dcmread(BytesIO(files[iid].read()))  # ingest's rules, same content
        except (RejectedFileError, OSError, InvalidDicomError) as exc:
            result.skipped[iid] = f"source DICOM cannot be read: {exc}"
            continue
        if sop_uid and str(source.SOPInstanceUID) != sop_uid:
            result.skipped[iid] = "the source file changed since ingest (another SOP Instance UID)"
            continue
        mask = decode_mask_png(row.png)
        if mask.shape != (int(source.Rows), int(source.Columns)):
            result.skipped[iid] = f"mask {mask.shape} does not match the image's size"
            continue
        if not mask.any():
            result.skipped[iid] = "mask is empty"
            continue
        ref = refs.get(row.model_id) if row.model_id is not None else None
        segmenter = f"{ref.name}@{ref.digest[:16]}" if ref else "unknown"
        seg = _segmentation(source, mask, row, segmenter)
        target = out_dir / _safe(study_name) / _safe(code) / f"{source.SOPInstanceUID}.seg.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(target)
        result.written.append(target)
    return result
