"""Catalogue commands: version, ingest, status, synth, db upgrade/current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from eczema_batch import __version__
from eczema_batch.cli.common import (
    JsonOption,
    _catalogue,
    _emit_json,
    _progress,
    _settings,
    app,
    command,
    database_url,
    db_app,
    err,
    literal,
)


@command(app)
def version() -> None:
    """Print the version.

    Example: eczema-batch version
    """
    typer.echo(f"eczema-batch {__version__}")


@command(app)
def ingest(
    folder: Annotated[Path, typer.Argument(help="The study folder: PATIENT/VISIT/images.")],
    study: Annotated[
        str | None, typer.Option(help="Study name (default: the folder's name).")
    ] = None,
    processes: Annotated[
        int, typer.Option(help="Decode processes (default: one per core).", min=0)
    ] = 0,
    moved: Annotated[bool, typer.Option(
        "--moved", help="The study was catalogued from another folder and now lives here.")
    ] = False,
    patient_id_pseudonyms: Annotated[bool, typer.Option(
        "--patient-id-pseudonyms",
        help="The study keys on DICOM PatientID: use it as the subject code where there is no "
        "ClinicalTrialSubjectID, stored only as a keyed pseudonym (HMAC-SHA-256 with "
        "ECZEMA_BATCH_PSEUDONYM_KEY, a secret you keep); the number itself is never stored.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Catalogue a study folder of JPEG, PNG and DICOM images.

    Every file is catalogued, recognised as already catalogued or a duplicate, or rejected with
    a reason. Running it again adds only what is new. A patient is the manifest's code, else the
    DICOM ClinicalTrialSubjectID, else the patient folder's name; never a hospital PatientID
    unless --patient-id-pseudonyms is given.

    Example: eczema-batch ingest ./study --json
    """
    from eczema_batch.config import pseudonym_key
    from eczema_batch.imaging.quality import thresholds_from
    from eczema_batch.ingest.service import ingest_study

    settings = _settings()
    key = pseudonym_key(settings) if patient_id_pseudonyms else None
    factory = _catalogue(settings)
    with _progress("ingesting") as update:
        report = ingest_study(
            folder,
            factory=factory,
            study_name=study,
            max_pixels=settings.max_image_pixels,
            max_file_bytes=settings.max_file_bytes,
            processes=processes or settings.ingest_workers,
            batch_files=settings.ingest_batch_files,
            progress=update,
            moved=moved,
            pseudonym_key=key,
            quality=thresholds_from(settings),
        )
    warnings = report.warnings + report.note_lines()
    for warning in warnings[:50]:  # stderr in both modes: stdout holds only the JSON object
        err.print(f"[yellow]warning:[/] {literal(warning)}", highlight=False)
    if len(warnings) > 50:
        err.print(f"... and {len(warnings) - 50} more warnings: ingest --json lists them, "
                  "eczema-batch status --sources shows where codes and dates came from",
                  highlight=False)
    if as_json:
        _emit_json(report.as_dict())
    else:
        table = Table(title=f"study {literal(report.study)}", show_header=False)
        table.add_row("files", str(report.files))
        table.add_row("catalogued", str(report.catalogued))
        table.add_row("already catalogued", str(report.already_catalogued))
        if report.updated:
            table.add_row("labels/masks added", str(report.updated))
        if report.quality_flagged:
            table.add_row("quality flagged", f"{report.quality_flagged} (eczema-batch review list)")
        table.add_row("duplicates", str(len(report.duplicates)))
        table.add_row("rejected", str(len(report.rejected)))
        err.print(table)
        for dup in sorted(report.duplicates, key=lambda d: d["path"])[:20]:
            err.print(f"  duplicate  {literal(dup['path'])}  (same as {literal(dup['same_as'])})",
                      highlight=False)
        for rej in sorted(report.rejected, key=lambda d: d["path"])[:50]:
            err.print(f"  rejected   {literal(rej['path'])}: {literal(rej['reason'])}",
                      highlight=False)
        if len(report.rejected) > 50:
            err.print(f"  ... and {len(report.rejected) - 50} more: eczema-batch status --rejected")
    if report.files == 0:
        err.print(f"no files found in {literal(folder)}: a study folder holds PATIENT/VISIT/ "
                  "images (.jpg, .png, .dcm) and optionally manifest.csv", highlight=False)
    elif report.exit_code == 1:
        err.print("nothing could be catalogued: every file was rejected (reasons above)")
    raise typer.Exit(report.exit_code)


@command(app)
def status(
    rejected: Annotated[bool, typer.Option("--rejected", help="List rejected files.")] = False,
    sources: Annotated[bool, typer.Option(
        "--sources", help="Where each patient's code and each visit's date came from, and what "
        "DICOM and the folders disagreed on.")] = False,
    as_json: JsonOption = False,
) -> None:
    """What the catalogue holds, per study, and where the work stands (jobs, failures).

    Jobs are counted by stage, queue and state from the catalogue (not the broker); running jobs
    are listed by the worker holding them; failed jobs and images come with their reasons.

    Example: eczema-batch status --sources --json
    """
    from eczema_batch.catalogue import queries
    from eczema_batch.jobs.status import job_status

    factory = _catalogue(_settings())
    with factory() as session:
        counts = queries.study_counts(session)
        rejections = queries.rejections(session) if rejected else []
        origins = queries.subject_sources(session) if sources else []
        jobs = job_status(session)
    if as_json:
        payload: dict[str, Any] = {"studies": [c.as_dict() for c in counts],
                                   "jobs": jobs.as_dict()}
        if rejected:
            payload["rejected"] = [
                {"study": s, "path": p, "kind": k, "reason": r} for s, p, k, r in rejections
            ]
        if sources:
            payload["sources"] = [o.as_dict() for o in origins]
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
        table.add_row(literal(c.study), str(c.patients), str(c.visits), str(c.images),
                      str(c.reference_masks), str(c.labelled_images), str(c.rejected),
                      str(c.duplicates))
    err.print(table)
    for c in counts:
        if c.quality_flagged:
            err.print(f"  {literal(c.study)}: {c.quality_flagged} photograph(s) the quality gate "
                      "flagged (blurred, badly exposed, a colour cast): eczema-batch review list",
                      highlight=False)
        if c.identifying_pixels:
            err.print(f"  {c.study}: {c.identifying_pixels} image(s) whose DICOM header says the "
                      "pixels identify the patient (BurnedInAnnotation or "
                      "RecognizableVisualFeatures): kept out of the HTML report's thumbnails",
                      highlight=False, markup=False)
    for study, path, kind, reason in rejections:
        err.print(f"  {literal(study)}  {kind:9}  {literal(path)}: {literal(reason)}",
                  highlight=False)
    for origin in origins:
        _print_sources(origin)
    if jobs.counts:
        _print_jobs(jobs)


def _print_sources(origin: Any) -> None:
    """One study's patients and visits with where each code and date came from."""
    def tally(counts: dict[str, int]) -> str:
        return ", ".join(f"{source} {n}" for source, n in counts.items()) or "none"

    from eczema_batch.cli.reports import _print_wide

    table = Table(title=f"study {literal(origin.study)}: where codes and dates came from")
    for column in ("patient", "code from", "visit", "date", "date from", "images"):
        table.add_column(column, justify="right" if column == "images" else "left", no_wrap=True)
    for p in origin.patients:
        first = True
        for v in p.visits or [None]:
            row = [p.patient if first else "", p.code_source if first else ""]
            row += ([v.visit, v.date.isoformat() if v.date else "–", v.date_source, str(v.images)]
                    if v is not None else ["–", "–", "–", "0"])
            table.add_row(*(literal(cell) for cell in row))
            first = False
    _print_wide(table)
    err.print(literal(f"  codes from: {tally(origin.code_counts())}; visit dates from: "
                      f"{tally(origin.date_counts())}"), highlight=False)
    for note in origin.notes:
        err.print(literal(f"  at ingest {note['at'][:16]}: {note['folder']}: {note['note']} "
                          f"({note['files']} file(s))"), highlight=False)


def _print_jobs(jobs: Any) -> None:
    table = Table(title="jobs")
    for column in ("stage", "queue", "state", "jobs", "images"):
        table.add_column(column, justify="right" if column in ("jobs", "images") else "left")
    for c in jobs.counts:
        table.add_row(c.stage, literal(c.queue), c.state, str(c.jobs), str(c.images))
    err.print(table)
    for w in jobs.workers:
        beat = w.last_heartbeat.strftime("%H:%M:%S") if w.last_heartbeat else "never"
        note = "  (lease expired: presumed dead, the job will be taken over)" if w.expired else ""
        err.print(f"  running on {literal(w.worker)}: {w.jobs} job(s), last heartbeat {beat}{note}",
                  highlight=False)
    for j in jobs.failed_jobs[:10]:
        err.print(f"  failed job {j.id} ({j.stage}, {literal(j.queue)}, {j.attempts} attempts): "
                  f"{literal(j.error.splitlines()[0] if j.error else '')}", highlight=False)
    for i in jobs.failed_images[:20]:
        err.print(f"  failed image {i.id} {literal(i.study)}/{literal(i.path)}: "
                  f"{literal(i.reason)}", highlight=False)
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
    truth: Annotated[
        Path | None,
        typer.Option(help="New folder, outside the study, for the known truth: truth.csv and "
                     "every image's true lesion mask."),
    ] = None,
    fitzpatrick_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of patients whose Fitzpatrick skin type the manifest "
        "gives (the others' is estimated from the pixels).")] = 0.0,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic study (photos, DICOM, masks, manifest) to try the tool.

    Example: eczema-batch synth ./demo-study --patients 12 --visits 4 --seed 0 --truth ./demo-truth
    """
    from eczema_batch.synth import write_synthetic_study

    summary = write_synthetic_study(
        folder,
        patients=patients,
        visits=visits,
        seed=seed,
        images_per_visit=images_per_visit,
        size=(width, height),
        truth=truth,
        fitzpatrick_share=fitzpatrick_share,
    )
    payload = {
        "folder": str(summary.root),
        "truth": str(summary.truth) if summary.truth is not None else None,
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
            f"({summary.references} with manual masks, {summary.dicom} DICOM) to "
            f"{literal(summary.root)}"
        )
        if summary.truth is not None:
            err.print(f"wrote the truth (truth.csv, every image's lesion mask) to "
                      f"{literal(summary.truth)}")
        err.print(f"next: eczema-batch ingest {literal(summary.root)}")


@command(db_app, "upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the catalogue's schema (to the newest revision by default).

    Example: ECZEMA_BATCH_DATABASE_URL=postgresql+psycopg://user@host/db eczema-batch db upgrade
    """
    from eczema_batch.catalogue.db import current_revision, describe, get_engine, upgrade

    settings = _settings()
    engine = get_engine(database_url(settings))
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    change = "already at" if before == after else f"from {before or 'empty'} to"
    err.print(f"{describe(engine)}: schema {change} revision {after}", highlight=False,
              markup=False)


@command(db_app, "current")
def db_current(as_json: JsonOption = False) -> None:
    """Show the catalogue's schema revision and the newest one this version knows.

    Example: eczema-batch db current
    """
    from eczema_batch.catalogue.db import describe, get_engine, schema_state

    settings = _settings()
    engine = get_engine(database_url(settings))
    schema = schema_state(engine)
    if as_json:
        _emit_json({"url": engine.url.render_as_string(hide_password=True),
                    "current": schema.current, "head": schema.head, "state": schema.state})
        return
    advice = {"current": "up to date", "empty": "no catalogue yet: eczema-batch db upgrade",
              "behind": "run `eczema-batch db upgrade`",
              "newer": "made by a newer eczema-batch: use that version"}[schema.state]
    typer.echo(f"{describe(engine)}: {schema.current or 'empty'} (newest: {schema.head}; "
               f"{advice})")
