"""The head's features for evaluation, computed once per (image, prompt set, model identity).

Cross-validation asks for the same image's crop embedding under many folds. Within a fold a
test image may only be prompted by the training fold's references, so its prompt set can change
from fold to fold, but mostly does not (its two nearest references usually stay in the training
fold). Masks and crop embeddings are therefore keyed by the exact prompt set,
`seggpt:{segmenter id}:p{sha1 of the sorted prompt ids}`, and stored in the catalogue as Mask and
Embedding rows under that variant: a later fold, repeat, or evaluation reuses them, and an
interrupted evaluation keeps what it computed. Whole-image embeddings (for prompt retrieval) are
the same rows `eczema-batch run` writes. Every model forward is counted, for the benchmark.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Embedding, Image, Mask, mean_prompt_similarity
from eczema_batch.catalogue.upsert import upsert
from eczema_batch.clock import utcnow
from eczema_batch.errors import EczemaBatchError, RejectedFileError
from eczema_batch.imaging import decode_mask_png, encode_mask_png
from eczema_batch.jobs import inputs
from eczema_batch.jobs.chunk import FLAG_EMPTY, FLAG_NO_REFERENCES
from eczema_batch.jobs.config import PROMPT_MAX_SIDE, QUERY_MAX_SIDE, RunConfig
from eczema_batch.jobs.plan import Targets
from eczema_batch.jobs.runtime import Runtime, get_runtime
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.retrieve import PromptSet, select_prompts
from eczema_batch.progress import Progress

log = logging.getLogger(__name__)
Key = tuple[int, str]

#: Images per compute batch: bounds the decoded pixels and full-size masks held at once.
BATCH_IMAGES = 32
#: Decoded reference (image, mask) pairs kept in memory; references prompt many queries each.
REFERENCE_CACHE = 256
#: Decode threads (Pillow and pydicom release the GIL); the machines here have two cores.
DECODE_THREADS = 2


def prompt_variant(segmenter_id: int | None, prompt_ids: Sequence[int]) -> str:
    """The cache key of a SegGPT mask: the segmenter identity and the exact prompt set.

    Sorted ids: for one query the prompts' order is fixed by their similarity to it, so the set
    alone identifies what SegGPT saw.
    """
    if not prompt_ids:
        return f"seggpt:{segmenter_id}:pnone"
    key = ",".join(str(i) for i in sorted(prompt_ids))
    return f"seggpt:{segmenter_id}:p{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@dataclass
class ForwardCounts:
    """Images through each model: what the cache saves is counted here."""

    embedder_images: int = 0
    segmenter_queries: int = 0
    segmenter_prompt_pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class CropRequest:
    """One feature the head needs: an image cropped with one mask variant."""

    image_id: int
    variant: str
    prompt_ids: tuple[int, ...] = ()
    similarities: tuple[float, ...] = ()

    @property
    def key(self) -> Key:
        return (self.image_id, self.variant)

    @property
    def segmented(self) -> bool:
        return self.variant.startswith("seggpt:")


class FeatureStore:
    """Reads and fills the feature cache for one embedder (+ segmenter) identity."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        config: RunConfig,
        targets: Targets,
        *,
        counts: ForwardCounts | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.factory, self.config, self.targets = factory, config, targets
        self.counts = counts if counts is not None else ForwardCounts()
        self._runtime = runtime
        self._references: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def runtime(self) -> Runtime:
        # Loaded on first need: a fully cached evaluation never loads a model.
        if self._runtime is None:
            self._runtime = get_runtime(self.config)
        return self._runtime

    # -- whole-image embeddings (prompt retrieval) ----------------------------------------------

    def full_vectors(self, ids: Iterable[int], *, progress: Progress | None = None
                     ) -> dict[int, np.ndarray]:
        wanted = sorted(set(ids))
        with self.factory() as session:
            found = inputs.vectors(session, wanted, model_id=self.targets.embedder_id,
                                   region="full")
        todo = [i for i in wanted if i not in found]
        for start in range(0, len(todo), BATCH_IMAGES):
            batch = todo[start : start + BATCH_IMAGES]
            pixels = self._decode(batch, max_side=PROMPT_MAX_SIDE)
            matrix = self._embed([pixels[i] for i in batch])
            rows = [self._embedding_row(i, "full", "", None, v)
                    for i, v in zip(batch, matrix, strict=True)]
            with self.factory() as session, session.begin():
                upsert(session, Embedding, rows, keys=("image_id", "model_id", "region", "variant"))
            found.update(zip(batch, matrix, strict=True))
            if progress is not None:
                progress(start + len(batch), len(todo))
        return found

    # -- prompts ---------------------------------------------------------------------------------

    def prompt_sets(
        self,
        query_ids: np.ndarray,
        query_patients: np.ndarray,
        query_studies: np.ndarray,
        pool_ids: np.ndarray,
        pool_patients: np.ndarray,
        pool_studies: np.ndarray,
        full: dict[int, np.ndarray],
    ) -> dict[int, PromptSet]:
        """Each query's K nearest references in the pool: same study, never its own patient."""
        out: dict[int, PromptSet] = {}
        for study in np.unique(query_studies):
            q = query_studies == study
            r = pool_studies == study
            if not r.any():
                out.update({int(i): PromptSet() for i in query_ids[q]})
                continue
            sets = select_prompts(
                np.stack([full[int(i)] for i in query_ids[q]]),
                np.stack([full[int(i)] for i in pool_ids[r]]),
                query_ids=[int(i) for i in query_ids[q]],
                reference_ids=[int(i) for i in pool_ids[r]],
                k=self.config.prompts,
                query_groups=[int(p) for p in query_patients[q]],
                reference_groups=[int(p) for p in pool_patients[r]],
            )
            out.update(zip((int(i) for i in query_ids[q]), sets, strict=True))
        return out

    def seggpt_request(self, image_id: int, prompts: PromptSet) -> CropRequest:
        return CropRequest(image_id, prompt_variant(self.targets.segmenter_id, prompts.ids),
                           prompts.ids, prompts.similarities)

    # -- crop embeddings ------------------------------------------------------------------------

    def crop_vectors(self, requests: Iterable[CropRequest], *, progress: Progress | None = None
                     ) -> dict[Key, np.ndarray]:
        unique = {r.key: r for r in requests}
        found: dict[Key, np.ndarray] = {}
        by_variant: dict[str, list[int]] = {}
        for iid, variant in unique:
            by_variant.setdefault(variant, []).append(iid)
        with self.factory() as session:
            for variant, ids in by_variant.items():
                stored = inputs.vectors(session, ids, model_id=self.targets.embedder_id,
                                        region="crop", variant=variant)
                found.update({(iid, variant): v for iid, v in stored.items()})
        todo = sorted((r for k, r in unique.items() if k not in found), key=lambda r: r.key)
        for start in range(0, len(todo), BATCH_IMAGES):
            batch = todo[start : start + BATCH_IMAGES]
            found.update(self._compute_crops(batch))
            if progress is not None:
                progress(start + len(batch), len(todo))
        return found

    def predicted_masks(self, requests: Sequence[CropRequest]) -> dict[Key, np.ndarray]:
        """The stored SegGPT masks of `requests` (computing the missing ones with their crops)."""
        out = self._stored_masks(requests)
        missing = [r for r in requests if r.key not in out]
        for start in range(0, len(missing), BATCH_IMAGES):
            self._compute_crops(missing[start : start + BATCH_IMAGES])
        out.update(self._stored_masks(missing))
        return {k: decode_mask_png(png) for k, (_, png) in out.items()}

    def _stored_masks(self, requests: Sequence[CropRequest]) -> dict[Key, tuple[int, bytes]]:
        if not requests:
            return {}
        with self.factory() as session:
            rows = session.execute(
                select(Mask.image_id, Mask.variant, Mask.id, Mask.png).where(
                    Mask.image_id.in_({r.image_id for r in requests}),
                    Mask.kind == "predicted",
                    Mask.variant.in_({r.variant for r in requests}),
                )
            ).all()
        wanted = {r.key for r in requests}
        return {(iid, v): (mid, png) for iid, v, mid, png in rows if (iid, v) in wanted}

    def _compute_crops(self, batch: list[CropRequest]) -> dict[Key, np.ndarray]:
        """Segment (unless a stored mask exists), crop and embed one batch; write the rows."""
        stored = self._stored_masks([r for r in batch if r.segmented])
        with self.factory() as session:
            manual = inputs.manual_masks(
                session, [r.image_id for r in batch if r.variant == "manual"])
            rows = inputs.image_rows(session, [r.image_id for r in batch],
                                     image_root=self.config.image_root)
        pixels = self._decode(sorted({r.image_id for r in batch}), max_side=QUERY_MAX_SIDE)
        masks: dict[Key, tuple[np.ndarray | None, int | None]] = {}
        mask_rows: list[dict[str, Any]] = []
        to_segment: list[CropRequest] = []
        for r in batch:
            if r.variant == "none":
                masks[r.key] = (None, None)
            elif r.variant == "manual":
                mid, png = manual[r.image_id]
                masks[r.key] = (decode_mask_png(png), mid)
            elif r.key in stored:
                mask = decode_mask_png(stored[r.key][1])
                masks[r.key] = (mask if mask.any() else None, stored[r.key][0])
            elif not r.prompt_ids:
                height, width = rows[r.image_id].height, rows[r.image_id].width
                whole = np.ones((height, width), dtype=bool)
                mask_rows.append(self._mask_row(r, whole, FLAG_NO_REFERENCES))
                masks[r.key] = (None, None)
            else:
                to_segment.append(r)
        if to_segment:
            queries = [pixels[r.image_id] for r in to_segment]
            pairs = [[self._reference(p) for p in r.prompt_ids] for r in to_segment]
            sizes = [(rows[r.image_id].height, rows[r.image_id].width) for r in to_segment]
            self.counts.segmenter_queries += len(queries)
            self.counts.segmenter_prompt_pairs += sum(len(p) for p in pairs)
            results = self.runtime.segmenter.segment(
                queries, pairs, out_sizes=sizes, batch_size=max(self.config.batch_size, 1))
            for r, result in zip(to_segment, results, strict=True):
                empty = not result.mask.any()
                mask_rows.append(self._mask_row(r, result.mask, FLAG_EMPTY if empty else None))
                masks[r.key] = (None if empty else result.mask, None)
        crops = []
        for r in batch:
            crop_mask = masks[r.key][0]
            image = pixels[r.image_id]
            crops.append(image if crop_mask is None else crop_to_mask(image, crop_mask).pixels)
        matrix = self._embed(crops)
        with self.factory() as session, session.begin():
            upsert(session, Mask, mask_rows, keys=("image_id", "kind", "variant"))
            mask_ids = self._mask_ids(session, batch) if mask_rows else {}
            emb_rows = [
                self._embedding_row(r.image_id, "crop", r.variant,
                                    masks[r.key][1] or mask_ids.get(r.key), vector)
                for r, vector in zip(batch, matrix, strict=True)
            ]
            upsert(session, Embedding, emb_rows,
                   keys=("image_id", "model_id", "region", "variant"))
        return {r.key: v for r, v in zip(batch, matrix, strict=True)}

    def _mask_ids(self, session: Session, batch: list[CropRequest]) -> dict[Key, int]:
        rows = session.execute(
            select(Mask.image_id, Mask.variant, Mask.id).where(
                Mask.image_id.in_({r.image_id for r in batch}),
                Mask.kind == "predicted",
                Mask.variant.in_({r.variant for r in batch}),
            )
        ).all()
        return {(iid, v): mid for iid, v, mid in rows}

    # -- helpers ---------------------------------------------------------------------------------

    def _embed(self, images: list[np.ndarray]) -> np.ndarray:
        self.counts.embedder_images += len(images)
        return self.runtime.embedder.embed(images, batch_size=self.config.batch_size)

    def _decode(self, ids: list[int], *, max_side: int) -> dict[int, np.ndarray]:
        """Pixels of `ids`; an unreadable image is marked in the catalogue and stops the command
        (evaluation must not silently change which images it covers)."""
        with self.factory() as session:
            rows = inputs.image_rows(session, ids, image_root=self.config.image_root)
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            futures = {
                i: pool.submit(inputs.load_pixels, rows[i], max_pixels=self.config.max_pixels,
                               max_side=max_side)
                for i in ids
            }
            out, failed = {}, {}
            for iid, future in futures.items():
                try:
                    out[iid] = future.result().pixels
                except RejectedFileError as exc:
                    failed[iid] = str(exc)
        if failed:
            with self.factory() as session, session.begin():
                for iid, reason in failed.items():
                    session.execute(update(Image).where(Image.id == iid)
                                    .values(decode_status=reason[:200]))
            first = next(iter(failed.items()))
            raise EczemaBatchError(
                f"{len(failed)} image(s) cannot be read (image {first[0]}: {first[1]}); they are "
                "now marked and left out: run the command again"
            )
        return out

    def _reference(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A reference's (pixels at prompt size, manual mask), decoded once while it is in use."""
        if image_id in self._references:
            self._references.move_to_end(image_id)
            return self._references[image_id]
        pixels = self._decode([image_id], max_side=PROMPT_MAX_SIDE)[image_id]
        with self.factory() as session:
            _, png = inputs.manual_masks(session, [image_id])[image_id]
        self._references[image_id] = (pixels, decode_mask_png(png))
        if len(self._references) > REFERENCE_CACHE:
            self._references.popitem(last=False)
        return self._references[image_id]

    def _embedding_row(self, iid: int, region: str, variant: str, mask_id: int | None,
                       vector: np.ndarray) -> dict[str, Any]:
        return {"image_id": iid, "model_id": self.targets.embedder_id, "region": region,
                "variant": variant, "mask_id": mask_id, "dim": int(vector.shape[0]),
                "vector": np.asarray(vector, dtype="<f4").tobytes(), "created_at": utcnow()}

    def _mask_row(self, r: CropRequest, mask: np.ndarray, flag: str | None) -> dict[str, Any]:
        return {
            "image_id": r.image_id, "kind": "predicted", "variant": r.variant,
            "model_id": self.targets.segmenter_id, "prompt_ids": list(r.prompt_ids),
            "prompt_similarities": list(r.similarities),
            "prompt_similarity": mean_prompt_similarity(r.similarities),
            "width": int(mask.shape[1]),
            "height": int(mask.shape[0]), "area_fraction": float(mask.mean()),
            "png": encode_mask_png(mask), "source_path": None, "flag": flag,
            "created_at": utcnow(),
        }
