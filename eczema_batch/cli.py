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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch import __version__
from eczema_batch.config import Settings, get_settings
from eczema_batch.errors import EczemaBatchError

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
    """What the catalogue holds, per study.

    Example: eczema-batch status --json
    """
    from eczema_batch.catalogue import queries

    factory = _catalogue(_settings())
    with factory() as session:
        counts = queries.study_counts(session)
        rejections = queries.rejections(session) if rejected else []
    if as_json:
        payload: dict[str, Any] = {"studies": [c.as_dict() for c in counts]}
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


@command(app)
def synth(
    folder: Annotated[Path, typer.Argument(help="New folder to write the study into.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 12,
    visits: Annotated[int, typer.Option(min=1, help="Visits per patient.")] = 4,
    images_per_visit: Annotated[int, typer.Option(min=1, help="Images per visit.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same files.")] = 0,
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
    as_json: JsonOption = False,
) -> None:
    """Measure every image that still needs it: embed, retrieve prompts, segment, crop, classify.

    Runs in this process on the embedded default. Re-running does nothing new; changing a model
    redoes only what depends on it.

    Example: eczema-batch run --model-dir ./models --segmenter seggpt
    """
    from eczema_batch.jobs.config import RunConfig
    from eczema_batch.jobs.local import run_in_process, start_run

    settings = _settings()
    config = RunConfig.from_settings(
        settings, segmenter_mode=segmenter, segmenter_model=segmenter_model,
        embedder_model=embedder_model, model_dir=str(model_dir) if model_dir else None,
        prompts=prompts, batch_size=batch_size, device=device,
    )
    factory = _catalogue(settings)
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
    rows = []
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
        table.add_row(row["name"], row["kind"], row["weights"], row["digest"])
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
