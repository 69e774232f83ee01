"""Which result is an image's current one: the rule `run`, `train` and planning share.

An image's current result is the one made from the prompts that retrieval picks now, among its
study's present references (images with a manual mask), with the run's models and K. When the
reference set changes (a manual mask is added, or a reference can no longer be read; ingest never
replaces a manual mask), an image whose K nearest references change gets a new mask key: the next
`run` segments it again and replaces its prediction; an image whose prompts stay the same keeps
its mask, crop and prediction. Older masks stay in the catalogue under their keys, where
`evaluate` (or a later run) may find them again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.measurements import Targets, reference_pools
from eczema_batch.catalogue.models import Embedding, Image, Mask, Visit
from eczema_batch.measuring.config import RunConfig
from eczema_batch.pipeline.measure import choose_prompts, mask_key
from eczema_batch.pipeline.records import MaskKey, Method, Query, StoredMask

#: stands for an image's manual mask: its key needs to know that one exists, not its pixels
_EXISTS = StoredMask(0, b"")


def current_keys(session: Session, config: RunConfig, targets: Targets, scope: Any
                 ) -> dict[int, MaskKey]:
    """image id -> the key of its current result, for the images `scope` (a clause on Image)
    selects. An image is left out while its key cannot be known: it, or a reference of its study,
    has no whole-image embedding yet (`run` computes them first)."""
    rows = session.execute(
        select(Image.id, Image.study_id, Visit.patient_id, Image.height, Image.width)
        .join(Visit, Image.visit_id == Visit.id).where(scope).order_by(Image.id)
    ).all()
    if config.segmenter_mode == "none":
        return {r.id: MaskKey("none") for r in rows}
    studies = {r.study_id for r in rows}
    pools = reference_pools(session, studies, embedder_id=targets.embedder_id)
    references = Counter(dict(session.execute(
        select(Image.study_id, func.count(Image.id))
        .where(Image.study_id.in_(studies), Image.decode_status == "ok",
               Image.id.in_(select(Mask.image_id).where(Mask.kind == "manual")))
        .group_by(Image.study_id)).all()))
    # A study with a reference not yet embedded: retrieval there is not settled.
    settled = {s for s in studies
               if (len(pools[s].ids) if s in pools else 0) == references[s]}
    manual = set(session.scalars(select(Mask.image_id).where(
        Mask.kind == "manual", Mask.image_id.in_(select(Image.id).where(scope)))))
    full = {iid: np.frombuffer(blob, dtype="<f4") for iid, blob in session.execute(
        select(Embedding.image_id, Embedding.vector).join(Image, Image.id == Embedding.image_id)
        .where(scope, Embedding.model_id == targets.embedder_id, Embedding.region == "full"))}
    method = Method(mode=config.segmenter_mode, segmenter_id=targets.segmenter_id,
                    k=config.prompts)
    queries = [
        Query(r.id, r.patient_id, (r.height, r.width), pools.get(r.study_id),
              manual_mask=_EXISTS if r.id in manual else None)
        for r in rows if r.study_id in settled
        and (r.id in full or (config.segmenter_mode == "manual" and r.id in manual))
    ]
    prompts = choose_prompts(queries, full, method)
    return {q.image_id: mask_key(q, p, method) for q, p in zip(queries, prompts, strict=True)}
