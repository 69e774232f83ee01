"""Does a worker on this host answer? The container's HEALTHCHECK (`eczema-batch worker-ping`).

The question goes through the broker's remote control (Celery's `ping` on the pidbox fanout), with
a glob on the node name: workers are named `{queues}-{pid}@{hostname}` (`start_worker`), so
`*@{hostname}` reaches the workers of this host (in a container, of this container) and makes no
other worker of the cluster answer. It is the worker's main process that answers, not its pool:
a worker in the middle of a long chunk still answers, a hung or dead main process does not.
"""

from __future__ import annotations

import socket

from kombu.exceptions import OperationalError as KombuOperationalError

from eczema_batch.errors import TransientError

from .celery_app import app_for


def ping_workers(broker_url: str, *, timeout: float, host: str | None = None) -> list[str]:
    """Names of the workers on `host` (default: this one) that answered within `timeout` seconds.

    The first answer ends the wait; with no worker it lasts `timeout`. Raises `TransientError`
    when the broker cannot be reached (within about a second: a health check must not hang).
    """
    app = app_for(broker_url)
    pattern = f"*@{host or socket.gethostname()}"
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0.5, interval_step=0.5,
                                         timeout=timeout)
            replies = app.control.ping(timeout=timeout, pattern=pattern, matcher="glob", limit=1,
                                       connection=connection)
        except (KombuOperationalError, *connection.connection_errors) as exc:
            raise TransientError(
                f"cannot reach the broker at {connection.as_uri()}: {exc}"
            ) from exc
    return sorted(name for reply in replies or [] for name in reply)
