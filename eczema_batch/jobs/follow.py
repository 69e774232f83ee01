"""Sending a run's jobs to workers and following them in the catalogue, not the broker.

Broker-agnostic: `dispatch_plan` takes a `send(job_id, queue)` callable; `cli/measure.py` gives
it Celery's. Nothing here imports Celery. What a worker does with a message is `jobs.work`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Image, Job
from eczema_batch.clock import as_utc, utcnow
from eczema_batch.errors import TransientError
from eczema_batch.jobs.leases import DEFAULT_LEASE_SECONDS, TRANSIENT_ERRORS
from eczema_batch.jobs.plan import STAGES, Plan
from eczema_batch.jobs.runs import RunSummary, finish_run, new_summary
from eczema_batch.jobs.states import UNFINISHED, JobState

log = logging.getLogger(__name__)

#: Sends one job id to a queue.
Send = Callable[[int, str], None]


def plan_job_ids(plan: Plan) -> list[int]:
    """The plan's jobs in the order to send them: every embed job before any measure job."""
    return [job_id for stage in STAGES for job_id in plan.jobs.get(stage, [])]


def dispatch_plan(
    factory: sessionmaker[Session], plan: Plan, *, queue: str, send: Send
) -> list[int]:
    """Send the plan's unfinished jobs to `queue`; returns the ids sent.

    The jobs' queue is recorded (committed) before anything is sent. Sending a job that a worker
    already has is harmless: the second copy waits for the lease and then finds the job done.
    """
    ids = plan_job_ids(plan)
    with factory() as session, session.begin():
        unfinished = set(session.scalars(
            select(Job.id).where(Job.id.in_(ids), Job.state.in_(UNFINISHED))
        ))
        if unfinished:
            session.execute(
                update(Job).where(Job.id.in_(unfinished)).values(queue=queue)
                .execution_options(synchronize_session=False)
            )
    sent = [job_id for job_id in ids if job_id in unfinished]
    for job_id in sent:
        send(job_id, queue)
    log.info("run %d: sent %d job(s) to queue %s", plan.run_id, len(sent), queue)
    return sent


@dataclass(frozen=True)
class Tracked:
    """The jobs a run waits for: its plan's jobs and the jobs split from them since.

    A split job's halves belong to its run and are newer than every job there was when the plan
    was made (`newest`).
    """

    run_id: int
    job_ids: frozenset[int]
    run_ids: frozenset[int]
    newest: int

    def clause(self) -> Any:
        return or_(
            Job.id.in_(self.job_ids),
            Job.run_id.in_(self.run_ids) & (Job.id > self.newest),
        )


def track(factory: sessionmaker[Session], plan: Plan) -> Tracked:
    """What to follow for `plan`; call it before sending, so that no split goes unseen."""
    ids = plan_job_ids(plan)
    with factory() as session:
        runs = set(session.scalars(select(Job.run_id).where(Job.id.in_(ids))))
        newest = session.scalar(select(func.max(Job.id))) or 0
    return Tracked(
        run_id=plan.run_id,
        job_ids=frozenset(ids),
        run_ids=frozenset(r for r in runs if r is not None) | {plan.run_id},
        newest=newest,
    )


@dataclass
class RunProgress:
    #: state -> number of jobs
    jobs: dict[JobState, int] = field(default_factory=dict)
    #: state -> number of images in jobs of that state (split and superseded jobs left out)
    images: dict[JobState, int] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return sum(n for state, n in self.images.items() if state != JobState.CANCELLED)

    @property
    def finished_images(self) -> int:
        return self.images.get(JobState.DONE, 0) + self.images.get(JobState.FAILED, 0)

    @property
    def unfinished_jobs(self) -> int:
        return sum(self.jobs.get(state, 0) for state in UNFINISHED)

    @property
    def finished(self) -> bool:
        return self.unfinished_jobs == 0


def read_progress(session: Session, tracked: Tracked) -> RunProgress:
    progress = RunProgress()
    for stored, image_ids in session.execute(
        select(Job.state, Job.image_ids).where(tracked.clause())
    ):
        state = JobState(stored)
        progress.jobs[state] = progress.jobs.get(state, 0) + 1
        progress.images[state] = progress.images.get(state, 0) + len(image_ids)
    return progress


#: Send = Callable[[int, str], None] for many jobs at once: (job id, queue) pairs.
Resend = Callable[[list[tuple[int, str]]], None]
#: A client re-sends stalled work at most this many stall periods apart (doubling from one).
MAX_RESEND_PERIODS = 16


def stalled_jobs(session: Session, tracked: Tracked) -> tuple[list[tuple[int, str]], bool]:
    """The tracked jobs nobody is doing, as (id, queue), embed jobs first; and whether any job
    on their queues is held by a live lease (a worker is at work there).

    Nobody is doing a job that is pending, or running on a lease that has run out (its holder is
    dead). A message for it may still be in the broker, or may be gone (a flushed or restarted
    broker, a message dropped after too many database errors): the catalogue cannot tell which.
    """
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.stage, Job.queue, Job.state, Job.lease_expires_at)
        .where(tracked.clause(), Job.state.in_(UNFINISHED))
    ).all()
    stalled = [(job_id, stage, queue) for job_id, stage, queue, state, expires in rows
               if state == JobState.PENDING or expires is None or as_utc(expires) < now]
    stalled.sort(key=lambda j: (STAGES.index(j[1]) if j[1] in STAGES else len(STAGES), j[0]))
    queues = {queue for _, _, queue, _, _ in rows}
    busy = bool(queues) and session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.queue.in_(queues), Job.state == JobState.RUNNING, Job.lease_expires_at >= now)
    ) != 0
    return [(job_id, queue) for job_id, _, queue in stalled], busy


@dataclass
class _StallWatch:
    """When to send stalled work again: after `period` seconds in which no worker held a live
    lease on the run's queues and no tracked job changed state; then twice as long each time
    nothing comes of it (the workers may simply be down: re-sending adds harmless duplicates,
    but a few, not one per poll)."""

    period: float
    clock: Callable[[], float]
    since: float = 0.0
    wait: float = 0.0
    seen: dict[JobState, int] | None = None

    def __post_init__(self) -> None:
        self.since, self.wait = self.clock(), self.period

    def due(self, progress: RunProgress, busy: bool) -> bool:
        if busy or progress.jobs != self.seen:
            self.seen = dict(progress.jobs)
            self.since, self.wait = self.clock(), self.period
            return False
        return self.clock() - self.since >= self.wait

    def sent(self) -> None:
        self.since = self.clock()
        self.wait = min(self.wait * 2, self.period * MAX_RESEND_PERIODS)


def wait_for_jobs(
    factory: sessionmaker[Session],
    tracked: Tracked,
    *,
    on_progress: Callable[[RunProgress], None] | None = None,
    poll_seconds: float = 1.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    resend: Resend | None = None,
    stall_seconds: float = DEFAULT_LEASE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> RunProgress:
    """Poll the catalogue until every tracked job is done, failed or cancelled (or `timeout`).

    With `resend`, work that stalls is sent again: when for `stall_seconds` (a lease's length: a
    live worker renews its lease every third of it) no job on the run's queues was held by a live
    lease and no tracked job changed state, the unfinished jobs nobody holds are passed to
    `resend`. A message the broker still has then arrives twice, which is harmless: the job's
    claim lets one copy run it and the other finds it done.
    """
    deadline = None if timeout is None else clock() + timeout
    progress: RunProgress | None = None
    watch = _StallWatch(stall_seconds, clock)
    while True:
        try:
            with factory() as session:
                progress = read_progress(session, tracked)
                stalled, busy = (stalled_jobs(session, tracked) if resend is not None
                                 else ([], True))
        except TRANSIENT_ERRORS as exc:  # the database is down for a moment: keep watching
            log.warning("cannot read progress: %s", str(exc).strip().splitlines()[0])
        else:
            if on_progress is not None:
                on_progress(progress)
            if progress.finished:
                return progress
            if resend is not None and stalled and watch.due(progress, busy):
                try:
                    resend(stalled)
                except TRANSIENT_ERRORS as exc:  # the broker is down: try again later
                    log.warning("cannot send stalled jobs again: %s",
                                str(exc).strip().splitlines()[0])
                else:
                    log.info("run %d: sent %d stalled job(s) again", tracked.run_id,
                             len(stalled))
                watch.sent()
        if deadline is not None and clock() >= deadline:
            if progress is None:
                raise TransientError("cannot read the catalogue to follow the run: is the "
                                     "database up?")
            return progress
        sleep(poll_seconds)


def summarise(
    factory: sessionmaker[Session], plan: Plan, tracked: Tracked, *, finish: bool = True
) -> RunSummary:
    """What the run did, read from the catalogue; `finish` records the run's end state."""
    with factory() as session, session.begin():
        summary = new_summary(session, plan)
        image_ids: set[int] = set()
        unfinished = 0
        done: list[tuple[str, list[int]]] = []
        for job_id, stage, state, ids, error in session.execute(
            select(Job.id, Job.stage, Job.state, Job.image_ids, Job.last_error)
            .where(tracked.clause())
        ):
            if state == JobState.DONE:
                done.append((stage, list(ids)))
                image_ids.update(ids)
            elif state == JobState.FAILED:
                summary.failed_jobs[job_id] = error or "unknown error"
            elif state in UNFINISHED:
                unfinished += 1
        unreadable = failed_images(session, image_ids)
        for stage, ids in done:
            summary.add_done(stage, len(ids), {i: unreadable[i] for i in ids if i in unreadable})
        if finish and not unfinished:
            finish_run(session, summary)
    return summary


def failed_images(session: Session, image_ids: Iterable[int]) -> dict[int, str]:
    """image id -> reason, for those of `image_ids` that could not be read."""
    ids = list(image_ids)
    failed: dict[int, str] = {}
    for start in range(0, len(ids), 1000):
        for image_id, reason in session.execute(
            select(Image.id, Image.decode_status)
            .where(Image.id.in_(ids[start:start + 1000]), Image.decode_status != "ok")
        ):
            failed[image_id] = reason
    return failed
