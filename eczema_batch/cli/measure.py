"""Measuring: run (here or on a Celery queue), worker, worker-ping, models list/make-tiny."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.cli.common import (
    JsonOption,
    SegmenterOption,
    _catalogue,
    _emit_json,
    _progress,
    _settings,
    app,
    command,
    err,
    literal,
    models_app,
)
from eczema_batch.config import Settings
from eczema_batch.errors import EczemaBatchError, UsageError

if TYPE_CHECKING:  # the commands import these lazily: `--help` stays fast, torch-free
    from eczema_batch.jobs.runs import RunSummary
    from eczema_batch.measuring.config import RunConfig


def _run_on_queue(
    factory: sessionmaker[Session], settings: Settings, config: RunConfig, *, queue: str,
    wait: bool, study: str | None, retry_failed: bool, as_json: bool,
) -> RunSummary | None:
    """Plan, send the jobs to `queue`, and follow them in the catalogue; None with no wait."""
    from eczema_batch_workers.celery_app import job_sender

    from eczema_batch.jobs import follow
    from eczema_batch.jobs.runs import start_run

    assert settings.broker_url is not None
    with job_sender(settings.broker_url) as send:  # reach the broker before planning anything
        plan = start_run(factory, config=config, executor="celery", queue=queue,
                         chunk_size=settings.chunk_size, study=study, retry_failed=retry_failed)
        tracked = follow.track(factory, plan)
        sent = follow.dispatch_plan(factory, plan, queue=queue, send=send)
    if not wait:
        if as_json:
            _emit_json({"run": plan.run_id, "queue": queue, "jobs_sent": len(sent),
                        "resumed_jobs": plan.resumed, "images": plan.images,
                        "quality_skipped": {"images": plan.quality_skipped,
                                            "reasons": plan.quality_reasons}})
        else:
            left_out = (f" (left out {plan.quality_skipped} quality-flagged photographs: "
                        "eczema-batch review list)" if plan.quality_skipped else "")
            err.print(f"run {plan.run_id}: sent {len(sent)} jobs to queue {literal(queue)}"
                      f"{left_out}; follow them with: eczema-batch status", highlight=False)
        return None
    if sent and not as_json:
        err.print(f"run {plan.run_id}: {len(sent)} jobs sent to queue {literal(queue)}, progress "
                  f"read from the catalogue (workers: eczema-batch worker --queue "
                  f"{literal(queue)}); Ctrl-C stops waiting, the workers carry on", highlight=False)
    broker_url = settings.broker_url

    def resend(jobs: list[tuple[int, str]]) -> None:
        # A fresh connection each time: the broker may have restarted since the first send.
        with job_sender(broker_url) as send_again:
            for job_id, job_queue in jobs:
                send_again(job_id, job_queue)
        err.print(f"run {plan.run_id}: no worker took up {len(jobs)} unfinished job(s) for "
                  f"{settings.lease_seconds:g} s (a worker died, or the broker lost their "
                  "messages): sent them again", highlight=False)

    with _progress(f"measuring on queue {literal(queue)}") as update:
        follow.wait_for_jobs(
            factory, tracked, on_progress=lambda p: update(p.finished_images, p.total_images),
            resend=resend, stall_seconds=settings.lease_seconds,
        )
    return follow.summarise(factory, plan, tracked)


@command(app)
def run(
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    segmenter: SegmenterOption = "seggpt",
    segmenter_model: Annotated[
        str | None, typer.Option(help="Segmenter model name (ECZEMA_BATCH_SEGMENTER_MODEL).")
    ] = None,
    embedder_model: Annotated[
        str | None, typer.Option(help="Embedder model name (ECZEMA_BATCH_EMBEDDER_MODEL).")
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Folder of model weights (ECZEMA_BATCH_MODEL_DIR).")
    ] = None,
    prompts: Annotated[int | None, typer.Option(min=1, help="K reference prompts.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Try failed jobs and images again.")
    ] = False,
    queue: Annotated[
        str | None, typer.Option(help="Send the jobs to Celery workers on this queue (gpu or cpu) "
                                 "instead of running them here; needs ECZEMA_BATCH_BROKER_URL.")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="With --queue: return once the jobs are sent.")
    ] = False,
    quality: Annotated[
        str, typer.Option(help="Photographs the quality gate flagged at ingest: flag (score them; "
                          "the review queue shows why) or skip (leave them unscored until a "
                          "reviewer clears the flag: review clear-quality).")
    ] = "flag",
    as_json: JsonOption = False,
) -> None:
    """Measure every image that still needs it: embed, retrieve prompts, segment, crop, classify.

    Runs in this process on the embedded default. Re-running does nothing new; changing a model
    redoes only what depends on it. With --queue the jobs go to Celery workers and progress is
    read from the catalogue; while it waits, work that no worker takes up for a lease's length
    (ECZEMA_BATCH_LEASE_SECONDS: a worker died, the broker lost its messages) is sent again.

    Example: eczema-batch run --model-dir ./models --segmenter seggpt

    Example: ECZEMA_BATCH_BROKER_URL=redis://redis:6379/0 eczema-batch run --queue gpu --no-wait

    Example: eczema-batch run --quality skip
    """
    from eczema_batch.jobs.local import run_in_process
    from eczema_batch.jobs.runs import start_run
    from eczema_batch.measuring.config import RunConfig

    settings = _settings()
    if queue is None and no_wait:
        raise UsageError("--no-wait goes with --queue: without a queue the run is this process")
    if queue is not None and not settings.broker_url:
        raise UsageError("--queue needs a broker: set ECZEMA_BATCH_BROKER_URL=redis://host:6379/0")
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
        prompts=prompts, batch_size=batch_size, device=device, quality=quality,
    )
    if queue is None:
        from eczema_batch.pipeline.device import resolve_device

        resolve_device(config.device)  # this process computes: no CUDA, no jobs
    factory = _catalogue(settings)
    if queue is not None:
        queued = _run_on_queue(factory, settings, config, queue=queue, wait=not no_wait,
                               study=study, retry_failed=retry_failed, as_json=as_json)
        if queued is None:
            return
        summary = queued
    else:
        plan = start_run(factory, config=config, executor="local", queue="local",
                         chunk_size=settings.chunk_size, study=study, retry_failed=retry_failed)
        with _progress("measuring") as update:
            summary = run_in_process(
                factory, plan, progress=lambda stage, done, total: update(done, total)
            )
    payload = {
        "run": summary.run_id,
        "jobs": summary.jobs,
        "resumed_jobs": summary.resumed,
        "images": summary.images,
        "measured": {stage: summary.measured.get(stage, 0) for stage in ("embed", "measure")},
        "failed_jobs": {str(k): v for k, v in summary.failed_jobs.items()},
        "failed_images": {str(k): v for k, v in summary.failed_images.items()},
        "head": summary.targets.head_id,
        "quality": config.quality,
        "quality_skipped": {"images": summary.quality_skipped,
                            "reasons": summary.quality_reasons},
    }
    if as_json:
        _emit_json(payload)
    else:
        if summary.jobs == 0:
            err.print("nothing to do: every image is measured with the current models")
        else:
            err.print(
                f"run {summary.run_id}: {summary.measured.get('measure', 0)} images measured, "
                f"{summary.measured.get('embed', 0)} references embedded, "
                f"{len(summary.failed_images)} images failed, "
                f"{len(summary.failed_jobs)} jobs failed"
            )
        for iid, reason in list(summary.failed_images.items())[:20]:
            err.print(f"  image {iid}: {literal(reason)}", highlight=False)
        if summary.quality_skipped:
            why = ", ".join(f"{n} {kind}" for kind, n in summary.quality_reasons.items())
            err.print(f"left out {summary.quality_skipped} photographs the quality gate flagged "
                      f"({literal(why)}): eczema-batch review list shows them; review "
                      "clear-quality IMAGE --by RATER lets one be scored", highlight=False)
        if not summary.has_head:
            err.print("no severity head trained for these features: stopped after the crop "
                      "embeddings (eczema-batch train makes one)")
    if summary.failed_jobs:
        raise typer.Exit(1 if summary.done_jobs == 0 else 3)
    if summary.failed_images:
        raise typer.Exit(3)


@command(app)
def worker(
    queue: Annotated[
        str, typer.Option("--queue", "-Q", help="Queue(s) to take jobs from: gpu, cpu or gpu,cpu.")
    ] = "gpu",
    device: Annotated[
        str | None, typer.Option(help="Compute on this device: cpu, cuda or cuda:N "
                                 "(default: the run's, auto).")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Pool processes; keep 1 per GPU (one worker per GPU).")
    ] = 1,
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    hostname: Annotated[
        str | None, typer.Option(help="Worker name shown by Celery (default: QUEUE-PID@host).")
    ] = None,
) -> None:
    """Take jobs from a Celery queue and run them until stopped (Ctrl-C finishes the chunk first).

    Models load in the pool process on its first chunk, never in the parent that forks it, so
    CUDA is not initialised before a fork. Logs carry job ids only. Needs
    ECZEMA_BATCH_BROKER_URL and a shared catalogue (ECZEMA_BATCH_DATABASE_URL).

    Example: ECZEMA_BATCH_BROKER_URL=redis://redis:6379/0 eczema-batch worker --queue gpu \
    --device cuda:0
    """
    settings = _settings()
    if not settings.broker_url:
        raise UsageError("worker needs a broker: set ECZEMA_BATCH_BROKER_URL=redis://host:6379/0")
    from eczema_batch_workers.celery_app import start_worker

    queues = [q.strip() for q in queue.split(",") if q.strip()]
    if not queues:
        raise UsageError("--queue: name at least one queue, e.g. --queue gpu")
    start_worker(queues=queues, concurrency=concurrency, device=device, loglevel=loglevel,
                 hostname=hostname)


@command(app, "worker-ping")
def worker_ping(
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for an answer.")
    ] = 5.0,
) -> None:
    """Ask the workers running on this host, through the broker, whether they answer.

    Exits 0 when one answers within --timeout seconds and 1 otherwise (no worker, no broker, a
    setting missing): the container image's HEALTHCHECK. A worker busy with a chunk still
    answers; a worker whose main process hangs does not.

    Example: eczema-batch worker-ping --timeout 5
    """
    # Exit 1 for every failure: Docker reads a health check's 1 as unhealthy and reserves 2.
    try:
        settings = _settings()
        if not settings.broker_url:
            raise UsageError("worker-ping needs a broker: set ECZEMA_BATCH_BROKER_URL")
        from eczema_batch_workers.health import ping_workers

        names = ping_workers(settings.broker_url, timeout=timeout)
    except EczemaBatchError as exc:
        err.print(f"[bold red]unhealthy:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if not names:
        err.print(f"[bold red]unhealthy:[/] no worker on {socket.gethostname()} answered within "
                  f"{timeout:g} s (is `eczema-batch worker` running here?)", highlight=False)
        raise typer.Exit(1)
    err.print(f"{', '.join(names)} answered", highlight=False)


@command(models_app, "list")
def models_list(
    model_dir: Annotated[Path | None, typer.Option(help="Folder of model weights.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the models eczema-batch knows and whether their weights are found.

    Example: eczema-batch models list --model-dir ./models
    """
    from eczema_batch.errors import ModelNotFoundError
    from eczema_batch.pipeline.derived import list_derived
    from eczema_batch.pipeline.loading import find_weights, weights_digest
    from eczema_batch.pipeline.registry import get_spec, list_specs

    settings = _settings()
    folder = model_dir or settings.model_dir
    rows: list[dict[str, Any]] = []
    derived = [get_spec(d.name, model_dir=folder) for d in list_derived(folder)]
    for spec in [*list_specs(), *derived]:
        try:
            found = find_weights(spec, model_dir=folder)
            where, digest = str(found), weights_digest(found)[:12]
        except ModelNotFoundError:
            where, digest = "not found", ""
        rows.append({"name": spec.name, "kind": spec.kind, "tiny": spec.tiny,
                     "weights": where, "digest": digest, "description": spec.description})
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="models")
    for column in ("name", "kind", "weights", "digest"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(literal(row[c]) for c in ("name", "kind", "weights", "digest")))
    err.print(table)


@command(models_app, "make-tiny")
def models_make_tiny(
    folder: Annotated[Path, typer.Argument(help="Where to write tiny-seggpt and tiny-dino.")],
) -> None:
    """Write tiny random-weight models (tiny-seggpt, tiny-dino) for trying the tool offline.

    They are loaded through the same code as real weights; their results mean nothing.

    Example: eczema-batch models make-tiny ./models && ECZEMA_BATCH_MODEL_DIR=./models \
    eczema-batch run --segmenter-model tiny-seggpt --embedder-model tiny-dino
    """
    from eczema_batch.pipeline.tiny import make_tiny_models

    written = make_tiny_models(folder)
    for name, path in written.items():
        err.print(f"{name}: {literal(path)}", highlight=False)
