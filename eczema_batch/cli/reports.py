"""Reports and exports (eczema_batch/report), and the printing the review queue and demo share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from eczema_batch.cli.common import (
    JsonOption,
    VerbatimOption,
    _catalogue,
    _emit_json,
    _progress,
    _settings,
    app,
    check_output,
    command,
    err,
    literal,
    writing_to,
)
from eczema_batch.errors import UsageError

HeadOption = Annotated[int | None, typer.Option(
    "--head", help="Read predictions of this head (default: the active one).")]
StudyOption = Annotated[str | None, typer.Option(help="Only this study.")]
PatientOption = Annotated[str | None, typer.Option(help="Only this patient (subject code).")]


def _print_wide(table: Table) -> None:
    """Tables of many columns: 120 columns when stderr is not a terminal (a log, a pipe)."""
    if err.is_terminal:
        err.print(table)
    else:  # rich caps print(width=) at the console's width (80 off a terminal)
        Console(stderr=True, width=max(err.width, 120), emoji=False).print(table)


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
        err.print(f"scores from head {head.id} {literal(repr(head.name))} ({head.digest[:12]}) "
                  f"on {literal(emb)}", highlight=False)
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
            literal(p.key.patient), str(len(t.visits)),
            literal(classes[t.baseline.visit.severity]) if t.baseline else "–",
            literal(classes[t.last.visit.severity]) if t.last else "–",
            _fmt(t.change_from_baseline, True),
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
        table = Table(title=f"patient {literal(p.key.patient)} ({literal(p.key.study)}): "
                      f"{t.status}  {line}",
                      box=box.SIMPLE_HEAD)
        for column in ("visit", "date", "days", "images", "flagged", "reviewed", "class",
                       "score", "change", "vs prev"):
            table.add_column(column, justify="left" if column in ("visit", "class") else "right",
                             no_wrap=True)
        for vt in t.visits:
            v = vt.visit
            name = literal(classes[v.severity]) if v.severity is not None else "–"
            name += " (R)" if v.n_reviewed else ""
            date = v.visit_date.isoformat() if v.visit_date else "–"
            table.add_row(literal(v.label) if v.label != date else f"#{vt.number}", date,
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
    evaluation: Annotated[Path | None, typer.Option(
        "--evaluation", help="With --html: show this evaluation's agreement, subgroup and "
        "robustness tables (the JSON `eczema-batch evaluate -o FILE` wrote) on the cohort "
        "page.")] = None,
    head: HeadOption = None,
    limit: Annotated[int, typer.Option(min=0, help="Patients listed (0: all).")] = 30,
    include_identifying_pixels: Annotated[bool, typer.Option(
        "--include-identifying-pixels",
        help="Also make thumbnails of images whose DICOM header says the pixels identify the "
        "patient (BurnedInAnnotation, RecognizableVisualFeatures): only for a report that stays "
        "inside the care team.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Severity per visit and trend per patient: the cohort summary, or one patient's visits.

    Visit severity is the mean of its images' class probabilities (a reviewed image counts as its
    rater's class); change is measured from the first scored visit (baseline).

    Example: eczema-batch report --patient S001 --html ./report

    Example: eczema-batch report --html ./report --evaluation evaluation.json
    """
    from eczema_batch.report.cohort import build_report, review_thresholds, trend_rules

    settings = _settings()
    if html is not None:
        check_output(html, folder=True)
    evaluated = None
    if evaluation is not None:
        if html is None:
            raise UsageError("--evaluation adds tables to the HTML report: give --html FOLDER")
        from eczema_batch.report.extra_tables import load_evaluation

        evaluated = load_evaluation(evaluation)
    factory = _catalogue(settings)
    with factory() as session:
        cohort = build_report(session, rules=trend_rules(settings),
                              thresholds=review_thresholds(settings), study=study,
                              patient=patient, head_id=head)
        if html is not None:
            from eczema_batch.report.extra_tables import (
                evaluation_tables,
                rater_agreement_tables,
            )

            if evaluated is None or evaluated.agreement is None:
                cohort.tables.extend(rater_agreement_tables(
                    session, study=study, reference_rule=settings.reference_label))
            if evaluated is not None:
                cohort.tables.extend(evaluation_tables(evaluated))
        written = None
        if html is not None:
            from eczema_batch.report.html import write_html_report

            with _progress("writing the HTML report"):
                written = write_html_report(session, cohort, html,
                                            max_pixels=settings.max_image_pixels,
                                            image_root=str(settings.image_root)
                                            if settings.image_root else None,
                                            threads=settings.decode_threads,
                                            include_identifying_pixels=include_identifying_pixels)
    if as_json:
        payload = _report_json(cohort, visits=patient is not None)
        payload["html"] = str(written.index) if written else None
        _emit_json(payload)
    else:
        _print_cohort(cohort, limit=limit)
        if patient is not None:
            _print_visits(cohort)
    if written is not None:
        err.print(f"HTML report: {literal(written.index.resolve().as_uri())} "
                  f"({written.patient_pages} "
                  f"patient pages, {written.thumbnails} thumbnails)", soft_wrap=True,
                  highlight=False)
        for iid, reason in list(written.unreadable.items())[:10]:
            err.print(f"  no thumbnail for image {iid}: {literal(reason)}", highlight=False)
        if written.withheld:
            err.print(f"  {len(written.withheld)} image(s) without a thumbnail because their "
                      "DICOM header says the pixels identify the patient (images "
                      f"{', '.join(str(i) for i in list(written.withheld)[:10])}"
                      f"{' ...' if len(written.withheld) > 10 else ''}); "
                      "--include-identifying-pixels shows them", highlight=False, markup=False)


@command(app)
def export(
    patient: PatientOption = None,
    study: StudyOption = None,
    level: Annotated[str, typer.Option(help="One row per image, visit or patient.")] = "visit",
    fmt: Annotated[str, typer.Option(
        "--format", help="csv, json, dicom-seg (predicted masks of DICOM images), or adam (a "
        "CDISC ADaM BDS dataset of the visit endpoints: CSV, SAS transport and a "
        "dictionary).")] = "csv",
    output: Annotated[Path | None, typer.Option(
        "-o", "--output",
        help="File to write (default: stdout); a folder for dicom-seg and adam.")] = None,
    head: HeadOption = None,
    keep_patient_tags: Annotated[bool, typer.Option(
        "--keep-patient-tags",
        help="dicom-seg only: copy the source's patient and study attributes (name, birth date, "
        "PatientID, accession number...) into each SEG, for a round trip to the PACS they came "
        "from. By default a SEG carries only the UIDs that reference its source.")] = False,
    verbatim: VerbatimOption = False,
) -> None:
    """Tidy rows for statisticians (columns in the README), or DICOM SEG objects of the masks.

    No identifying data: subject codes, dates and body sites, never names, paths or notes. A DICOM
    SEG references its source by UIDs only, unless --keep-patient-tags asks for a PACS round trip.
    In CSV, a text cell a spreadsheet would run as a formula (=, +, -, @ first) starts with '
    unless --verbatim (for R or pandas).

    With --format adam, DIR receives adecz.csv, adecz.xpt (SAS transport v5) and
    adam-dictionary.json: a record per subject, parameter and visit.

    Example: eczema-batch export --level visit --format csv -o visits.csv
    """
    from eczema_batch.report.cohort import review_thresholds, trend_rules
    from eczema_batch.report.export import FORMATS, LEVELS, export_table

    if level not in LEVELS:
        raise UsageError(f"--level {level!r}: use one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if keep_patient_tags and fmt != "dicom-seg":
        raise UsageError("--keep-patient-tags is for --format dicom-seg: rows never carry them")
    settings = _settings()
    if output is not None:
        check_output(output, folder=fmt in ("dicom-seg", "adam"))
    factory = _catalogue(settings)
    if fmt == "adam":
        if output is None:
            raise UsageError("--format adam writes a folder of files: give it with -o DIR")
        from eczema_batch.output import OutputFolder
        from eczema_batch.report.adam import build_adam, write_adam

        with factory() as session:
            dataset = build_adam(session, rules=trend_rules(settings),
                                 thresholds=review_thresholds(settings), study=study,
                                 patient=patient, head_id=head)
        with writing_to(output), OutputFolder(output) as folder:
            files = write_adam(dataset, folder, verbatim=verbatim)
        err.print(f"wrote {files.records} ADaM records of {files.subjects} subjects to "
                  f"{literal(output)} ({literal(Path(files.csv).name)}, "
                  f"{literal(Path(files.xpt).name)}, {literal(Path(files.dictionary).name)})",
                  highlight=False)
        if dataset.head is None:
            err.print("[yellow]no severity head has predictions yet[/]: only reviewed images "
                      "are scored")
        return
    if fmt == "dicom-seg":
        if output is None:
            raise UsageError("--format dicom-seg writes a folder of files: give it with -o DIR")
        from eczema_batch.report.dicomseg import export_dicom_seg

        with factory() as session:
            seg = export_dicom_seg(session, output, study=study, patient=patient, head_id=head,
                                   image_root=str(settings.image_root)
                                   if settings.image_root else None,
                                   keep_patient_tags=keep_patient_tags)
        err.print(f"wrote {len(seg.written)} DICOM SEG objects to {literal(output)}; "
                  f"{len(seg.skipped)} DICOM images skipped", highlight=False)
        for iid, reason in list(seg.skipped.items())[:20]:
            err.print(f"  image {iid}: {literal(reason)}", highlight=False)
        return
    kwargs: dict[str, Any] = {"level": level, "fmt": fmt, "rules": trend_rules(settings),
                              "thresholds": review_thresholds(settings), "study": study,
                              "patient": patient, "head_id": head, "verbatim": verbatim}
    with factory() as session:
        if output is None:
            result = export_table(session, sys.stdout, **kwargs)
        else:
            from eczema_batch.output import output_file

            # Written aside and renamed: a failed export leaves no half file behind.
            with writing_to(output), output_file(output) as out:
                result = export_table(session, out, **kwargs)
    where = literal(output) if output else "stdout"
    err.print(f"wrote {result.rows} {level} rows ({len(result.columns)} columns) to {where}",
              highlight=False)
    if result.head is None:
        err.print("[yellow]no severity head has predictions yet[/]: severity columns are empty")
