"""The Celery app: Redis carries job ids to workers on the queues `gpu` and `cpu`.

The catalogue is the truth (a job row's state and lease); the broker only says "look at job N".
So the settings here are about never dropping a message while its work is undone:

- `task_acks_late`: a message is acknowledged after the task returns, not when it is received;
- `task_reject_on_worker_lost`: a pool process killed mid-task puts its message back at once;
- `worker_prefetch_multiplier=1`: a worker holds one message per process, so a slow chunk does not
  sit on messages another worker could run;
- the broker's `visibility_timeout` (ECZEMA_BATCH_VISIBILITY_TIMEOUT) is longer than the slowest
  chunk: a message taken by a worker that vanished entirely comes back after it, and any copy that
  turns up while the job is running is told to wait by the job's lease, not run twice.

Messages are published to the queue itself (Redis's anonymous exchange) rather than through an
exchange's bindings: bindings are Redis keys too, and after a FLUSHALL a message sent through a lost
binding would be dropped without an error.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError as KombuOperationalError

from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import ConfigError, TransientError

log = logging.getLogger(__name__)

#: The one task: `run_job(job_id)`.
TASK_RUN_JOB = "eczema_batch.run_job"
#: Model steps go to `gpu`; `cpu` workers run the same jobs where no GPU is needed or available.
QUEUES = ("gpu", "cpu")
NO_BROKER = "needs a broker: set ECZEMA_BATCH_BROKER_URL=redis://host:6379/0"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def job_queue(name: str) -> Queue:
    """A queue that messages reach directly (anonymous exchange, routing key = queue name)."""
    return Queue(name, Exchange(""), routing_key=name)


def transport_options(settings: Settings) -> dict[str, Any]:
    visibility = settings.visibility_timeout
    return {
        "visibility_timeout": visibility,
        # Look for abandoned messages about ten times per visibility timeout (at most every
        # minute), and scan on every look: kombu's default scans every 10th look, ~100 s apart.
        "unacked_restore_interval": max(1, min(60, visibility // 10)),
        "unacked_restore_throttle": 1,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """The Celery app for `settings` (default: the process's settings)."""
    settings = settings or get_settings()
    app = Celery("eczema_batch", broker=settings.broker_url, include=["eczema_batch_workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The catalogue records every outcome; a result backend would be a second truth.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        # A broker hiccup must not throw away a chunk half done: the task goes on, and the
        # catalogue (not the ack) says it is done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=[job_queue(q) for q in QUEUES],
        task_default_queue="gpu",
        task_create_missing_queues=True,
        worker_redirect_stdouts=False,
        timezone="UTC",
    )
    return app


@lru_cache(maxsize=4)
def app_for(broker_url: str) -> Celery:
    """A Celery app publishing to `broker_url` (the CLI's; workers use `app`)."""
    settings = get_settings().model_copy(update={"broker_url": broker_url})
    return make_app(settings)


@contextmanager
def job_sender(broker_url: str) -> Iterator[Any]:
    """Yield `send(job_id, queue)`, publishing over one fresh connection to the broker."""
    app = app_for(broker_url)
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)
        except (KombuOperationalError, *connection.connection_errors) as exc:
            raise TransientError(
                f"cannot reach the broker at {connection.as_uri()}: {exc}; start Redis or fix "
                "ECZEMA_BATCH_BROKER_URL"
            ) from exc
        producer = connection.Producer()

        def send(job_id: int, queue: str) -> None:
            try:
                app.send_task(TASK_RUN_JOB, args=[job_id], queue=job_queue(queue),
                              producer=producer)
            except (KombuOperationalError, *connection.connection_errors) as exc:
                raise TransientError(
                    f"lost the broker at {connection.as_uri()} while sending job {job_id}: {exc}; "
                    "the jobs are in the catalogue: run the same command again to send them"
                ) from exc

        yield send


def worker_argv(
    *, queues: Sequence[str], concurrency: int, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
            "--pool", "prefork", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def start_worker(
    *, queues: Sequence[str], concurrency: int = 1, device: str | None = None,
    loglevel: str = "INFO", hostname: str | None = None,
) -> None:
    """Run a Celery worker in this process until it is stopped (prefork pool).

    CUDA is never touched here: the pool's processes load the models on their first chunk.
    """
    if device is not None:
        if not _DEVICE.match(device):
            raise ConfigError(f"--device {device!r}: use cpu, cuda or cuda:N")
        if device.startswith("cuda"):
            _check_cuda(device)
        # Through the environment, so that the pool's processes (and their settings) see it.
        os.environ["ECZEMA_BATCH_WORKER_DEVICE"] = device
        get_settings.cache_clear()
    settings = get_settings()
    if not settings.broker_url:
        raise ConfigError(f"the worker {NO_BROKER}")
    if concurrency > 1:
        # Each pool process would otherwise run as many torch threads as the machine has cores.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // concurrency)))
    name = hostname or f"{'+'.join(queues)}-{os.getpid()}@%h"
    make_app(settings).worker_main(
        worker_argv(queues=queues, concurrency=concurrency, loglevel=loglevel, hostname=name)
    )


def _check_cuda(device: str) -> None:
    """Fail at start, not on every job, when the device is not there; without initialising CUDA."""
    # NVML answers how many GPUs there are without creating a CUDA context, so the pool's
    # processes forked after this can still use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ConfigError(
            f"--device {device}: this machine shows {count} CUDA device(s) to torch "
            f"{torch.__version__}; use --device cpu, or a CUDA build of torch and a visible GPU"
        )


@worker_init.connect
def _before_fork(**_: Any) -> None:
    # Import (never run) the model code once in the parent, so that every pool process, and each
    # one that replaces a dead process, starts without ~4 s of imports. No model is loaded and
    # CUDA is not initialised here: that happens in the pool process, on its first chunk.
    import alembic.runtime.migration  # noqa: F401 (the schema check on a pool process's start)
    import psycopg  # noqa: F401
    import transformers

    transformers.SegGptForImageSegmentation, transformers.ViTModel  # noqa: B018 (lazy modules)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Pooled database connections must not cross a fork: each pool process opens its own.
    from eczema_batch.catalogue.db import dispose_engines

    dispose_engines()


#: The app `celery -A eczema_batch_workers.celery_app worker` finds (settings from ECZEMA_BATCH_*
#: variables).
app = make_app()
