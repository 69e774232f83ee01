"""Estimate and record each image's skin tone (ITA outside its lesion mask) in the catalogue.

The mask is the image's manual mask where it has one, else its newest predicted mask, else none
(the whole image, lesion included, which the record says). An estimate is kept with the mask it
was measured outside (`images.skin_ita_mask`) and made again only when that mask changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.measurements import ImageRow, image_rows
from eczema_batch.catalogue.models import Image, Mask
from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging.masks import decode_mask_png
from eczema_batch.imaging.skintone import skin_ita, skin_tone, tone_order
from eczema_batch.measuring.files import load_pixels

#: the longest side the estimate decodes at: a tone is a median, it needs no detail
ESTIMATE_SIDE = 384
#: skin_ita_mask of an estimate made on the whole image (no mask yet)
NO_MASK = "none:"


@dataclass
class ToneEstimates:
    estimated: int = 0
    reused: int = 0
    #: image id -> why no estimate was made (file gone, no skin pixel)
    failed: dict[int, str] = field(default_factory=dict)


def estimate_skin_tones(session: Session, image_ids: Iterable[int], *, image_root: str | None,
                        max_pixels: int, threads: int = 2) -> ToneEstimates:
    """Fill `images.skin_ita` for `image_ids` where it is missing or its mask changed; the
    caller commits."""
    ids = sorted(set(image_ids))
    out = ToneEstimates()
    if not ids:
        return out
    masks = _chosen_masks(session, ids)
    stored: dict[int, str | None] = dict(session.execute(
        select(Image.id, Image.skin_ita_mask).where(Image.id.in_(ids))).all())
    todo = [iid for iid in ids if stored.get(iid) != masks.get(iid, (NO_MASK, None))[0]]
    out.reused = len(ids) - len(todo)
    if not todo:
        return out
    rows = image_rows(session, todo, image_root=image_root)
    pngs = {iid: masks[iid][1] for iid in todo if iid in masks}

    def one(iid: int) -> tuple[int, float | None, str | None]:
        try:
            return iid, _estimate(rows[iid], pngs.get(iid), max_pixels), None
        except (RejectedFileError, OSError, ValueError) as exc:
            return iid, None, str(exc)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, todo))
    for iid, ita, error in results:
        if ita is None:
            out.failed[iid] = error or "no skin-coloured pixel outside the lesion mask"
            continue
        image = session.get(Image, iid)
        assert image is not None
        image.skin_ita = round(ita, 3)
        image.skin_ita_mask = masks.get(iid, (NO_MASK, None))[0]
        out.estimated += 1
    session.flush()
    return out


def _chosen_masks(session: Session, ids: list[int]) -> dict[int, tuple[str, bytes]]:
    """image id -> ("kind:variant", PNG) of the mask a tone is measured outside."""
    stmt = (select(Mask.image_id, Mask.kind, Mask.variant, Mask.png)
            .where(Mask.image_id.in_(ids))
            # manual first, then the newest predicted: the first row per image wins
            .order_by(Mask.image_id, (Mask.kind != "manual"), Mask.id.desc()))
    chosen: dict[int, tuple[str, bytes]] = {}
    for iid, kind, variant, png in session.execute(stmt):
        chosen.setdefault(iid, (f"{kind}:{variant}", png))
    return chosen


def _estimate(row: ImageRow, png: bytes | None, max_pixels: int) -> float | None:
    pixels = load_pixels(row, max_pixels=max_pixels, max_side=ESTIMATE_SIDE).pixels
    lesion = None
    if png is not None:
        full = decode_mask_png(png)
        height, width = pixels.shape[:2]
        if full.shape != (height, width):
            small = PILImage.fromarray(full.astype(np.uint8) * 255).resize(
                (width, height), PILImage.Resampling.NEAREST)
            full = np.asarray(small) > 127
        lesion = full
    return skin_ita(pixels, lesion)


def estimate_catalogue_tones(session: Session, *, study_id: int | None, image_root: str | None,
                             max_pixels: int, threads: int = 2
                             ) -> tuple[ToneEstimates, dict[tuple[str, str], int]]:
    """`estimate_skin_tones` for every readable image (of one study), and how many images each
    skin-tone group holds, (group, source) -> images, light to dark, manifest types first."""
    scope = select(Image.id).where(Image.decode_status == "ok")
    if study_id is not None:
        scope = scope.where(Image.study_id == study_id)
    ids = session.scalars(scope).all()
    done = estimate_skin_tones(session, ids, image_root=image_root, max_pixels=max_pixels,
                               threads=threads)
    groups: dict[tuple[str, str], int] = {}
    for fitzpatrick, ita in session.execute(
            select(Image.fitzpatrick, Image.skin_ita).where(Image.id.in_(ids))):
        group, source = skin_tone(fitzpatrick, ita)
        key = (group or "unknown", source or "none")
        groups[key] = groups.get(key, 0) + 1
    return done, dict(sorted(groups.items(), key=lambda item: tone_order(item[0][0])))
