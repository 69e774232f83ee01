"""Where the work stands, read from the catalogue: jobs by state, queue and worker; what failed.

The broker is not asked: a job's row is the truth, whichever worker or executor ran it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Image, Job, Study
from eczema_batch.clock import as_utc, utcnow
from eczema_batch.jobs.states import JobState


@dataclass(frozen=True)
class JobCount:
    stage: str
    queue: str
    state: str
    jobs: int
    images: int


@dataclass(frozen=True)
class WorkerLoad:
    """Jobs a worker (host:pid of the process holding the lease) is running now."""

    worker: str
    jobs: int
    last_heartbeat: dt.datetime | None
    #: its lease ran out: the worker is presumably dead and the job will be taken over
    expired: bool


@dataclass(frozen=True)
class FailedJob:
    id: int
    stage: str
    queue: str
    attempts: int
    error: str


@dataclass(frozen=True)
class FailedImage:
    id: int
    study: str
    path: str
    reason: str


@dataclass
class JobStatus:
    counts: list[JobCount] = field(default_factory=list)
    workers: list[WorkerLoad] = field(default_factory=list)
    failed_jobs: list[FailedJob] = field(default_factory=list)
    failed_images: list[FailedImage] = field(default_factory=list)

    def by_state(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for count in self.counts:
            totals[count.state] = totals.get(count.state, 0) + count.jobs
        return totals

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_state": self.by_state(),
            "counts": [asdict(c) for c in self.counts],
            "workers": [{**asdict(w), "last_heartbeat": _iso(w.last_heartbeat)}
                        for w in self.workers],
            "failed_jobs": [asdict(j) for j in self.failed_jobs],
            "failed_images": [asdict(i) for i in self.failed_images],
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_status(session: Session, *, limit: int = 50) -> JobStatus:
    """Jobs by stage, queue and state; running jobs by worker; the newest `limit` failures."""
    status = JobStatus()
    grouped: dict[tuple[str, str, str], list[int]] = {}
    for stage, queue, state, image_ids in session.execute(
        select(Job.stage, Job.queue, Job.state, Job.image_ids)
    ):
        entry = grouped.setdefault((stage, queue, state), [0, 0])
        entry[0] += 1
        entry[1] += len(image_ids or [])
    status.counts = [JobCount(stage, queue, state, jobs, images)
                     for (stage, queue, state), (jobs, images) in sorted(grouped.items())]

    now = utcnow()
    workers: dict[str, WorkerLoad] = {}
    for owner, heartbeat, expires in session.execute(
        select(Job.lease_owner, Job.heartbeat_at, Job.lease_expires_at)
        .where(Job.state == JobState.RUNNING)
    ):
        heartbeat = as_utc(heartbeat) if heartbeat is not None else None
        expires = as_utc(expires) if expires is not None else None
        seen = workers.get(owner or "?", WorkerLoad(owner or "?", 0, None, False))
        beats = [b for b in (seen.last_heartbeat, heartbeat) if b is not None]
        workers[seen.worker] = WorkerLoad(
            seen.worker, seen.jobs + 1, max(beats) if beats else None,
            seen.expired or (expires is not None and expires < now),
        )
    status.workers = [workers[name] for name in sorted(workers)]

    status.failed_jobs = [
        FailedJob(id, stage, queue, attempts, error or "unknown error")
        for id, stage, queue, attempts, error in session.execute(
            select(Job.id, Job.stage, Job.queue, Job.attempts, Job.last_error)
            .where(Job.state == JobState.FAILED).order_by(Job.id.desc()).limit(limit)
        )
    ]
    status.failed_images = [
        FailedImage(id, study, path, reason)
        for id, study, path, reason in session.execute(
            select(Image.id, Study.name, Image.path, Image.decode_status)
            .join(Study, Image.study_id == Study.id)
            .where(Image.decode_status != "ok").order_by(Image.id).limit(limit)
        )
    ]
    return status

