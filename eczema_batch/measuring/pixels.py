"""Pixels from the study folders for the method (`pipeline.records.Pixels`), decoded in threads.

Each file is read by `measuring.files` (only while it is still the one catalogued). Decoding
runs in a thread pool (Pillow and pydicom release the GIL) while the models compute; reference
images come from the process's PromptCache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from sqlalchemy.orm import Session

from eczema_batch.catalogue.measurements import ImageRow, image_rows, manual_mask_pngs
from eczema_batch.imaging import DecodedImage
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.files import load_pixels
from eczema_batch.measuring.prompts import PromptCache
from eczema_batch.pipeline.segment import PromptPair


class StudyPixels:
    """Images decoded at `max_side` (their longest side at least that), each once.

    Bound to one session: one per chunk or evaluation batch.
    """

    def __init__(self, session: Session, config: RunConfig, *, max_side: int,
                 pool: ThreadPoolExecutor, prompts: PromptCache,
                 rows: dict[int, ImageRow] | None = None) -> None:
        self.session, self.config, self.max_side = session, config, max_side
        self.pool, self.prompts = pool, prompts
        self.rows: dict[int, ImageRow] = dict(rows or {})
        self._futures: dict[int, Future[DecodedImage]] = {}

    def prefetch(self, image_ids: Iterable[int]) -> None:
        todo = [i for i in dict.fromkeys(image_ids) if i not in self._futures]
        unknown = [i for i in todo if i not in self.rows]
        if unknown:
            self.rows.update(image_rows(self.session, unknown, image_root=self.config.image_root))
        for iid in todo:
            self._futures[iid] = self.pool.submit(
                load_pixels, self.rows[iid], max_pixels=self.config.max_pixels,
                max_side=self.max_side)

    def get(self, image_id: int) -> np.ndarray:
        # Kept for the source's life (one chunk, one batch): the method asks for an image once
        # to embed it whole and again to crop it.
        self.prefetch([image_id])
        return self._futures[image_id].result().pixels

    def pairs(self, reference_ids: Sequence[int], input_size: tuple[int, int]
              ) -> dict[int, PromptPair]:
        pngs = {rid: png for rid, (_mid, png) in manual_mask_pngs(self.session,
                                                                  reference_ids).items()}
        rows = image_rows(self.session, list(pngs), image_root=self.config.image_root)
        return self.prompts.pairs(rows.values(), pngs, input_size=input_size,
                                  max_pixels=self.config.max_pixels, pool=self.pool)
