"""The `eczema-batch` command: the only module that prints or exits.

Progress and tables go to stderr; `--json` puts one machine-readable object on stdout. Exit status:
0 the command did what it says, 3 it did part of it (some files rejected), 2 the input was wrong,
1 nothing could be done.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch import __version__
from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import EczemaBatchError, UsageError

if TYPE_CHECKING:  # the commands import these lazily: `--help` stays fast, torch-free
    from eczema_batch.jobs.config import RunConfig
    from eczema_batch.jobs.local import RunSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Catalogue eczema photographs and measure severity over time.",
)
db_app = typer.Typer(no_args_is_help=True, help="The catalogue's schema (Alembic).")
app.add_typer(db_app, name="db")
models_app = typer.Typer(no_args_is_help=True, help="The models that segment and embed.")
app.add_typer(models_app, name="models")

err = Console(stderr=True)
log = logging.getLogger("eczema_batch")

def command(
    group: typer.Typer, name: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose expected errors print their message and exit with their code."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EczemaBatchError as exc:
                err.print(f"[bold red]error:[/] {exc}", highlight=False)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err.print("interrupted: run the same command again to carry on")
                raise typer.Exit(130) from None

        group.command(name)(wrapper)
        return fn

    return register


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _settings() -> Settings:
    try:
        return get_settings()
    except EczemaBatchError:
        raise
    except Exception as exc:  # pydantic's ValidationError: a bad ECZEMA_BATCH_* value
        raise EczemaBatchError(f"a setting is wrong: {exc}") from exc


def _catalogue(settings: Settings) -> sessionmaker[Session]:
    from eczema_batch.catalogue.db import open_catalogue

    return open_catalogue(settings.resolved_database_url)


@contextmanager
def _progress(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields `update(done, total)`."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not enabled) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # pydicom logs a traceback for every file it cannot decode; ingest already reports each
        # one with its reason, so keep the terminal to that summary.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", module=r"pydicom\..*")
        warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable")


@command(app)
def version() -> None:
    """Print the version.

    Example: eczema-batch version
    """
    typer.echo(__version__)


@command(app)
def ingest(
    folder: Annotated[Path, typer.Argument(help="The study folder: PATIENT/VISIT/images.")],
    study: Annotated[
        str | None, typer.Option(help="Study name (default: the folder's name).")
    ] = None,
    processes: Annotated[
        int, typer.Option(help="Decode processes (default: one per core).", min=0)
    ] = 0,
    as_json: JsonOption = False,
) -> None:
    """Catalogue a study folder of JPEG, PNG and DICOM images.

    Every file is catalogued, recognised as already catalogued or a duplicate, or rejected with
    a reason. Running it again adds only what is new.

    Example: eczema-batch ingest ./study --json
    """
    from eczema_batch.ingest.service import ingest_study

    settings = _settings()
    factory = _catalogue(settings)
    with _progress("ingesting") as update:
        report = ingest_study(
            folder,
            factory=factory,
            study_name=study,
            max_pixels=settings.max_image_pixels,
            processes=processes or settings.ingest_workers,
            batch_files=settings.ingest_batch_files,
            progress=update,
        )
    if as_json:
        _emit_json(report.as_dict())
    else:
        table = Table(title=f"study {report.study}", show_header=False)
        table.add_row("files", str(report.files))
        table.add_row("catalogued", str(report.catalogued))
        table.add_row("already catalogued", str(report.already_catalogued))
        if report.updated:
            table.add_row("labels/masks added", str(report.updated))
        table.add_row("duplicates", str(len(report.duplicates)))
        table.add_row("rejected", str(len(report.rejected)))
        err.print(table)
        for dup in sorted(report.duplicates, key=lambda d: d["path"])[:20]:
            err.print(f"  duplicate  {dup['path']}  (same as {dup['same_as']})", highlight=False)
        for rej in sorted(report.rejected, key=lambda d: d["path"])[:50]:
            err.print(f"  rejected   {rej['path']}: {rej['reason']}", highlight=False)
        if len(report.rejected) > 50:
            err.print(f"  ... and {len(report.rejected) - 50} more: eczema-batch status --rejected")
    raise typer.Exit(report.exit_code)


@command(app)
def status(
    rejected: Annotated[bool, typer.Option("--rejected", help="List rejected files.")] = False,
    as_json: JsonOption = False,
) -> None:
    """What the catalogue holds, per study, and where the work stands (jobs, failures).

    Jobs are counted by stage, queue and state from the catalogue (not the broker); running jobs
    are listed by the worker holding them; failed jobs and images come with their reasons.

    Example: eczema-batch status --json
    """
    from eczema_batch.catalogue import queries
    from eczema_batch.jobs.status import job_status

    factory = _catalogue(_settings())
    with factory() as session:
        counts = queries.study_counts(session)
        rejections = queries.rejections(session) if rejected else []
        jobs = job_status(session)
    if as_json:
        payload: dict[str, Any] = {"studies": [c.as_dict() for c in counts],
                                   "jobs": jobs.as_dict()}
        if rejected:
            payload["rejected"] = [
                {"study": s, "path": p, "kind": k, "reason": r} for s, p, k, r in rejections
            ]
        _emit_json(payload)
        return
    if not counts:
        err.print("The catalogue is empty: eczema-batch ingest ./study")
        return
    table = Table(title="catalogue")
    for column in ("study", "patients", "visits", "images", "references", "labelled",
                   "rejected", "duplicates"):
        table.add_column(column, justify="left" if column == "study" else "right")
    for c in counts:
        table.add_row(c.study, str(c.patients), str(c.visits), str(c.images),
                      str(c.reference_masks), str(c.labelled_images), str(c.rejected),
                      str(c.duplicates))
    err.print(table)
    for study, path, kind, reason in rejections:
        err.print(f"  {study}  {kind:9}  {path}: {reason}", highlight=False)
    if jobs.counts:
        _print_jobs(jobs)


def _print_jobs(jobs: Any) -> None:
    table = Table(title="jobs")
    for column in ("stage", "queue", "state", "jobs", "images"):
        table.add_column(column, justify="right" if column in ("jobs", "images") else "left")
    for c in jobs.counts:
        table.add_row(c.stage, c.queue, c.state, str(c.jobs), str(c.images))
    err.print(table)
    for w in jobs.workers:
        beat = w.last_heartbeat.strftime("%H:%M:%S") if w.last_heartbeat else "never"
        note = "  (lease expired: presumed dead, the job will be taken over)" if w.expired else ""
        err.print(f"  running on {w.worker}: {w.jobs} job(s), last heartbeat {beat}{note}",
                  highlight=False)
    for j in jobs.failed_jobs[:10]:
        err.print(f"  failed job {j.id} ({j.stage}, {j.queue}, {j.attempts} attempts): "
                  f"{j.error.splitlines()[0]}", highlight=False)
    for i in jobs.failed_images[:20]:
        err.print(f"  failed image {i.id} {i.study}/{i.path}: {i.reason}", highlight=False)
    if jobs.failed_jobs or jobs.failed_images:
        err.print("try them again after fixing the cause: eczema-batch run --retry-failed")


@command(app)
def synth(
    folder: Annotated[Path, typer.Argument(help="New folder to write the study into.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 12,
    visits: Annotated[int, typer.Option(min=1, help="Visits per patient.")] = 4,
    images_per_visit: Annotated[int, typer.Option(min=1, help="Images per visit.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same files.")] = 0,
    width: Annotated[int, typer.Option(min=32, help="Image width in pixels.")] = 320,
    height: Annotated[int, typer.Option(min=32, help="Image height in pixels.")] = 240,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic study (photos, DICOM, masks, manifest) to try the tool.

    Example: eczema-batch synth ./demo-study --patients 12 --visits 4 --seed 0
    """
    from eczema_batch.synth import write_synthetic_study

    summary = write_synthetic_study(
        folder,
        patients=patients,
        visits=visits,
        seed=seed,
        images_per_visit=images_per_visit,
        size=(width, height),
    )
    payload = {
        "folder": str(summary.root),
        "patients": summary.patients,
        "visits": summary.visits,
        "images": summary.images,
        "references": summary.references,
        "dicom": summary.dicom,
        "labels": {str(k): v for k, v in sorted(summary.labels.items())},
    }
    if as_json:
        _emit_json(payload)
    else:
        err.print(
            f"wrote {summary.images} images of {summary.patients} patients "
            f"({summary.references} with manual masks, {summary.dicom} DICOM) to {summary.root}"
        )
        err.print(f"next: eczema-batch ingest {summary.root}")


SegmenterOption = Annotated[
    str, typer.Option("--segmenter", help="seggpt (the method), none (no segmentation), manual "
                      "(an image's manual mask where it has one, else SegGPT).")
]


def _run_on_queue(
    factory: sessionmaker[Session], settings: Settings, config: RunConfig, *, queue: str,
    wait: bool, study: str | None, retry_failed: bool, as_json: bool,
) -> RunSummary | None:
    """Plan, send the jobs to `queue`, and follow them in the catalogue; None with no wait."""
    from eczema_batch.jobs import dispatch
    from eczema_batch.jobs.local import start_run
    from workers.celery_app import job_sender

    assert settings.broker_url is not None
    with job_sender(settings.broker_url) as send:  # reach the broker before planning anything
        plan = start_run(factory, config=config, executor="celery", queue=queue,
                         chunk_size=settings.chunk_size, study=study, retry_failed=retry_failed)
        tracked = dispatch.track(factory, plan)
        sent = dispatch.dispatch_plan(factory, plan, queue=queue, send=send)
    if not wait:
        if as_json:
            _emit_json({"run": plan.run_id, "queue": queue, "jobs_sent": len(sent),
                        "resumed_jobs": plan.resumed, "images": plan.images})
        else:
            err.print(f"run {plan.run_id}: sent {len(sent)} jobs to queue {queue}; "
                      "follow them with: eczema-batch status")
        return None
    if sent and not as_json:
        err.print(f"run {plan.run_id}: {len(sent)} jobs sent to queue {queue}, progress read from "
                  f"the catalogue (workers: eczema-batch worker --queue {queue}); Ctrl-C stops "
                  "waiting, the workers carry on")
    with _progress(f"measuring on queue {queue}") as update:
        dispatch.wait_for_jobs(
            factory, tracked, on_progress=lambda p: update(p.finished_images, p.total_images)
        )
    return dispatch.summarise(factory, plan, tracked)


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
    as_json: JsonOption = False,
) -> None:
    """Measure every image that still needs it: embed, retrieve prompts, segment, crop, classify.

    Runs in this process on the embedded default. Re-running does nothing new; changing a model
    redoes only what depends on it. With --queue the jobs go to Celery workers and progress is
    read from the catalogue; running it again sends whatever is still unfinished (after a broker
    restart, say).

    Example: eczema-batch run --model-dir ./models --segmenter seggpt

    Example: ECZEMA_BATCH_BROKER_URL=redis://redis:6379/0 eczema-batch run --queue gpu --no-wait
    """
    from eczema_batch.jobs.config import RunConfig
    from eczema_batch.jobs.local import run_in_process, start_run

    settings = _settings()
    if queue is None and no_wait:
        raise UsageError("--no-wait goes with --queue: without a queue the run is this process")
    if queue is not None and not settings.broker_url:
        raise UsageError("--queue needs a broker: set ECZEMA_BATCH_BROKER_URL=redis://host:6379/0")
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
        prompts=prompts, batch_size=batch_size, device=device,
    )
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
        "failed_jobs": {str(k): v for k, v in summary.failed_jobs.items()},
        "failed_images": {str(k): v for k, v in summary.failed_images.items()},
        "head": summary.targets.head_id,
    }
    if as_json:
        _emit_json(payload)
    else:
        if summary.jobs == 0:
            err.print("nothing to do: every image is measured with the current models")
        else:
            err.print(
                f"run {summary.run_id}: {summary.images.get('measure', 0)} images measured, "
                f"{summary.images.get('embed', 0)} references embedded, "
                f"{len(summary.failed_images)} images failed, "
                f"{len(summary.failed_jobs)} jobs failed"
            )
        for iid, reason in list(summary.failed_images.items())[:20]:
            err.print(f"  image {iid}: {reason}", highlight=False)
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
    from workers.celery_app import start_worker

    queues = [q.strip() for q in queue.split(",") if q.strip()]
    if not queues:
        raise UsageError("--queue: name at least one queue, e.g. --queue gpu")
    start_worker(queues=queues, concurrency=concurrency, device=device, loglevel=loglevel,
                 hostname=hostname)


@command(models_app, "list")
def models_list(
    model_dir: Annotated[Path | None, typer.Option(help="Folder of model weights.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the models eczema-batch knows and whether their weights are found.

    Example: eczema-batch models list --model-dir ./models
    """
    from eczema_batch.errors import ModelNotFoundError
    from eczema_batch.pipeline.loading import find_weights, weights_digest
    from eczema_batch.pipeline.registry import list_specs

    settings = _settings()
    folder = model_dir or settings.model_dir
    rows: list[dict[str, Any]] = []
    for spec in list_specs():
        try:
            found = find_weights(spec, model_dir=folder)
            where, digest = str(found), weights_digest(found)[:12]
        except ModelNotFoundError:
            where, digest = "not found", ""
        rows.append({"name": spec.name, "kind": spec.kind, "tiny": spec.tiny,
                     "weights": where, "digest": digest})
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="models")
    for column in ("name", "kind", "weights", "digest"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("name", "kind", "weights", "digest")))
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
        err.print(f"{name}: {path}")


heads_app = typer.Typer(no_args_is_help=True, help="Trained severity heads: list, choose.")
app.add_typer(heads_app, name="heads")

ClassWeightsOption = Annotated[
    str, typer.Option("--class-weights", help="balanced (weigh each class's loss by the inverse "
                      "of its frequency) or none.")
]
SegmenterModelOption = Annotated[
    str | None, typer.Option(help="Segmenter model name (ECZEMA_BATCH_SEGMENTER_MODEL).")
]
EmbedderModelOption = Annotated[
    str | None, typer.Option(help="Embedder model name (ECZEMA_BATCH_EMBEDDER_MODEL).")
]
ModelDirOption = Annotated[
    Path | None, typer.Option(help="Folder of model weights (ECZEMA_BATCH_MODEL_DIR).")
]


def _train_settings(epochs: int, lr: float, hidden: int, dropout: float, seed: int,
                    class_weights: str, batch_size: int) -> Any:
    from eczema_batch.pipeline.train import TrainSettings

    return TrainSettings(epochs=epochs, lr=lr, hidden=hidden, dropout=dropout, seed=seed,
                         class_weights=class_weights, batch_size=batch_size)  # type: ignore[arg-type]


def _head_row(table: Table, head: dict[str, Any]) -> None:
    f1 = head.get("in_sample_weighted_f1")
    features = f"{head['embedder']} + {head['segmenter'] or 'no segmenter'} " \
        f"({head['segmenter_mode']})"
    table.add_row(str(head["id"]), "*" if head["active"] else "", head["name"], features,
                  str(head["images"]), "-" if f1 is None else f"{f1:.3f}",
                  str(head["created_at"] or "")[:10])


def _heads_table(heads: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "active", "name", "features", "images", "in-sample wF1", "created"):
        table.add_column(column)
    for head in heads:
        _head_row(table, head)
    return table


@command(app)
def train(
    study: Annotated[str | None, typer.Option(help="Only this study's labelled images.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (paper: 1e-4).")] = 1e-4,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width (paper: 128).")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout (paper: 0.3).")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed: the same seed trains the same head.")] = 0,
    class_weights: ClassWeightsOption = "balanced",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    segmenter: SegmenterOption = "seggpt",
    segmenter_model: SegmenterModelOption = None,
    embedder_model: EmbedderModelOption = None,
    model_dir: ModelDirOption = None,
    name: Annotated[str | None, typer.Option(help="A name for the head.")] = None,
    no_activate: Annotated[
        bool, typer.Option("--no-activate", help="Keep the current active head.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Train the severity head on the labelled images' lesion-crop embeddings.

    Uses the newest label of each image and the embeddings `eczema-batch run` stored for the
    same models and --segmenter; the head is saved in the catalogue and becomes the one
    `eczema-batch run` predicts with (unless --no-activate). Figures printed are in-sample:
    `eczema-batch evaluate` estimates accuracy.

    Example: eczema-batch train --segmenter seggpt --epochs 50 --lr 1e-4 --seed 0
    """
    from eczema_batch.jobs.config import RunConfig
    from eczema_batch.training.train import train_head

    settings = _settings()
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
    )
    train_settings = _train_settings(epochs, lr, hidden, dropout, seed, class_weights, batch_size)
    head = train_head(_catalogue(settings), config=config, settings=train_settings, study=study,
                      activate=not no_activate, name=name)
    if as_json:
        _emit_json(head)
        return
    err.print(_heads_table([head], f"trained head {head['id']}"))
    counts = ", ".join(f"{c} {n}" for c, n in zip(head["classes"], head["class_counts"],
                                                   strict=True))
    err.print(f"labelled images per class: {counts}; final training loss "
              f"{head['final_loss']:.4f}")
    if head["active"]:
        err.print(f"head {head['id']} is active: `eczema-batch run` predicts with it")
    else:
        err.print(f"head {head['id']} is not active: eczema-batch heads use {head['id']}")


@command(app)
def evaluate(
    study: Annotated[str | None, typer.Option(help="Only this study's labelled images.")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds, grouped by patient.")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="Repeats with different seeds.")] = 3,
    segmenter: SegmenterOption = "seggpt",
    fractions: Annotated[
        str, typer.Option(help="Data-scaling curve: fractions of training patients.")
    ] = "0.2,0.4,0.6,0.8,1.0",
    seed: Annotated[int, typer.Option(help="Seed of splits, heads and bootstrap.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (paper: 50).")] = 50,
    lr: Annotated[float, typer.Option(help="Adam learning rate (paper: 1e-4).")] = 1e-4,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width (paper: 128).")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout (paper: 0.3).")] = 0.3,
    class_weights: ClassWeightsOption = "balanced",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = 32,
    bootstrap: Annotated[int, typer.Option(min=1, help="Patient bootstrap replicates.")] = 1000,
    no_ablation: Annotated[
        bool, typer.Option("--no-ablation", help="Skip the with/without segmentation ablation.")
    ] = False,
    segmenter_model: SegmenterModelOption = None,
    embedder_model: EmbedderModelOption = None,
    model_dir: ModelDirOption = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the whole report as JSON to FILE "
                                  "('-' for stdout).")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Write the head's out-of-fold predictions as CSV.")
    ] = None,
) -> None:
    """Cross-validate the method by patient and report it with error bars.

    Folds are grouped by patient and stratified by severity; prompts come only from the
    training fold's references, never the image's own patient. Reports the head beside a
    majority-class baseline and a logistic-regression probe, the segmentation ablation, the
    data-scaling curve and SegGPT's Dice/IoU against manual masks. Masks and embeddings are
    cached in the catalogue: repeating the command reuses them and gives the same numbers.

    Example: eczema-batch evaluate --folds 5 --repeats 3 --json report.json --predictions oof.csv
    """
    from eczema_batch.errors import UsageError
    from eczema_batch.jobs.config import RunConfig
    from eczema_batch.training.evaluate import EvaluationSettings, run_evaluation
    from eczema_batch.training.report import (
        report_json,
        summary_tables,
        write_predictions_csv,
    )

    try:
        fraction_values = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise UsageError(f"--fractions {fractions!r}: give numbers such as 0.2,0.5,1.0") from None
    settings = _settings()
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
    )
    eval_settings = EvaluationSettings(
        folds=folds, repeats=repeats, segmenter=segmenter,  # type: ignore[arg-type]
        fractions=fraction_values, seed=seed, bootstrap=bootstrap, ablation=not no_ablation,
        train=_train_settings(epochs, lr, hidden, dropout, seed, class_weights, batch_size),
    )
    stage = {"name": ""}
    with _progress("evaluating") as update:

        def on_progress(name: str, done: int, total: int) -> None:
            if name != stage["name"]:
                stage["name"] = name
                err.print(f"  {name}", highlight=False)
            update(done, total)

        result = run_evaluation(_catalogue(settings), config=config, settings=eval_settings,
                                study=study, progress=on_progress)
    if predictions is not None:
        write_predictions_csv(result.predictions, predictions)
    if json_file is not None:
        text = report_json(result.report)
        if str(json_file) == "-":
            sys.stdout.write(text)
        else:
            json_file.write_text(text, encoding="utf-8")
    for title, columns, rows in summary_tables(result.report):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        err.print(table)
    run_info = result.report["run"]
    err.print(f"model forwards: {run_info['forwards']} (per-fold recomputation would need "
              f"{run_info['naive_forwards']}); {run_info['seconds']['total']:.1f} s")


@command(heads_app, "list")
def heads_list(as_json: JsonOption = False) -> None:
    """List the trained severity heads; the active one is marked.

    Example: eczema-batch heads list --json
    """
    from eczema_batch.training.heads import list_heads

    factory = _catalogue(_settings())
    with factory() as session:
        heads = list_heads(session)
    if as_json:
        _emit_json(heads)
    elif not heads:
        err.print("no heads trained yet: eczema-batch train")
    else:
        err.print(_heads_table(heads, "severity heads"))


@command(heads_app, "use")
def heads_use(
    head_id: Annotated[int, typer.Argument(help="The head's id (eczema-batch heads list).")],
    as_json: JsonOption = False,
) -> None:
    """Make a head the active one for its features; `eczema-batch run` predicts with it.

    Example: eczema-batch heads use 3
    """
    from eczema_batch.training.heads import use_head

    factory = _catalogue(_settings())
    with factory() as session, session.begin():
        head = use_head(session, head_id)
    if as_json:
        _emit_json(head)
    else:
        replaced = ", ".join(map(str, head["replaced"])) or "none"
        err.print(f"head {head['id']} ({head['name']}) is active for {head['embedder']} with "
                  f"--segmenter {head['segmenter_mode']}; replaced: {replaced}")


# --- reports, exports, the review queue and the demo (eczema_batch/report, eczema_batch/demo) ---

review_app = typer.Typer(no_args_is_help=True, help="Images a rater should look at; decisions.")
app.add_typer(review_app, name="review")
HeadOption = Annotated[int | None, typer.Option(
    "--head", help="Read predictions of this head (default: the active one).")]
StudyOption = Annotated[str | None, typer.Option(help="Only this study.")]
PatientOption = Annotated[str | None, typer.Option(help="Only this patient (subject code).")]


def _print_wide(table: Table) -> None:
    """Tables of many columns: 120 columns when stderr is not a terminal (a log, a pipe)."""
    if err.is_terminal:
        err.print(table)
    else:  # rich caps print(width=) at the console's width (80 off a terminal)
        Console(stderr=True, width=max(err.width, 120)).print(table)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    value = round(value, 2) + 0.0  # no "-0.00"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _print_cohort(report: Any, *, limit: int) -> None:
    from rich import box

    from eczema_batch.report.trends import STATUSES, sparkline

    s, head, classes = report.summary, report.head, report.classes
    if head is None:
        err.print("[yellow]no severity head has predictions yet[/]: eczema-batch train, then "
                  "eczema-batch run (reviewed labels are shown meanwhile)")
    else:
        emb = head.embedder.name if head.embedder else "?"
        err.print(f"scores from head {head.id} {head.name!r} ({head.digest[:12]}) on {emb}",
                  highlight=False)
    table = Table(title=f"cohort: {s.patients} patients", show_header=False)
    for st in STATUSES:
        table.add_row(st, str(s.by_status.get(st, 0)))
    pct = f" ({100 * s.responders / s.evaluable:.0f}%)" if s.evaluable else ""
    table.add_row("responders", f"{s.responders} of {s.evaluable}{pct}")
    table.add_row("images waiting for review", str(s.flagged_images))
    table.add_row("images reviewed", str(s.reviewed_images))
    err.print(table)
    per_visit = Table(title="change from baseline (below 0: better)", box=box.SIMPLE_HEAD)
    for column in ("visit", "patients", "mean days", "mean change", "SD"):
        per_visit.add_column(column, justify="right")
    for v in s.per_visit:
        per_visit.add_row(str(v.number), str(v.n), _fmt(v.mean_days), _fmt(v.mean_change, True),
                          _fmt(v.sd_change))
    err.print(per_visit)
    shown = report.patients if limit == 0 else report.patients[:limit]
    patients = Table(title="patients", box=box.SIMPLE_HEAD)
    for column in ("patient", "visits", "baseline", "last", "change", "slope/30d", "95% CI",
                   "status", "resp.", "flagged", "trend"):
        patients.add_column(column, justify="left" if column in ("patient", "trend") else "right",
                            no_wrap=True)
    for p in shown:
        t = p.trend
        slope = t.slope
        patients.add_row(
            p.key.patient, str(len(t.visits)),
            classes[t.baseline.visit.severity] if t.baseline else "–",
            classes[t.last.visit.severity] if t.last else "–", _fmt(t.change_from_baseline, True),
            _fmt(slope.per_30_days if slope else None, True),
            f"{slope.ci_low:+.2f},{slope.ci_high:+.2f}" if slope and slope.ci_low is not None
            and slope.ci_high is not None else "–",
            t.status, {True: "yes", False: "no", None: "–"}[t.responder], str(t.n_flagged),
            sparkline([v.visit.expected_score for v in t.visits], high=len(classes) - 1))
    _print_wide(patients)
    if len(shown) < len(report.patients):
        err.print(f"... and {len(report.patients) - len(shown)} more patients: --limit 0 lists "
                  "all, --html DIR writes every page, eczema-batch export the rows")


def _print_visits(report: Any) -> None:
    from rich import box

    from eczema_batch.report.trends import sparkline

    classes = report.classes
    for p in report.patients:
        t = p.trend
        line = sparkline([v.visit.expected_score for v in t.visits], high=len(classes) - 1)
        table = Table(title=f"patient {p.key.patient} ({p.key.study}): {t.status}  {line}",
                      box=box.SIMPLE_HEAD)
        for column in ("visit", "date", "days", "images", "flagged", "reviewed", "class",
                       "score", "change", "vs prev"):
            table.add_column(column, justify="left" if column in ("visit", "class") else "right",
                             no_wrap=True)
        for vt in t.visits:
            v = vt.visit
            name = classes[v.severity] if v.severity is not None else "–"
            name += " (R)" if v.n_reviewed else ""
            date = v.visit_date.isoformat() if v.visit_date else "–"
            table.add_row(v.label if v.label != date else f"#{vt.number}", date,
                          "–" if vt.days_from_baseline is None else str(vt.days_from_baseline),
                          str(v.n_images), str(v.n_flagged), str(v.n_reviewed), name,
                          _fmt(v.expected_score), _fmt(vt.change_from_baseline, True),
                          _fmt(vt.change_from_previous, True))
        _print_wide(table)
        if t.n_reviewed:
            err.print("(R): a rater's reviewed label replaces the model's prediction for "
                      f"{t.n_reviewed} image(s) of this patient")


def _report_json(report: Any, *, visits: bool) -> dict[str, Any]:
    from dataclasses import asdict

    head = report.head
    patients = []
    for p in report.patients:
        t = p.trend
        item: dict[str, Any] = {
            "study": p.key.study, "patient": p.key.patient, "visits": len(t.visits),
            "status": t.status, "responder": t.responder,
            "change_from_baseline": t.change_from_baseline,
            "slope": asdict(t.slope) if t.slope else None, "flagged": t.n_flagged,
            "reviewed": t.n_reviewed,
        }
        if visits:
            item["visit_rows"] = [{
                "visit": vt.visit.label, "date": vt.visit.visit_date, "number": vt.number,
                "days_from_baseline": vt.days_from_baseline, "severity": vt.visit.severity,
                "expected_score": vt.visit.expected_score, "n_images": vt.visit.n_images,
                "n_flagged": vt.visit.n_flagged, "n_reviewed": vt.visit.n_reviewed,
                "change_from_baseline": vt.change_from_baseline,
                "change_from_previous": vt.change_from_previous,
            } for vt in t.visits]
        patients.append(item)
    s = report.summary
    return {
        "head": asdict(head) if head else None,
        "summary": {"patients": s.patients, "by_status": dict(s.by_status),
                    "responders": s.responders, "evaluable": s.evaluable, "images": s.images,
                    "flagged_images": s.flagged_images, "reviewed_images": s.reviewed_images,
                    "per_visit": [asdict(v) for v in s.per_visit]},
        "patients": patients,
    }


@command(app)
def report(
    study: StudyOption = None,
    patient: PatientOption = None,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write the HTML report (a page per patient) to this folder.")] = None,
    head: HeadOption = None,
    limit: Annotated[int, typer.Option(min=0, help="Patients listed (0: all).")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Severity per visit and trend per patient: the cohort summary, or one patient's visits.

    Visit severity is the mean of its images' class probabilities (a reviewed image counts as its
    rater's class); change is measured from the first scored visit (baseline).

    Example: eczema-batch report --patient S001 --html ./report
    """
    from eczema_batch.report.cohort import build_report, review_thresholds, trend_rules

    settings = _settings()
    factory = _catalogue(settings)
    with factory() as session:
        cohort = build_report(session, rules=trend_rules(settings),
                              thresholds=review_thresholds(settings), study=study,
                              patient=patient, head_id=head)
        written = None
        if html is not None:
            from eczema_batch.report.html import write_html_report

            with _progress("writing the HTML report"):
                written = write_html_report(session, cohort, html,
                                            max_pixels=settings.max_image_pixels,
                                            image_root=str(settings.image_root)
                                            if settings.image_root else None)
    if as_json:
        payload = _report_json(cohort, visits=patient is not None)
        payload["html"] = str(written.index) if written else None
        _emit_json(payload)
    else:
        _print_cohort(cohort, limit=limit)
        if patient is not None:
            _print_visits(cohort)
    if written is not None:
        err.print(f"HTML report: {written.index.resolve().as_uri()} ({written.patient_pages} "
                  f"patient pages, {written.thumbnails} thumbnails)", soft_wrap=True,
                  highlight=False)
        for iid, reason in list(written.unreadable.items())[:10]:
            err.print(f"  no thumbnail for image {iid}: {reason}", highlight=False)


@command(app)
def export(
    patient: PatientOption = None,
    study: StudyOption = None,
    level: Annotated[str, typer.Option(help="One row per image, visit or patient.")] = "visit",
    fmt: Annotated[str, typer.Option(
        "--format", help="csv, json, or dicom-seg (predicted masks of DICOM images).")] = "csv",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="File to write (default: stdout); a folder for dicom-seg.")] = None,
    head: HeadOption = None,
) -> None:
    """Tidy rows for statisticians (columns in the README), or DICOM SEG objects of the masks.

    No identifying data: subject codes, dates and body sites, never names, paths or notes.

    Example: eczema-batch export --level visit --format csv -o visits.csv
    """
    from eczema_batch.report.cohort import review_thresholds, trend_rules
    from eczema_batch.report.export import FORMATS, LEVELS, export_table

    if level not in LEVELS:
        raise UsageError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    settings = _settings()
    factory = _catalogue(settings)
    if fmt == "dicom-seg":
        if output is None:
            raise UsageError("--format dicom-seg writes a folder of files: give it with -o DIR")
        from eczema_batch.report.dicomseg import export_dicom_seg

        with factory() as session:
            seg = export_dicom_seg(session, output, study=study, patient=patient, head_id=head,
                                   image_root=str(settings.image_root)
                                   if settings.image_root else None)
        err.print(f"wrote {len(seg.written)} DICOM SEG objects to {output}; "
                  f"{len(seg.skipped)} DICOM images skipped")
        for iid, reason in list(seg.skipped.items())[:20]:
            err.print(f"  image {iid}: {reason}", highlight=False)
        return
    kwargs: dict[str, Any] = {"level": level, "fmt": fmt, "rules": trend_rules(settings),
                              "thresholds": review_thresholds(settings), "study": study,
                              "patient": patient, "head_id": head}
    with factory() as session:
        if output is None:
            result = export_table(session, sys.stdout, **kwargs)
        else:
            # Written aside and renamed: a failed export leaves no half file behind.
            partial = output.with_name(output.name + ".partial")
            try:
                with partial.open("w", encoding="utf-8", newline="") as out:
                    result = export_table(session, out, **kwargs)
                partial.replace(output)
            finally:
                partial.unlink(missing_ok=True)
    where = output or "stdout"
    err.print(f"wrote {result.rows} {level} rows ({len(result.columns)} columns) to {where}")
    if result.head is None:
        err.print("[yellow]no severity head has predictions yet[/]: severity columns are empty")


@command(review_app, "list")
def review_list(
    study: StudyOption = None,
    patient: PatientOption = None,
    head: HeadOption = None,
    as_json: JsonOption = False,
) -> None:
    """Flagged predictions waiting for a rater: low confidence, a flagged mask, weak prompts.

    Thresholds: ECZEMA_BATCH_REVIEW_MIN_CONFIDENCE, ECZEMA_BATCH_REVIEW_MIN_PROMPT_SIMILARITY.

    Example: eczema-batch review list --json
    """
    from eczema_batch.report.cohort import review_thresholds
    from eczema_batch.report.review import list_review_queue

    settings = _settings()
    factory = _catalogue(settings)
    with factory() as session:
        queue = list_review_queue(session, thresholds=review_thresholds(settings), study=study,
                                  patient=patient, head_id=head)
    if as_json:
        _emit_json({"head": queue.head.id if queue.head else None,
                    "items": [i.as_dict() for i in queue.items]})
        return
    if queue.head is None:
        err.print("no predictions to review yet: eczema-batch train, then eczema-batch run")
        return
    table = Table(title=f"review queue: {len(queue.items)} images")
    for column in ("image", "patient", "visit", "site", "model", "p", "why"):
        table.add_column(column, justify="right" if column in ("image", "p") else "left")
    for i in queue.items:
        table.add_row(str(i.image_id), i.patient, i.visit, i.body_site or "–",
                      i.predicted_class or "–", _fmt(i.top_probability), "; ".join(i.reasons))
    _print_wide(table)
    if queue.items:
        err.print("record a decision: eczema-batch review set IMAGE --severity K --by RATER")


@command(review_app, "set")
def review_set(
    image: Annotated[int, typer.Argument(help="Image id (eczema-batch review list).")],
    severity: Annotated[str, typer.Option(help="Class index (0-3) or name (e.g. moderate).")],
    by: Annotated[str, typer.Option("--by", help="Who decided (a rater's id, not a name).")],
    note: Annotated[str | None, typer.Option(help="Why, for the audit trail.")] = None,
    head: HeadOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a rater's severity for an image: a new reviewed label and an audit event.

    Nothing is overwritten: the prediction and earlier labels stay; reports use the newest review.

    Example: eczema-batch review set 42 --severity moderate --by rater-07 --note "crusted"
    """
    from eczema_batch.report.review import record_review

    factory = _catalogue(_settings())
    decision = record_review(factory, image_id=image, severity=severity, rater=by, note=note,
                             head_id=head)
    if as_json:
        _emit_json(decision.as_dict())
    else:
        was = "" if decision.previous is None else (
            f" (was {decision.previous} from the {decision.previous_source})")
        err.print(f"image {image}: {decision.severity_class} by {decision.rater}{was}; "
                  f"label {decision.label_id}, event {decision.event_id}", highlight=False)


@command(app)
def demo(
    folder: Annotated[Path | None, typer.Argument(
        help="Workspace to use (default: ECZEMA_BATCH_HOME, ./.eczema-batch).")] = None,
    tiny: Annotated[bool, typer.Option(
        "--tiny", help="Use tiny random models even when the real weights are found.")] = False,
    patients: Annotated[int, typer.Option(min=1, help="Synthetic patients.")] = 8,
    visits: Annotated[int, typer.Option(min=2, help="Visits per patient.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Try everything on a synthetic study: write, ingest, measure, train, report.

    Uses the real models when their weights are found, tiny random ones otherwise (and says so).
    Runs on an embedded SQLite catalogue in FOLDER; running it again reuses what is there.

    Example: eczema-batch demo ./demo --tiny
    """
    from eczema_batch.demo import DemoSize, run_demo

    settings = _settings()
    where = folder or settings.home
    result = run_demo(where, settings=settings, size=DemoSize(patients=patients, visits=visits),
                      tiny=tiny, say=lambda text: err.print(text, highlight=False))
    if result.models == "tiny":
        err.print(f"\n[bold black on yellow] TINY MODELS [/] [bold yellow]{result.segmenter} + "
                  f"{result.embedder} have random weights: every number below is meaningless; "
                  "it shows the workflow, not eczema severity.[/]\n"
                  f"why: {result.models_note}\n"
                  "for real results: eczema-batch models list shows where weights are looked for",
                  highlight=False, soft_wrap=True)
    else:
        err.print(f"\n[bold white on green] REAL MODELS [/] {result.segmenter} + "
                  f"{result.embedder} ({result.models_note})", highlight=False, soft_wrap=True)
    if result.head_problem:
        err.print(f"[yellow]no severity head trained[/]: {result.head_problem}", highlight=False)
    else:
        err.print("the head was trained on this study's own labels: its predictions here are "
                  "in-sample (eczema-batch evaluate estimates real accuracy)", soft_wrap=True)
    assert result.report is not None and result.html is not None
    if as_json:
        _emit_json({"folder": str(result.folder), "models": result.models,
                    "models_note": result.models_note, "segmenter": result.segmenter,
                    "embedder": result.embedder, "images": result.images,
                    "head_problem": result.head_problem, "seconds": result.seconds,
                    "report": _report_json(result.report, visits=False),
                    "html": str(result.html.index)})
        return
    _print_cohort(result.report, limit=10)
    err.print(f"HTML report: {result.html.index.as_uri()}", soft_wrap=True, highlight=False)
    if settings.database_url:
        err.print("(the demo used its own SQLite catalogue, not ECZEMA_BATCH_DATABASE_URL: "
                  "unset it to follow the steps below)", soft_wrap=True)
    err.print(f"catalogue: {result.database_url}; next:\n"
              f"  export ECZEMA_BATCH_HOME={result.folder}\n"
              "  eczema-batch report --patient S001\n"
              "  eczema-batch review list\n"
              "  eczema-batch export --level visit -o visits.csv", highlight=False)


@command(db_app, "upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the catalogue's schema (to the newest revision by default).

    Example: ECZEMA_BATCH_DATABASE_URL=postgresql+psycopg://user@host/db eczema-batch db upgrade
    """
    from eczema_batch.catalogue.db import current_revision, get_engine, upgrade

    settings = _settings()
    engine = get_engine(settings.resolved_database_url)
    upgrade(engine, revision)
    err.print(f"catalogue at revision {current_revision(engine)}")


@command(db_app, "current")
def db_current(as_json: JsonOption = False) -> None:
    """Show the catalogue's schema revision and the newest one this version knows.

    Example: eczema-batch db current
    """
    from eczema_batch.catalogue.db import current_revision, get_engine, head_revision

    settings = _settings()
    engine = get_engine(settings.resolved_database_url)
    current, head = current_revision(engine), head_revision(engine)
    url = engine.url.render_as_string(hide_password=True)
    if as_json:
        _emit_json({"url": url, "current": current, "head": head})
    else:
        typer.echo(f"{url}: {current or 'empty'} (newest: {head})")


def main() -> None:
    app(prog_name="eczema-batch")
