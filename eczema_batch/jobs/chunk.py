"""Run one job: a chunk of image ids through the method, results in one commit with its state.

The chunk builds each image's record from the catalogue, runs `pipeline.measure` (batched,
models loaded once per process) and saves what it made with `catalogue.measurements.save`, keyed
on (image, model identity, mask key), in the same transaction that marks the job done: a
redelivered or re-claimed job changes nothing. An image that cannot be read fails alone, with its
reason; the rest of the chunk completes. Logs carry ids, never file names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue import measurements as catalogue
from eczema_batch.catalogue.models import Job, Run
from eczema_batch.errors import (
    EczemaBatchError,
    ModelNotFoundError,
    TransientError,
)
from eczema_batch.imaging import encode_mask_png
from eczema_batch.jobs.leases import (
    DEFAULT_LEASE_SECONDS,
    claim_job,
    finish_job,
    heartbeat,
    release_job,
    worker_name,
)
from eczema_batch.jobs.states import JobState, NoState, Reported
from eczema_batch.measuring.config import (
    PROMPT_MAX_SIDE,
    QUERY_MAX_SIDE,
    RunConfig,
    RunSettings,
)
from eczema_batch.measuring.pixels import StudyPixels
from eczema_batch.measuring.runtime import Runtime, get_runtime
from eczema_batch.pipeline.measure import embed_whole, measure
from eczema_batch.pipeline.records import Keyed, Method, NewMask, Query

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    job_id: int
    #: the job's state after this attempt (NoState.LOST: another worker took the job over)
    state: Reported
    images: int = 0
    failed: dict[int, str] = field(default_factory=dict)


def method_of(config: RunConfig, targets: catalogue.Targets) -> Method:
    return Method(mode=config.segmenter_mode, segmenter_id=targets.segmenter_id,
                  k=config.prompts, batch_size=config.batch_size)


def queries_of(session: Session, rows: Mapping[int, catalogue.ImageRow], config: RunConfig,
               targets: catalogue.Targets) -> list[Query]:
    """Each image with its study's references (all of them: in `run` an image may be prompted by
    its own patient's other visits) and, in mode "manual", its manual mask."""
    pools = {} if config.segmenter_mode == "none" else catalogue.reference_pools(
        session, {r.study_id for r in rows.values()}, embedder_id=targets.embedder_id)
    manual = (catalogue.manual_masks(session, rows) if config.segmenter_mode == "manual"
              else {})
    return [Query(iid, row.patient_id, (row.height, row.width), pools.get(row.study_id),
                  manual.get(iid)) for iid, row in rows.items()]


class _Chunk:
    """One chunk's computation and its save; no commits here."""

    def __init__(self, session: Session, runtime: Runtime, config: RunConfig,
                 targets: catalogue.Targets, image_ids: list[int]) -> None:
        self.session, self.runtime, self.config, self.targets = session, runtime, config, targets
        rows = catalogue.image_rows(session, image_ids, image_root=config.image_root)
        self.rows = {i: rows[i] for i in image_ids if i in rows}
        self.ids = list(self.rows)
        self.failed: dict[int, str] = {}
        self._save: Callable[[], None] = lambda: None

    def embed_full(self) -> None:
        """Stage `embed`: the references' whole-image embeddings, for retrieval."""
        store = catalogue.CatalogueStore(self.session, embedder_id=self.targets.embedder_id)
        with ThreadPoolExecutor(max_workers=self.config.decode_threads) as pool:
            pixels = StudyPixels(self.session, self.config, max_side=PROMPT_MAX_SIDE, pool=pool,
                                 prompts=self.runtime.prompts, rows=dict(self.rows))
            _, new = embed_whole(self.ids, self.runtime, store, pixels,
                                 batch_size=self.config.batch_size, failed=self.failed)
        self._save = lambda: self._write([], new)

    def measure(self) -> None:
        """Stage `measure`: steps 1 to 5 for every image of the chunk."""
        config, targets = self.config, self.targets
        store = catalogue.CatalogueStore(self.session, embedder_id=targets.embedder_id)
        head = (self.runtime.head(self.session, targets.head_id)
                if targets.head_id is not None else None)
        queries = queries_of(self.session, self.rows, config, targets)
        pngs: dict[Keyed, Future[bytes]] = {}
        with ThreadPoolExecutor(max_workers=config.decode_threads) as pool:

            def encode(key: Keyed, new: NewMask) -> None:
                # In the decode threads (zlib releases the GIL): a 12 MP mask takes 15-25 ms,
                # which in this thread would cap a GPU worker near 50 images/s.
                pngs[key] = pool.submit(encode_mask_png, new.mask)

            pixels = StudyPixels(self.session, config, max_side=QUERY_MAX_SIDE, pool=pool,
                                 prompts=self.runtime.prompts, rows=dict(self.rows))
            results, new_full = measure(queries, method_of(config, targets), self.runtime,
                                        store, pixels, head=head, on_new_mask=encode)
        self.failed.update({m.image_id: m.error for m in results if m.error})
        encoded = {k: f.result() for k, f in pngs.items()}
        self._save = lambda: self._write(results, new_full, encoded)

    def _write(self, results: list[Any], new_full: dict[int, Any],
               pngs: dict[Keyed, bytes] | None = None) -> None:
        catalogue.save(self.session, results, self.targets, new_full=new_full,
                       pngs=(pngs or {}).get)
        catalogue.mark_unreadable(self.session, self.failed)

    def write(self) -> None:
        for iid, reason in self.failed.items():
            log.warning("image %d cannot be read: %s", iid, reason)
        self._save()


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
                stored = RunSettings.from_json(run.settings, run_id=run.id)
                config, targets = stored.config, stored.targets
                if config_overrides:
                    config = dataclasses.replace(config, **config_overrides)
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
