"""`eczema-batch run` in this process: run every job of a plan here, stage by stage.

The same job code as a Celery worker runs (jobs.chunk.run_chunk), so the embedded default and a
cluster produce the same catalogue.
"""

from __future__ import annotations

import logging
import os
import socket

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Job
from eczema_batch.clock import utcnow
from eczema_batch.jobs.chunk import ChunkOutcome, run_chunk
from eczema_batch.jobs.leases import worker_name
from eczema_batch.jobs.plan import STAGES, Plan
from eczema_batch.jobs.runs import RunSummary, finish_run, new_summary
from eczema_batch.jobs.states import JobState
from eczema_batch.progress import StageProgress

log = logging.getLogger(__name__)

#: A transiently failing job is tried this many times in one local run before moving on.
LOCAL_TRIES = 3


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def expire_dead_local_leases(session: Session, job_ids: list[int]) -> int:
    """Expire leases held by processes of this host that no longer exist (a killed run)."""
    # No state changes: the job stays running with a lease that has run out, which a claim
    # takes over (running -> running).
    host = socket.gethostname()
    expired = 0
    rows = session.execute(
        select(Job.id, Job.lease_owner).where(Job.id.in_(job_ids), Job.state == JobState.RUNNING)
    ).all()
    for job_id, owner in rows:
        owner_host, _, pid = (owner or "").rpartition(":")
        if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
            expired += 1
    return expired


def run_in_process(
    factory: sessionmaker[Session],
    plan: Plan,
    *,
    progress: StageProgress | None = None,
) -> RunSummary:
    owner = worker_name()
    with factory() as session:
        summary = new_summary(session, plan)
    with factory() as session, session.begin():
        expire_dead_local_leases(session, [j for ids in plan.jobs.values() for j in ids])
    for stage in STAGES:
        job_ids = plan.jobs.get(stage, [])
        with factory() as session:
            total = sum(len(ids) for ids in session.scalars(
                select(Job.image_ids).where(Job.id.in_(job_ids))))
        done = 0
        if progress is not None and job_ids:
            progress(stage, 0, total)
        for job_id in job_ids:
            outcome = _run_with_retries(factory, job_id, owner)
            size = outcome.images or _job_size(factory, job_id)
            done += size
            if outcome.state == JobState.DONE:
                summary.add_done(stage, size, outcome.failed)
            elif outcome.state == JobState.FAILED:
                summary.failed_jobs[job_id] = _last_error(factory, job_id)
            if progress is not None:
                progress(stage, done, total)
    with factory() as session, session.begin():
        finish_run(session, summary)
    return summary


def _run_with_retries(factory: sessionmaker[Session], job_id: int, owner: str) -> ChunkOutcome:
    outcome = ChunkOutcome(job_id, JobState.PENDING)
    for attempt in range(LOCAL_TRIES):
        try:
            outcome = run_chunk(job_id, factory=factory, owner=owner)
        except Exception as exc:  # released as pending by run_chunk; try again here
            log.warning("job %d attempt %d failed: %s", job_id, attempt + 1, exc)
            continue
        if outcome.state != JobState.PENDING:
            return outcome
    return outcome


def _job_size(factory: sessionmaker[Session], job_id: int) -> int:
    with factory() as session:
        ids = session.scalar(select(Job.image_ids).where(Job.id == job_id))
        return len(ids or [])


def _last_error(factory: sessionmaker[Session], job_id: int) -> str:
    with factory() as session:
        return session.scalar(select(Job.last_error).where(Job.id == job_id)) or "unknown error"
