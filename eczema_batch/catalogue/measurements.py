"""What measuring reads from the catalogue and what it writes back, for `run` and `evaluate` alike.

Reads: the images' rows (where their files are), the references of their studies with their
whole-image embeddings, manual masks, and results already stored (`CatalogueStore`, the method's
`Store`). Writes: one `save` for everything `pipeline.measure` made, as typed rows built here,
with INSERT ... ON CONFLICT DO UPDATE ... RETURNING, so a crop embedding points at the mask it was
cut with and a prediction at its crop without reading back ids just written. Results are keyed on
(image, model identity, mask key): saving the same result twice changes nothing but its values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import (
    Base,
    Embedding,
    Image,
    Mask,
    Prediction,
    Study,
    Visit,
    mean_prompt_similarity,
)
from eczema_batch.clock import utcnow
from eczema_batch.imaging import encode_mask_png
from eczema_batch.pipeline.records import Keyed, Measurement, References, StoredMask


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
class Targets:
    """The catalogue ids of what a run computes with."""

    embedder_id: int
    segmenter_id: int | None
    head_id: int | None


def image_rows(session: Session, ids: Iterable[int], *, image_root: str | None
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


def reference_pools(session: Session, study_ids: Iterable[int], *, embedder_id: int
                    ) -> dict[int, References]:
    """Per study: its readable images with a manual mask that have a whole-image embedding."""
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
    return {
        sid: References(
            ids=np.array([i for i, _, _ in items], dtype=np.int64),
            vectors=np.stack([np.frombuffer(b, dtype="<f4") for _, _, b in items]),
            patients=np.array([p for _, p, _ in items], dtype=np.int64),
        )
        for sid, items in grouped.items()
    }


def manual_mask_pngs(session: Session, ids: Iterable[int]) -> dict[int, tuple[int, bytes]]:
    """image id -> (mask id, PNG) of its manual mask."""
    stmt = select(Mask.image_id, Mask.id, Mask.png).where(
        Mask.image_id.in_(list(ids)), Mask.kind == "manual"
    )
    return {iid: (mid, png) for iid, mid, png in session.execute(stmt)}


def manual_masks(session: Session, ids: Iterable[int]) -> dict[int, StoredMask]:
    return {iid: StoredMask(mid, png) for iid, (mid, png) in manual_mask_pngs(session, ids).items()}


def vectors(session: Session, ids: Iterable[int], *, model_id: int, region: str,
            variant: str = "") -> dict[int, np.ndarray]:
    stmt = select(Embedding.image_id, Embedding.vector).where(
        Embedding.image_id.in_(list(ids)),
        Embedding.model_id == model_id,
        Embedding.region == region,
        Embedding.variant == variant,
    )
    return {iid: np.frombuffer(blob, dtype="<f4") for iid, blob in session.execute(stmt)}


def predicted_ids(session: Session, ids: Iterable[int], *, head_id: int) -> set[int]:
    stmt = select(Prediction.image_id).where(
        Prediction.image_id.in_(list(ids)), Prediction.head_id == head_id
    )
    return set(session.scalars(stmt))


def mark_unreadable(session: Session, failed: Mapping[int, str]) -> None:
    """Record why each image cannot be read: later runs leave it out until `--retry-failed`."""
    for iid, reason in failed.items():
        session.execute(update(Image).where(Image.id == iid).values(decode_status=reason[:200]))


class CatalogueStore:
    """The method's `Store` over one session and embedder identity."""

    def __init__(self, session: Session, *, embedder_id: int) -> None:
        self.session, self.embedder_id = session, embedder_id

    def full_vectors(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
        return vectors(self.session, image_ids, model_id=self.embedder_id, region="full")

    def crop_vectors(self, keys: Sequence[Keyed]) -> dict[Keyed, np.ndarray]:
        if not keys:
            return {}
        # One query for the lot: with prompt-set keys nearly every image has its own variant.
        by_variant = {k.variant: k for _, k in keys}
        wanted = set(keys)
        rows = self.session.execute(
            select(Embedding.image_id, Embedding.variant, Embedding.vector).where(
                Embedding.image_id.in_({iid for iid, _ in keys}),
                Embedding.model_id == self.embedder_id, Embedding.region == "crop",
                Embedding.variant.in_(list(by_variant)),
            )
        )
        found: dict[Keyed, np.ndarray] = {}
        for iid, variant, blob in rows:
            k = (iid, by_variant[variant])
            if k in wanted:
                found[k] = np.frombuffer(blob, dtype="<f4")
        return found

    def masks(self, keys: Sequence[Keyed]) -> dict[Keyed, StoredMask]:
        if not keys:
            return {}
        by_variant = {k.variant: k for _, k in keys}
        rows = self.session.execute(
            select(Mask.image_id, Mask.variant, Mask.id, Mask.png).where(
                Mask.image_id.in_({iid for iid, _ in keys}), Mask.kind == "predicted",
                Mask.variant.in_(list(by_variant)),
            )
        ).all()
        wanted = set(keys)
        out = {}
        for iid, variant, mid, png in rows:
            k = (iid, by_variant[variant])
            if k in wanted:
                out[k] = StoredMask(mid, png)
        return out


# -- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRow:
    image_id: int
    variant: str
    model_id: int | None
    prompt_ids: list[int]
    prompt_similarities: list[float]
    prompt_similarity: float | None
    width: int
    height: int
    area_fraction: float
    png: bytes
    flag: str | None
    kind: str = "predicted"
    source_path: str | None = None


@dataclass(frozen=True)
class EmbeddingRow:
    image_id: int
    model_id: int
    region: str
    variant: str
    mask_id: int | None
    dim: int
    vector: bytes

    @classmethod
    def of(cls, image_id: int, model_id: int, region: str, variant: str, mask_id: int | None,
           vector: np.ndarray) -> EmbeddingRow:
        return cls(image_id, model_id, region, variant, mask_id, int(vector.shape[0]),
                   np.asarray(vector, dtype="<f4").tobytes())


@dataclass(frozen=True)
class PredictionRow:
    image_id: int
    head_id: int
    embedding_id: int | None
    severity: int
    probabilities: list[float]


def _upsert_returning(session: Session, model: type[Base], rows: Sequence[Any],
                      keys: tuple[str, ...], returning: Sequence[Any]) -> list[Any]:
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    values = [{**asdict(row), "created_at": now} for row in rows]
    insert = insert_fn(model)
    stmt = insert.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: insert.excluded[c] for c in values[0] if c not in keys},
    ).returning(*returning)
    return list(session.execute(stmt, values).all())


def save(session: Session, measurements: Sequence[Measurement], targets: Targets, *,
         new_full: Mapping[int, np.ndarray] | None = None,
         pngs: Callable[[Keyed], bytes | None] | None = None) -> None:
    """Store what `pipeline.measure` made: whole-image embeddings, masks, crops, predictions.

    `pngs` gives a new mask's PNG when the caller encoded it already (in a thread pool while the
    models ran); by default it is encoded here. An image that failed is marked unreadable.
    """
    full_rows = [EmbeddingRow.of(iid, targets.embedder_id, "full", "", None, v)
                 for iid, v in (new_full or {}).items()]
    _upsert_returning(session, Embedding, full_rows, ("image_id", "model_id", "region",
                                                      "variant"), [Embedding.id])
    mark_unreadable(session, {m.image_id: m.error for m in measurements if m.error})
    ok = [m for m in measurements if m.error is None]
    mask_rows = []
    for m in ok:
        if m.new_mask is None:
            continue
        new = m.new_mask
        png = pngs((m.image_id, m.key)) if pngs else None
        mask_rows.append(MaskRow(
            image_id=m.image_id, variant=m.key.variant, model_id=targets.segmenter_id,
            prompt_ids=list(m.prompts.ids), prompt_similarities=list(m.prompts.similarities),
            prompt_similarity=mean_prompt_similarity(m.prompts.similarities),
            width=int(new.mask.shape[1]), height=int(new.mask.shape[0]),
            area_fraction=new.area_fraction, png=png or encode_mask_png(new.mask),
            flag=new.flag))
    mask_ids = {(iid, variant): mid for mid, iid, variant in _upsert_returning(
        session, Mask, mask_rows, ("image_id", "kind", "variant"),
        [Mask.id, Mask.image_id, Mask.variant])}
    crop_rows = [
        EmbeddingRow.of(m.image_id, targets.embedder_id, "crop", m.key.variant,
                        m.mask_id or mask_ids.get((m.image_id, m.key.variant)), m.crop)
        for m in ok if m.new_crop and m.crop is not None
    ]
    crop_ids = {(iid, variant): eid for eid, iid, variant in _upsert_returning(
        session, Embedding, crop_rows, ("image_id", "model_id", "region", "variant"),
        [Embedding.id, Embedding.image_id, Embedding.variant])}
    if targets.head_id is None:
        return
    with_proba = [m for m in ok if m.probabilities is not None]
    missing = [m for m in with_proba if (m.image_id, m.key.variant) not in crop_ids]
    if missing:
        # Crops found in the store: their ids, for the predictions' link.
        crop_ids.update({(iid, variant): eid for eid, iid, variant in session.execute(
            select(Embedding.id, Embedding.image_id, Embedding.variant).where(
                Embedding.image_id.in_({m.image_id for m in missing}),
                Embedding.model_id == targets.embedder_id, Embedding.region == "crop",
                Embedding.variant.in_({m.key.variant for m in missing})))})
    prediction_rows = [
        PredictionRow(m.image_id, targets.head_id, crop_ids.get((m.image_id, m.key.variant)),
                      int(np.argmax(m.probabilities)), [float(x) for x in m.probabilities])
        for m in with_proba if m.probabilities is not None
    ]
    _upsert_returning(session, Prediction, prediction_rows, ("image_id", "head_id"),
                      [Prediction.id])
