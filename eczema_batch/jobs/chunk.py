"""Run one job: a chunk of image ids through every stage they still need, results in one commit.

The chunk reads what it needs from the catalogue, computes with the pipeline (batched, models
loaded once per process), and writes masks, embeddings and predictions with upserts keyed on
(image, model identity) in the same transaction that marks the job done: a redelivered or
re-claimed job changes nothing. An image that cannot be read fails alone, with its reason; the
rest of the chunk completes. Logs carry ids, never file names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import (
    Embedding,
    Image,
    Job,
    Mask,
    Prediction,
    Run,
    mean_prompt_similarity,
)
from eczema_batch.catalogue.upsert import upsert
from eczema_batch.clock import utcnow
from eczema_batch.errors import (
    EczemaBatchError,
    ModelNotFoundError,
    RejectedFileError,
    TransientError,
)
from eczema_batch.imaging import DecodedImage, decode_mask_png, encode_mask_png
from eczema_batch.jobs import inputs
from eczema_batch.jobs.config import PROMPT_MAX_SIDE, QUERY_MAX_SIDE, RunConfig
from eczema_batch.jobs.leases import (
    DEFAULT_LEASE_SECONDS,
    claim_job,
    finish_job,
    heartbeat,
    release_job,
    worker_name,
)
from eczema_batch.jobs.plan import Targets
from eczema_batch.jobs.runtime import Runtime, get_runtime
from eczema_batch.jobs.states import JobState, NoState, Reported
from eczema_batch.pipeline.classify import predict_proba
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.retrieve import select_prompts

log = logging.getLogger(__name__)

FLAG_EMPTY = "SegGPT found no lesion: the whole image was used"
FLAG_NO_REFERENCES = "no reference images (manual masks) to prompt SegGPT: the whole image was used"


@dataclass
class ChunkOutcome:
    job_id: int
    #: the job's state after this attempt (NoState.LOST: another worker took the job over)
    state: Reported
    images: int = 0
    failed: dict[int, str] = field(default_factory=dict)


def _decode_all(
    rows: list[inputs.ImageRow], *, max_pixels: int, max_side: int, pool: ThreadPoolExecutor
) -> dict[int, Future[DecodedImage]]:
    # Decoding runs in threads (Pillow and pydicom release the GIL) while the models compute.
    return {
        row.id: pool.submit(inputs.load_pixels, row, max_pixels=max_pixels, max_side=max_side)
        for row in rows
    }


class _Chunk:
    """The computation for one chunk; no commits here."""

    def __init__(self, session: Session, runtime: Runtime, config: RunConfig, targets: Targets,
                 image_ids: list[int]) -> None:
        self.session, self.runtime, self.config, self.targets = session, runtime, config, targets
        self.rows = inputs.image_rows(session, image_ids, image_root=config.image_root)
        self.ids = [i for i in image_ids if i in self.rows]
        self.failed: dict[int, str] = {}
        #: image id -> the variant of mask and crop embedding this chunk uses for it
        self.variant_of: dict[int, str] = {}
        self.writes: dict[str, list[dict[str, Any]]] = {"full": [], "mask": [], "crop": [],
                                                        "prediction": []}

    def _pixels(self, futures: dict[int, Future[DecodedImage]], ids: list[int]
                ) -> dict[int, DecodedImage]:
        got = {}
        for iid in ids:
            if iid in self.failed:
                continue
            try:
                got[iid] = futures[iid].result()
            except RejectedFileError as exc:
                self.failed[iid] = str(exc)
                log.warning("image %d cannot be read: %s", iid, exc)
        return got

    # -- stage embed ---------------------------------------------------------------------------

    def embed_full(self) -> None:
        have = inputs.vectors(self.session, self.ids, model_id=self.targets.embedder_id,
                              region="full")
        todo = [self.rows[i] for i in self.ids if i not in have]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=self.config.decode_threads) as pool:
            futures = _decode_all(todo, max_pixels=self.config.max_pixels,
                                  max_side=PROMPT_MAX_SIDE, pool=pool)
            self._embed_full([r.id for r in todo], self._pixels(futures, [r.id for r in todo]))

    def _embed_full(self, ids: list[int], pixels: dict[int, DecodedImage]) -> dict[int, np.ndarray]:
        ok = [i for i in ids if i in pixels]
        if not ok:
            return {}
        embedder = self.runtime.embedder
        matrix = embedder.embed([pixels[i].pixels for i in ok], batch_size=self.config.batch_size)
        out = dict(zip(ok, matrix, strict=True))
        for iid, vector in out.items():
            self.writes["full"].append(self._embedding_row(iid, "full", "", None, vector))
        return out

    def _embedding_row(self, iid: int, region: str, variant: str, mask_id: int | None,
                       vector: np.ndarray) -> dict[str, Any]:
        return {"image_id": iid, "model_id": self.targets.embedder_id, "region": region,
                "variant": variant, "mask_id": mask_id, "dim": int(vector.shape[0]),
                "vector": np.asarray(vector, dtype="<f4").tobytes(), "created_at": utcnow()}

    # -- stage measure -------------------------------------------------------------------------

    def measure(self) -> None:
        config, targets = self.config, self.targets
        seg_variant = config.mask_variant(targets.segmenter_id)
        manual = inputs.manual_masks(self.session, self.ids)
        variant_of = {
            iid: ("manual" if config.segmenter_mode == "manual" and iid in manual else seg_variant)
            for iid in self.ids
        }
        self.variant_of = variant_of
        crops: dict[int, np.ndarray] = {}
        for variant in set(variant_of.values()):
            mine = [i for i in self.ids if variant_of[i] == variant]
            found = inputs.vectors(self.session, mine, model_id=targets.embedder_id,
                                   region="crop", variant=variant)
            crops.update(found)
        need_crop = [i for i in self.ids if i not in crops]
        need_pred: list[int] = []
        if targets.head_id is not None:
            done = inputs.predicted_ids(self.session, self.ids, head_id=targets.head_id)
            need_pred = [i for i in self.ids if i not in done]
        if need_crop:
            crops.update(self._crops(need_crop, variant_of, manual))
        if targets.head_id is not None:
            self._predict([i for i in need_pred if i in crops], crops)

    def _crops(self, ids: list[int], variant_of: dict[int, str],
               manual: dict[int, tuple[int, bytes]]) -> dict[int, np.ndarray]:
        config = self.config
        with ThreadPoolExecutor(max_workers=self.config.decode_threads) as pool:
            futures = _decode_all([self.rows[i] for i in ids], max_pixels=config.max_pixels,
                                  max_side=QUERY_MAX_SIDE, pool=pool)
            full = inputs.vectors(self.session, ids, model_id=self.targets.embedder_id,
                                  region="full")
            pixels = self._pixels(futures, ids)
            missing = [i for i in ids if i not in full and i in pixels]
            full.update(self._embed_full(missing, pixels))
            masks: dict[int, tuple[np.ndarray | None, int | None]] = {}
            if config.segmenter_mode == "none":
                masks = dict.fromkeys(pixels, (None, None))
            else:
                for iid in pixels:
                    if variant_of[iid] == "manual":
                        mid, png = manual[iid]
                        masks[iid] = (decode_mask_png(png), mid)
                seg_ids = [i for i in pixels if variant_of[i] != "manual"]
                masks.update(self._segment(seg_ids, pixels, full, pool))
        crop_pixels, crop_meta = [], []
        for iid in ids:
            if iid not in pixels:
                continue
            mask, mask_id = masks[iid]
            if mask is None:
                crop_pixels.append(pixels[iid].pixels)
            else:
                crop = crop_to_mask(pixels[iid].pixels, mask)
                crop_pixels.append(crop.pixels)
            crop_meta.append((iid, mask_id))
        if not crop_pixels:
            return {}
        matrix = self.runtime.embedder.embed(crop_pixels, batch_size=config.batch_size)
        out = {}
        for (iid, mask_id), vector in zip(crop_meta, matrix, strict=True):
            out[iid] = vector
            self.writes["crop"].append(
                self._embedding_row(iid, "crop", variant_of[iid], mask_id, vector)
            )
        return out

    def _segment(self, ids: list[int], pixels: dict[int, DecodedImage],
                 full: dict[int, np.ndarray], pool: ThreadPoolExecutor
                 ) -> dict[int, tuple[np.ndarray | None, int | None]]:
        """Predicted masks (reused when already stored for this variant), written as rows."""
        config, targets = self.config, self.targets
        variant = config.mask_variant(targets.segmenter_id)
        result: dict[int, tuple[np.ndarray | None, int | None]] = {}
        stored = inputs.predicted_masks(self.session, ids, variant=variant)
        for iid, (mid, png) in stored.items():
            result[iid] = (decode_mask_png(png), mid)
        todo = [i for i in ids if i not in stored and i in full]
        if not todo:
            return result
        pools = inputs.reference_pools(self.session, {self.rows[i].study_id for i in todo},
                                       embedder_id=targets.embedder_id)
        prompts: dict[int, Any] = {}
        for study_id in {self.rows[i].study_id for i in todo}:
            mine = [i for i in todo if self.rows[i].study_id == study_id]
            pool_ = pools.get(study_id)
            if pool_ is None:
                for iid in mine:
                    prompts[iid] = None
                continue
            sets = select_prompts(
                np.stack([full[i] for i in mine]), pool_.vectors,
                query_ids=mine, reference_ids=[int(x) for x in pool_.ids], k=config.prompts,
                query_groups=[self.rows[i].patient_id for i in mine]
                if config.exclude_same_patient else None,
                reference_groups=[int(x) for x in pool_.patients]
                if config.exclude_same_patient else None,
            )
            prompts.update(dict(zip(mine, sets, strict=True)))
        prompt_ids = sorted({p for s in prompts.values() if s is not None for p in s.ids})
        ref_rows = inputs.image_rows(self.session, prompt_ids, image_root=config.image_root)
        ref_masks = inputs.manual_masks(self.session, prompt_ids)
        ref_pairs = self.runtime.prompts.pairs(
            (row for rid, row in ref_rows.items() if rid in ref_masks),
            {rid: png for rid, (_mid, png) in ref_masks.items()},
            input_size=self.runtime.segmenter.input_size, max_pixels=config.max_pixels,
            pool=pool,
        )
        queries, pairs, sizes, seg_ids = [], [], [], []
        for iid in todo:
            pset = prompts.get(iid)
            usable = [] if pset is None else [
                (ref_pairs[p], s) for p, s in zip(pset.ids, pset.similarities, strict=True)
                if p in ref_pairs
            ]
            if not usable:
                whole = np.ones((self.rows[iid].height, self.rows[iid].width), dtype=bool)
                self._mask_row(iid, whole, [], [], FLAG_NO_REFERENCES, pool)
                result[iid] = (None, None)
                continue
            queries.append(pixels[iid].pixels)
            pairs.append([pair for pair, _ in usable])
            sizes.append((self.rows[iid].height, self.rows[iid].width))
            seg_ids.append((iid, [p for p in pset.ids if p in ref_pairs],  # type: ignore[union-attr]
                            [float(s) for _, s in usable]))
        if queries:
            outputs = self.runtime.segmenter.segment(queries, pairs, out_sizes=sizes,
                                                     batch_size=max(config.batch_size, 1))
            for (iid, pids, sims), out in zip(seg_ids, outputs, strict=True):
                flag = FLAG_EMPTY if not out.mask.any() else None
                self._mask_row(iid, out.mask, pids, sims, flag, pool, area=out.area_fraction)
                result[iid] = (None if flag else out.mask, None)
        return result

    def _mask_row(self, iid: int, mask: np.ndarray, prompt_ids: list[int], sims: list[float],
                  flag: str | None, pool: ThreadPoolExecutor, area: float | None = None
                  ) -> None:
        # The PNG is encoded in the decode threads (zlib releases the GIL): a full-size 12 MP
        # mask takes 15-25 ms, which in this thread would cap a GPU worker near 50 images/s.
        # `write` waits for it.
        self.writes["mask"].append({
            "image_id": iid, "kind": "predicted",
            "variant": self.config.mask_variant(self.targets.segmenter_id),
            "model_id": self.targets.segmenter_id, "prompt_ids": prompt_ids,
            "prompt_similarities": sims, "prompt_similarity": mean_prompt_similarity(sims),
            "width": int(mask.shape[1]), "height": int(mask.shape[0]),
            "area_fraction": float(mask.mean()) if area is None else area,
            "png": pool.submit(encode_mask_png, mask),
            "source_path": None, "flag": flag, "created_at": utcnow(),
        })

    def _predict(self, ids: list[int], crops: dict[int, np.ndarray]) -> None:
        if not ids:
            return
        assert self.targets.head_id is not None
        head = self.runtime.head(self.session, self.targets.head_id)
        probs = predict_proba(head, np.stack([crops[i] for i in ids]))
        for iid, p in zip(ids, probs, strict=True):
            self.writes["prediction"].append({
                "image_id": iid, "head_id": self.targets.head_id, "embedding_id": None,
                "severity": int(np.argmax(p)), "probabilities": [float(x) for x in p],
                "created_at": utcnow(),
            })

    # -- write ---------------------------------------------------------------------------------

    def write(self) -> None:
        s = self.session
        for row in self.writes["mask"]:
            row["png"] = row["png"].result()
        upsert(s, Embedding, self.writes["full"], keys=("image_id", "model_id", "region",
                                                         "variant"))
        upsert(s, Mask, self.writes["mask"], keys=("image_id", "kind", "variant"))
        if self.writes["mask"]:
            # Crop embeddings point at the mask they were cropped with.
            variant = self.config.mask_variant(self.targets.segmenter_id)
            ids = [r["image_id"] for r in self.writes["mask"]]
            mask_ids = dict(s.execute(select(Mask.image_id, Mask.id).where(
                Mask.image_id.in_(ids), Mask.kind == "predicted", Mask.variant == variant)).all())
            for row in self.writes["crop"]:
                if row["mask_id"] is None and row["variant"] == variant:
                    row["mask_id"] = mask_ids.get(row["image_id"])
        upsert(s, Embedding, self.writes["crop"], keys=("image_id", "model_id", "region",
                                                         "variant"))
        if self.writes["prediction"]:
            # Link each prediction to the crop embedding of this run's variant (evaluation keeps
            # crop embeddings of other prompt sets for the same image).
            crop_ids = {(iid, variant): eid for iid, variant, eid in s.execute(
                select(Embedding.image_id, Embedding.variant, Embedding.id).where(
                    Embedding.image_id.in_([r["image_id"] for r in self.writes["prediction"]]),
                    Embedding.model_id == self.targets.embedder_id, Embedding.region == "crop",
                ))}
            for row in self.writes["prediction"]:
                row["embedding_id"] = crop_ids.get(
                    (row["image_id"], self.variant_of.get(row["image_id"], ""))
                )
        upsert(s, Prediction, self.writes["prediction"], keys=("image_id", "head_id"))
        for iid, reason in self.failed.items():
            s.execute(update(Image).where(Image.id == iid).values(decode_status=reason[:200]))


def run_chunk(
    job_id: int,
    *,
    factory: sessionmaker[Session],
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    runtime_for: Callable[[RunConfig], Runtime] = get_runtime,
    config_overrides: Mapping[str, Any] | None = None,
) -> ChunkOutcome:
    """Claim the job, compute, and commit its results with its new state.

    Returns the outcome; a job someone else holds (or that is finished) is left alone.
    `config_overrides` replaces run settings that belong to the machine, not to the work
    (a worker's device, model folder and image root).
    """
    owner = owner or worker_name()
    with factory() as session, session.begin():
        if not claim_job(session, job_id, owner=owner, lease_seconds=lease_seconds):
            job = session.get(Job, job_id)
            return ChunkOutcome(job_id, JobState(job.state) if job else NoState.MISSING)
    try:
        with heartbeat(factory, job_id, owner=owner, lease_seconds=lease_seconds) as lost:
            with factory() as session, session.begin():
                job = session.get_one(Job, job_id)
                run = session.get_one(Run, job.run_id)
                config = RunConfig.from_dict(run.settings)
                if config_overrides:
                    config = dataclasses.replace(config, **config_overrides)
                targets = Targets(**run.settings["targets"])
                chunk = _Chunk(session, runtime_for(config), config, targets, list(job.image_ids))
                if job.stage == "embed":
                    chunk.embed_full()
                else:
                    chunk.measure()
                if lost.is_set() or not finish_job(session, job_id, owner=owner,
                                                   note=_note(chunk.failed)):
                    # Another worker took the job over: let its results stand.
                    session.rollback()
                    return ChunkOutcome(job_id, NoState.LOST, images=len(chunk.ids))
                chunk.write()
            log.info("job %d done: %d images, %d failed", job_id, len(chunk.ids), len(chunk.failed))
            return ChunkOutcome(job_id, JobState.DONE, len(chunk.ids), chunk.failed)
    except Exception as exc:
        permanent = isinstance(exc, EczemaBatchError) and not _transient(exc)
        message = f"{type(exc).__name__}: {exc}"
        with factory() as session, session.begin():
            state = release_job(session, job_id, owner=owner, error=message, permanent=permanent)
        log.warning("job %d %s after error: %s", job_id, state, message.splitlines()[0])
        if state == JobState.FAILED or isinstance(exc, EczemaBatchError):
            return ChunkOutcome(job_id, state, failed={})
        raise


def _transient(exc: Exception) -> bool:
    # Weights missing on this machine are the worker's problem, not the job's: give the job back
    # (up to MAX_ATTEMPTS) so that a worker that has them can run it.
    return isinstance(exc, TransientError | ModelNotFoundError)


def _note(failed: dict[int, str]) -> str | None:
    if not failed:
        return None
    return f"{len(failed)} image(s) failed: " + "; ".join(
        f"image {iid}: {reason}" for iid, reason in list(failed.items())[:5]
    )
