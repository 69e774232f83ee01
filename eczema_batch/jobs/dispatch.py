"""Jobs on workers: send job ids, follow progress in the catalogue, decide what a worker does.

Broker-agnostic: the sending side takes a `send(job_id, queue)` callable and the worker side
(`work_on`) returns a `Step` saying what to do with the message next; `workers/` turns those into
Celery calls. Nothing here imports Celery.

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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Image, Job, Run
from eczema_batch.clock import as_utc, utcnow
from eczema_batch.errors import TransientError
from eczema_batch.jobs.chunk import run_chunk, worker_name
from eczema_batch.jobs.config import RunConfig
from eczema_batch.jobs.leases import DEFAULT_LEASE_SECONDS
from eczema_batch.jobs.local import RunSummary
from eczema_batch.jobs.plan import STAGES, Plan, Targets, _run_settings, _same_work
from eczema_batch.jobs.runtime import Runtime, get_runtime
from eczema_batch.pipeline.device import free_device_memory, is_out_of_memory

log = logging.getLogger(__name__)

Send = Callable[[int, str], None]

UNFINISHED = ("pending", "running")
#: A measure job that finds embed jobs unfinished looks again after this many seconds.
WAIT_SECONDS = 0.5
#: Backoff after a transient error: 1, 2, 4 ... seconds, capped here (plus up to 25 % jitter).
MAX_BACKOFF_SECONDS = 60.0
#: Consecutive transient errors (database unreachable) one message survives. After that the
#: message is dropped; the job stays pending or running in the catalogue and `run` sends it again.
MAX_TRANSIENT_RETRIES = 10
#: Database errors that mean "not now" (server down or restarting, connection cut, SQLite busy).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError,
                                                      TransientError)


# -- the worker's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What to do with a job's message after a worker looked at it."""

    job_id: int
    #: the job's state as the worker left it ("unknown" when the database could not be reached)
    state: str
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
    mine = _run_settings(session, job.run_id)
    rows = session.execute(
        select(Job.id, Job.run_id).where(Job.stage == "embed", Job.state.in_(UNFINISHED))
    ).all()
    settings: dict[int | None, dict[str, Any]] = {}
    waiting = []
    for embed_id, run_id in rows:
        if run_id not in settings:
            settings[run_id] = _run_settings(session, run_id)
        if _same_work(settings[run_id], mine):
            waiting.append(embed_id)
    return waiting


def split_job(session: Session, job_id: int, *, reason: str) -> list[int]:
    """Replace a pending job by two jobs of half its images each; the caller commits.

    Returns the new jobs' ids; [] when the job is not pending (someone else has it) or holds a
    single image, which is then failed with `reason`.
    """
    job = session.get(Job, job_id)
    if job is None or job.state != "pending":
        return []
    ids = list(job.image_ids)
    now = utcnow()
    if len(ids) < 2:
        session.execute(
            update(Job).where(Job.id == job_id, Job.state == "pending")
            .values(state="failed", last_error=f"{reason} on a single image: lower the batch "
                    "size (ECZEMA_BATCH_BATCH_SIZE) or use a device with more memory",
                    finished_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return []
    taken = session.execute(
        update(Job).where(Job.id == job_id, Job.state == "pending")
        .values(state="cancelled", finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(taken, "rowcount", 0) != 1:
        return []
    half = (len(ids) + 1) // 2
    children = [
        Job(run_id=job.run_id, stage=job.stage, queue=job.queue, image_ids=part, state="pending")
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


def _state(factory: sessionmaker[Session], job_id: int) -> tuple[str, str]:
    with factory() as session:
        row = session.execute(select(Job.state, Job.queue).where(Job.id == job_id)).first()
    return (row[0], row[1]) if row is not None else ("missing", "")


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
        return Step(job_id, "unknown", retry_in=backoff(attempt), transient=True,
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
            return Step(job_id, "pending", retry_in=WAIT_SECONDS,
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
        if state == "pending":
            return Step(job_id, state, retry_in=backoff(attempt), transient=True, detail=detail)
        return Step(job_id, state, detail=detail)
    if outcome.state == "running":
        # Someone holds it. If they are alive their heartbeat keeps the lease and we will find
        # the job done; if they died, the lease runs out and we take the job over.
        return Step(job_id, "running", retry_in=_lease_wait(factory, job_id, lease_seconds),
                    detail="held by another worker")
    if outcome.state == "pending":
        return Step(job_id, "pending", retry_in=backoff(attempt), transient=True,
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


# -- the sending side -------------------------------------------------------------------------


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
    jobs: dict[str, int] = field(default_factory=dict)
    #: state -> number of images in jobs of that state (split and superseded jobs left out)
    images: dict[str, int] = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return sum(n for state, n in self.images.items() if state != "cancelled")

    @property
    def finished_images(self) -> int:
        return self.images.get("done", 0) + self.images.get("failed", 0)

    @property
    def unfinished_jobs(self) -> int:
        return sum(self.jobs.get(state, 0) for state in UNFINISHED)

    @property
    def finished(self) -> bool:
        return self.unfinished_jobs == 0


def read_progress(session: Session, tracked: Tracked) -> RunProgress:
    progress = RunProgress()
    for state, image_ids in session.execute(
        select(Job.state, Job.image_ids).where(tracked.clause())
    ):
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
               if state == "pending" or expires is None or as_utc(expires) < now]
    stalled.sort(key=lambda j: (STAGES.index(j[1]) if j[1] in STAGES else len(STAGES), j[0]))
    queues = {queue for _, _, queue, _, _ in rows}
    busy = bool(queues) and session.scalar(
        select(func.count()).select_from(Job)
        .where(Job.queue.in_(queues), Job.state == "running", Job.lease_expires_at >= now)
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
    seen: dict[str, int] | None = None

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
        run = session.get_one(Run, plan.run_id)
        summary = RunSummary(run_id=plan.run_id, targets=Targets(**run.settings["targets"]),
                             jobs=plan.job_count, resumed=plan.resumed, images=dict(plan.images))
        image_ids: set[int] = set()
        unfinished = 0
        done: list[tuple[str, list[int]]] = []
        for job_id, stage, state, ids, error in session.execute(
            select(Job.id, Job.stage, Job.state, Job.image_ids, Job.last_error)
            .where(tracked.clause())
        ):
            if state == "done":
                done.append((stage, list(ids)))
                image_ids.update(ids)
            elif state == "failed":
                summary.failed_jobs[job_id] = error or "unknown error"
            elif state in UNFINISHED:
                unfinished += 1
        unreadable = failed_images(session, image_ids)
        for stage, ids in done:
            summary.add_done(stage, len(ids), {i: unreadable[i] for i in ids if i in unreadable})
        if finish and not unfinished:
            run.state = "failed" if summary.failed_jobs else "done"
            run.finished_at = utcnow()
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
