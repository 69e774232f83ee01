"""A worker's side of a job: what to do with a delivered message for a job id.

Broker-agnostic: `work_on` returns a `Step` saying what to do with the message next (let it go, look
again later, send the halves of a split job); `workers/` turns it into Celery calls. Nothing here
imports Celery. The sending and following side is `jobs.follow`.

Ordering of the two stages. A measure job needs every reference embedded first (prompts come from
the references' embeddings). All of a run's jobs are sent at once, embed jobs first, and a measure
job that finds an unfinished embed job of the same work *waits* (its message comes back a few
seconds later) without claiming anything. The alternative, a dispatcher that sends the measure jobs
only when the embed jobs are done, needs that dispatcher alive until then: `run --no-wait`, a closed
laptop or a killed `run` would leave the measure jobs unsent. Here the dependency is read from the
catalogue, the truth, by whichever worker holds the message.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Job
from eczema_batch.clock import as_utc, utcnow
from eczema_batch.jobs.chunk import run_chunk
from eczema_batch.jobs.leases import DEFAULT_LEASE_SECONDS, TRANSIENT_ERRORS, worker_name
from eczema_batch.jobs.plan import run_settings, same_work
from eczema_batch.jobs.states import (
    UNFINISHED,
    JobState,
    NoState,
    Reported,
    check_transition,
)
from eczema_batch.measuring.config import RunConfig
from eczema_batch.measuring.runtime import Runtime, get_runtime
from eczema_batch.pipeline.device import free_device_memory, is_out_of_memory

log = logging.getLogger(__name__)

#: A measure job that finds embed jobs unfinished looks again after this many seconds.
WAIT_SECONDS = 0.5
#: Backoff after a transient error: 1, 2, 4 ... seconds, capped here (plus up to 25 % jitter).
MAX_BACKOFF_SECONDS = 60.0
#: Consecutive transient errors (database unreachable) one message survives. After that the
#: message is dropped; the job stays pending or running in the catalogue and `run` sends it again.
MAX_TRANSIENT_RETRIES = 10


@dataclass(frozen=True)
class Step:
    """What to do with a job's message after a worker looked at it."""

    job_id: int
    #: the job's state as the worker left it (NoState.UNKNOWN: the database could not be reached)
    state: Reported
    #: look at the job again after this many seconds (None: the message is done with)
    retry_in: float | None = None
    #: the retry is for an error: it counts toward MAX_TRANSIENT_RETRIES
    transient: bool = False
    #: new jobs to send to `queue` (a chunk split after running out of device memory)
    send: tuple[int, ...] = ()
    queue: str = ""
    detail: str = ""


def backoff(attempt: int) -> float:
    base = min(MAX_BACKOFF_SECONDS, 2.0 ** max(attempt, 0))
    return base * (1 + random.random() / 4)


def waiting_for(session: Session, job_id: int) -> list[int]:
    """The unfinished embed jobs a measure job must wait for: those doing the same work.

    Embed jobs of another configuration do not count: a run with this configuration has planned
    its own for any reference they would have embedded.
    """
    job = session.get(Job, job_id)
    if job is None or job.stage != "measure" or job.state not in UNFINISHED:
        return []
    mine = run_settings(session, job.run_id)
    rows = session.execute(
        select(Job.id, Job.run_id).where(Job.stage == "embed", Job.state.in_(UNFINISHED))
    ).all()
    settings: dict[int | None, dict[str, Any]] = {}
    waiting = []
    for embed_id, run_id in rows:
        if run_id not in settings:
            settings[run_id] = run_settings(session, run_id)
        if same_work(settings[run_id], mine):
            waiting.append(embed_id)
    return waiting


def split_job(session: Session, job_id: int, *, reason: str) -> list[int]:
    """Replace a pending job by two jobs of half its images each; the caller commits.

    Returns the new jobs' ids; [] when the job is not pending (someone else has it) or holds a
    single image, which is then failed with `reason`.
    """
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.PENDING:
        return []
    ids = list(job.image_ids)
    now = utcnow()
    if len(ids) < 2:
        session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
            .values(state=check_transition(JobState.PENDING, JobState.FAILED),
                    last_error=f"{reason} on a single image: lower the batch size "
                    "(ECZEMA_BATCH_BATCH_SIZE) or use a device with more memory",
                    finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return []
    taken = session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
        .values(state=check_transition(JobState.PENDING, JobState.CANCELLED), finished_at=now,
                updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(taken, "rowcount", 0) != 1:
        return []
    half = (len(ids) + 1) // 2
    children = [
        Job(run_id=job.run_id, stage=job.stage, queue=job.queue, image_ids=part,
            state=JobState.PENDING)
        for part in (ids[:half], ids[half:])
    ]
    session.add_all(children)
    session.flush()
    new_ids = [child.id for child in children]
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(last_error=f"{reason}: split into jobs {new_ids[0]} and {new_ids[1]}")
        .execution_options(synchronize_session=False)
    )
    return new_ids


def _lease_wait(factory: sessionmaker[Session], job_id: int, lease_seconds: float) -> float:
    """Seconds until the job's current lease runs out (when its holder may be dead)."""
    with factory() as session:
        expires = session.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
    if expires is None:
        return 0.5
    left = (as_utc(expires) - utcnow()).total_seconds()
    return min(max(left, 0.0), lease_seconds) + 0.5


def _state(factory: sessionmaker[Session], job_id: int) -> tuple[Reported, str]:
    with factory() as session:
        row = session.execute(select(Job.state, Job.queue).where(Job.id == job_id)).first()
    return (JobState(row[0]), row[1]) if row is not None else (NoState.MISSING, "")


def work_on(
    job_id: int,
    *,
    factory: sessionmaker[Session],
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    attempt: int = 0,
    overrides: Mapping[str, Any] | None = None,
    runtime_for: Callable[[RunConfig], Runtime] = get_runtime,
) -> Step:
    """Do what a delivered message for `job_id` asks, and say what should happen to it next.

    `attempt` counts the transient errors this message has met so far (for the backoff).
    """
    try:
        return _work_on(job_id, factory=factory, owner=owner or worker_name(),
                        lease_seconds=lease_seconds, attempt=attempt, overrides=overrides,
                        runtime_for=runtime_for)
    except TRANSIENT_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Step(job_id, NoState.UNKNOWN, retry_in=backoff(attempt), transient=True,
                    detail=f"{type(exc).__name__}: {first}")


def _work_on(
    job_id: int, *, factory: sessionmaker[Session], owner: str, lease_seconds: float,
    attempt: int, overrides: Mapping[str, Any] | None,
    runtime_for: Callable[[RunConfig], Runtime],
) -> Step:
    try:
        with factory() as session:
            waiting = waiting_for(session, job_id)
        if waiting:
            return Step(job_id, JobState.PENDING, retry_in=WAIT_SECONDS,
                        detail=f"waits for {len(waiting)} embed job(s)")
        outcome = run_chunk(job_id, factory=factory, owner=owner, lease_seconds=lease_seconds,
                            runtime_for=runtime_for, config_overrides=overrides)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            return _split_after_oom(factory, job_id, exc)
        # run_chunk gave the job back: pending to try again, or failed after MAX_ATTEMPTS.
        state, _ = _state(factory, job_id)
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if state == JobState.PENDING:
            return Step(job_id, state, retry_in=backoff(attempt), transient=True, detail=detail)
        return Step(job_id, state, detail=detail)
    if outcome.state == JobState.RUNNING:
        # Someone holds it. If they are alive their heartbeat keeps the lease and we will find
        # the job done; if they died, the lease runs out and we take the job over.
        return Step(job_id, JobState.RUNNING, retry_in=_lease_wait(factory, job_id, lease_seconds),
                    detail="held by another worker")
    if outcome.state == JobState.PENDING:
        return Step(job_id, JobState.PENDING, retry_in=backoff(attempt), transient=True,
                    detail="a transient error: see the job's last_error")
    return Step(job_id, outcome.state)


def _split_after_oom(factory: sessionmaker[Session], job_id: int, exc: BaseException) -> Step:
    free_device_memory(torch.device("cuda"))
    with factory() as session, session.begin():
        children = split_job(session, job_id, reason="out of device memory")
    state, queue = _state(factory, job_id)
    log.warning("job %d ran out of device memory: %s", job_id,
                f"split into jobs {children}" if children else state)
    return Step(job_id, state, send=tuple(children), queue=queue,
                detail=f"{type(exc).__name__}".strip())
