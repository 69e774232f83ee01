"""The one task: `run_job(job_id)`, a thin adapter from a Celery message to `jobs.work.work_on`.

The job code decides; this module only turns its `Step` into Celery calls: retry later (waiting for
embed jobs, for another worker's lease, or after a transient error, with backoff), send the halves
of a split chunk, or let the message go. Logs carry job ids only.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.db import open_catalogue
from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import CatalogueError, TransientError
from eczema_batch.jobs.states import NoState
from eczema_batch.jobs.work import MAX_TRANSIENT_RETRIES, Step, backoff, work_on

from .celery_app import TASK_RUN_JOB, job_queue

log = logging.getLogger(__name__)

#: Waits up to this long (a measure job waiting for embed jobs, a short backoff) are slept here,
#: then the message goes back to the end of the queue. A countdown would make it an ETA message,
#: which the worker that took it holds in memory outside the prefetch limit: one idle worker
#: would hoard every waiting measure job and run them all alone once the embed jobs are done.
SLEEP_IN_TASK_SECONDS = 5.0


@lru_cache(maxsize=2)
def _catalogue(url: str) -> sessionmaker[Session]:
    # Workers never migrate: the schema belongs to `eczema-batch db upgrade` (the migrate service).
    return open_catalogue(url, auto_migrate=False)


def worker_overrides(settings: Settings) -> dict[str, Any]:
    """Run settings that belong to the worker's machine: its device, model folder, image root,
    how many threads decode images beside the model and how much memory keeps prompts."""
    overrides: dict[str, Any] = {"decode_threads": settings.decode_threads,
                                 "prompt_cache_mb": settings.prompt_cache_mb}
    if settings.worker_device:
        overrides["device"] = settings.worker_device
    if settings.model_dir:
        overrides["model_dir"] = str(settings.model_dir)
    if settings.image_root:
        overrides["image_root"] = str(settings.image_root)
    return overrides


@shared_task(bind=True, name=TASK_RUN_JOB, max_retries=None, ignore_result=True)
def run_job(self: Task, job_id: int, transient: int = 0) -> str:
    """Run job `job_id` (a chunk of image ids) as the catalogue describes it."""
    settings = get_settings()
    try:
        factory = _catalogue(settings.resolved_database_url)
    except (TransientError, CatalogueError) as exc:
        step = Step(job_id, NoState.UNKNOWN, retry_in=backoff(transient), transient=True,
                    detail=str(exc).splitlines()[0])
    else:
        step = work_on(job_id, factory=factory, lease_seconds=settings.lease_seconds,
                       attempt=transient, overrides=worker_overrides(settings))
    for child in step.send:
        self.app.send_task(TASK_RUN_JOB, args=[child], queue=job_queue(step.queue))
    if step.send:
        log.info("job %d split into jobs %s", job_id, list(step.send))
    if step.retry_in is None:
        log.info("job %d: %s", job_id, step.state)
        return step.state
    count = transient + 1 if step.transient else transient
    if count > MAX_TRANSIENT_RETRIES:
        # The job keeps its row (pending or running): `eczema-batch run` sends it again.
        log.error("job %d: giving up on this message after %d transient errors (%s)",
                  job_id, count - 1, step.detail)
        return step.state
    if step.transient:
        log.warning("job %d: %s; retry in %.0f s", job_id, step.detail, step.retry_in)
    else:
        log.debug("job %d %s; look again in %.1f s", job_id, step.detail, step.retry_in)
    # Back to the queue it came from, straight to the queue (not through a binding a flushed
    # Redis would have lost).
    queue = job_queue((self.request.delivery_info or {}).get("routing_key") or step.queue or "gpu")
    if step.retry_in <= SLEEP_IN_TASK_SECONDS:
        time.sleep(step.retry_in)
        raise self.retry(args=[job_id], kwargs={"transient": count}, countdown=0, queue=queue)
    raise self.retry(args=[job_id], kwargs={"transient": count}, countdown=step.retry_in,
                     queue=queue)
