"""What a chunk reads: catalogue rows for its images, and their pixels from the study folder.

Pixels are read under ingest's rules (`eczema_batch.studyfiles`: inside the study folder, no link
followed, a regular file) and only while the file is still the one catalogued: its size and
content SHA-256 must be the catalogue's, so a file replaced since ingest (by another picture, a
link, a FIFO) fails alone with its reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Embedding, Image, Mask, Prediction, Study, Visit
from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import DecodedImage, decode_bytes
from eczema_batch.studyfiles import StudyFileGoneError, read_catalogued


@dataclass(frozen=True)
class ImageRow:
    id: int
    study_id: int
    patient_id: int
    #: the study folder (or ECZEMA_BATCH_IMAGE_ROOT/study name) and the path inside it
    root: Path
    rel: str
    width: int
    height: int
    sha256: str
    size_bytes: int

    @property
    def path(self) -> Path:
        return self.root / self.rel


@dataclass(frozen=True)
class ReferencePool:
    """A study's reference images (manual masks) with their whole-image embeddings."""

    ids: np.ndarray
    vectors: np.ndarray
    patients: np.ndarray


def image_rows(
    session: Session, ids: Iterable[int], *, image_root: str | None
) -> dict[int, ImageRow]:
    stmt = (
        select(Image.id, Image.study_id, Visit.patient_id, Image.path, Image.width, Image.height,
               Image.sha256, Image.size_bytes, Study.root, Study.name)
        .join(Visit, Image.visit_id == Visit.id)
        .join(Study, Image.study_id == Study.id)
        .where(Image.id.in_(list(ids)))
    )
    rows = {}
    for iid, sid, pid, path, width, height, sha, size, root, name in session.execute(stmt):
        # Workers on other machines see the study folders mounted under one root, by study name.
        base = Path(image_root) / name if image_root else Path(root)
        rows[iid] = ImageRow(iid, sid, pid, base, path, width, height, sha, size)
    return rows


def vectors(
    session: Session, ids: Iterable[int], *, model_id: int, region: str, variant: str = ""
) -> dict[int, np.ndarray]:
    stmt = select(Embedding.image_id, Embedding.vector).where(
        Embedding.image_id.in_(list(ids)),
        Embedding.model_id == model_id,
        Embedding.region == region,
        Embedding.variant == variant,
    )
    return {iid: np.frombuffer(blob, dtype="<f4") for iid, blob in session.execute(stmt)}


def reference_pools(
    session: Session, study_ids: Iterable[int], *, embedder_id: int
) -> dict[int, ReferencePool]:
    stmt = (
        select(Image.study_id, Image.id, Visit.patient_id, Embedding.vector)
        .join(Visit, Image.visit_id == Visit.id)
        .join(Embedding, Embedding.image_id == Image.id)
        .where(
            Image.study_id.in_(list(study_ids)),
            Image.decode_status == "ok",
            Embedding.model_id == embedder_id,
            Embedding.region == "full",
            Image.id.in_(select(Mask.image_id).where(Mask.kind == "manual")),
        )
        .order_by(Image.id)
    )
    grouped: dict[int, list[tuple[int, int, bytes]]] = defaultdict(list)
    for sid, iid, pid, blob in session.execute(stmt):
        grouped[sid].append((iid, pid, blob))
    pools = {}
    for sid, items in grouped.items():
        pools[sid] = ReferencePool(
            ids=np.array([i for i, _, _ in items], dtype=np.int64),
            patients=np.array([p for _, p, _ in items], dtype=np.int64),
            vectors=np.stack([np.frombuffer(b, dtype="<f4") for _, _, b in items]),
        )
    return pools


def manual_masks(session: Session, ids: Iterable[int]) -> dict[int, tuple[int, bytes]]:
    """image id -> (mask id, PNG) of its manual mask."""
    stmt = select(Mask.image_id, Mask.id, Mask.png).where(
        Mask.image_id.in_(list(ids)), Mask.kind == "manual"
    )
    return {iid: (mid, png) for iid, mid, png in session.execute(stmt)}


def predicted_masks(
    session: Session, ids: Iterable[int], *, variant: str
) -> dict[int, tuple[int, bytes]]:
    stmt = select(Mask.image_id, Mask.id, Mask.png).where(
        Mask.image_id.in_(list(ids)), Mask.kind == "predicted", Mask.variant == variant
    )
    return {iid: (mid, png) for iid, mid, png in session.execute(stmt)}


def predicted_ids(session: Session, ids: Iterable[int], *, head_id: int) -> set[int]:
    stmt = select(Prediction.image_id).where(
        Prediction.image_id.in_(list(ids)), Prediction.head_id == head_id
    )
    return set(session.scalars(stmt))


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
