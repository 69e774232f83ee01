"""Jobs as rows: claim with a lease, keep it alive, finish or fail. The database is the truth.

A claim is one conditional UPDATE, so two workers can never hold the same job: the second sees no
row change. A job whose lease expired (its worker died) can be claimed again; its results are
upserts, so doing it twice changes nothing.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import and_, or_, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Job
from eczema_batch.clock import utcnow
from eczema_batch.errors import TransientError

#: A job not heard from for this long is taken to be abandoned by a dead worker.
DEFAULT_LEASE_SECONDS = 300
#: Attempts before a job that keeps failing transiently is marked failed.
MAX_ATTEMPTS = 5
#: A job in one of these states still has work to do.
UNFINISHED = ("pending", "running")
#: Database errors that mean "not now" (server down or restarting, connection cut, SQLite busy).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError,
                                                      TransientError)


def claim_job(
    session: Session, job_id: int, *, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> bool:
    """Take the job if it is pending or its lease has expired; True when this caller holds it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.state == "pending",
                and_(Job.state == "running", Job.lease_expires_at < now),
            ),
        )
        .values(
            state="running",
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
        .where(Job.id == job_id, Job.state == "running", Job.lease_owner == owner)
        .values(heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def finish_job(session: Session, job_id: int, *, owner: str, note: str | None = None) -> bool:
    """Mark done, in the caller's transaction (the one that writes the results)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.lease_owner == owner)
        .values(state="done", finished_at=now, updated_at=now, lease_expires_at=None,
                last_error=note)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def release_job(
    session: Session, job_id: int, *, owner: str, error: str, permanent: bool,
    max_attempts: int = MAX_ATTEMPTS,
) -> str:
    """Give a job back after an error: pending again (to retry) or failed. Returns the new state."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.lease_owner != owner or job.state != "running":
        return job.state if job is not None else "missing"
    state = "failed" if permanent or job.attempts >= max_attempts else "pending"
    now = utcnow()
    job.state, job.last_error, job.updated_at = state, error[:2000], now
    job.lease_owner = None if state == "pending" else job.lease_owner
    job.lease_expires_at = None
    if state == "failed":
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
