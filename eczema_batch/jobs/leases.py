"""Jobs as rows: claim with a lease, keep it alive, finish or fail. The database is the truth.

A claim is one conditional UPDATE, so two workers can never hold the same job: the second sees no
row change. A job whose lease expired (its worker died) can be claimed again; its results are
upserts, so doing it twice changes nothing. Every state written here is first checked against
the moves jobs/states.py allows.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import and_, or_, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Job
from eczema_batch.clock import utcnow
from eczema_batch.errors import TransientError
from eczema_batch.jobs.states import JobState, NoState, Reported, check_transition

#: A job not heard from for this long is taken to be abandoned by a dead worker.
DEFAULT_LEASE_SECONDS = 300
#: Attempts before a job that keeps failing transiently is marked failed.
MAX_ATTEMPTS = 5
#: Database errors that mean "not now" (server down or restarting, connection cut, SQLite busy).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError,
                                                      TransientError)


def worker_name() -> str:
    """This process as a lease owner: host:pid (jobs.local expires the leases of dead pids)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_job(
    session: Session, job_id: int, *, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> bool:
    """Take the job if it is pending or its lease has expired; True when this caller holds it."""
    # From pending, or from running when the holder's lease ran out: a takeover.
    state = check_transition((JobState.PENDING, JobState.RUNNING), JobState.RUNNING)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.state == JobState.PENDING,
                and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
            ),
        )
        .values(
            state=state,
            lease_owner=owner,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def renew_lease(
    session: Session, job_id: int, *, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
        .values(heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def finish_job(session: Session, job_id: int, *, owner: str, note: str | None = None) -> bool:
    """Mark done, in the caller's transaction (the one that writes the results)."""
    state = check_transition(JobState.RUNNING, JobState.DONE)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)
        .values(state=state, finished_at=now, updated_at=now, lease_expires_at=None,
                last_error=note)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def release_job(
    session: Session, job_id: int, *, owner: str, error: str, permanent: bool,
    max_attempts: int = MAX_ATTEMPTS,
) -> Reported:
    """Give a job back after an error: pending again (to retry) or failed. Returns the new state
    (or, when the caller no longer holds the job, the state it is in)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return NoState.MISSING
    if job.lease_owner != owner or job.state != JobState.RUNNING:
        return JobState(job.state)
    failed = permanent or job.attempts >= max_attempts
    state = check_transition(job.state, JobState.FAILED if failed else JobState.PENDING)
    now = utcnow()
    job.state, job.last_error, job.updated_at = state, error[:2000], now
    job.lease_owner = None if state == JobState.PENDING else job.lease_owner
    job.lease_expires_at = None
    if state == JobState.FAILED:
        job.finished_at = now
    return state


@contextmanager
def heartbeat(
    factory: sessionmaker[Session], job_id: int, *, owner: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> Iterator[threading.Event]:
    """Renew the lease every third of its length while the body runs.

    Yields an Event that is set if the lease was lost (another worker took the job over).
    """
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(lease_seconds / 3):
            try:
                with factory() as session, session.begin():
                    if not renew_lease(session, job_id, owner=owner, lease_seconds=lease_seconds):
                        lost.set()
                        return
            except Exception:  # a brief database outage: try again at the next beat
                continue

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join(timeout=5)
