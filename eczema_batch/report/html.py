"""The static HTML report: a cohort page and a page per patient, readable offline in any browser.

    DIR/index.html                  cohort summary, mean severity and change per visit, patients
    DIR/cohort.png
    DIR/patients/<CODE>.html        a patient's visits, severity plot, images with masks and flags
    DIR/patients/<CODE>.png
    DIR/thumbs/<IMAGE>.jpg          200 px, the mask outlined
    DIR/images/<IMAGE>.jpg          800 px, and <IMAGE>-outline.jpg with the mask outlined

Pages are rendered from Jinja2 templates (`report/templates/`) with autoescaping on: every value
from the catalogue (codes, labels, raters' notes) is text on the page, never markup. The larger
view of an image is pure HTML and CSS (a `:target` overlay, a checkbox for the outline): no
script or file from elsewhere, so the folder works from a file:// URL, copied or zipped.

A patient's page is named by its subject code through `output.safe_name` (a code that is not a
plain file name gets a readable name and 8 hex digits of its hash); codes whose names would clash
(the same code in two studies, or two codes that differ only in case on a case-insensitive file
system) all get a suffix made of their study and code. A thumbnail that cannot be made (the study
folder moved, the file changed since it was catalogued) is listed with the reason instead of
failing the report.

The report is meant to be shared, so an image whose DICOM header says its pixels identify the
patient (BurnedInAnnotation or RecognizableVisualFeatures = YES: a name burnt into the picture, a
face) gets no picture, only a note and a flag, unless the user asks for them
(`include_identifying_pixels`).

Every file is written whole, inside DIR and never through a symbolic link (eczema_batch/output.py).
"""

from __future__ import annotations

import hashlib
import math
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jinja2
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch import __version__
from eczema_batch.catalogue.models import Image
from eczema_batch.clock import utcnow
from eczema_batch.errors import RejectedFileError
from eczema_batch.output import OutputFolder, safe_name
from eczema_batch.report.cohort import CohortReport, PatientReport, ReportTable
from eczema_batch.report.plots import (
    OUTLINE_CSS,
    OUTLINE_EDGE_CSS,
    IdentifyingPixelsError,
    VisitNumberScore,
    cohort_plot,
    identifying_pixels_reason,
    render_image,
    score_band,
    severity_plot,
)
from eczema_batch.report.queries import (
    ImageRecord,
    flag_reasons,
    image_files,
    iter_image_records,
    mask_pngs,
)
from eczema_batch.report.trends import STATUSES, VisitTrend
from eczema_batch.studyfiles import CataloguedFile

#: Longest side of a thumbnail, in pixels.
THUMB_SIDE = 200
#: Longest side of the larger view of an image, in pixels.
LARGE_SIDE = 800


@dataclass
class HtmlReport:
    index: Path
    patient_pages: int = 0
    thumbnails: int = 0
    #: image id -> why no thumbnail could be made
    unreadable: dict[int, str] = field(default_factory=dict)
    #: image id -> why its thumbnail was held back (its pixels identify the patient)
    withheld: dict[int, str] = field(default_factory=dict)
    #: patient id -> the name of its page (without `.html`) under DIR/patients
    page_names: dict[int, str] = field(default_factory=dict)


@cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("eczema_batch.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = _num
    env.filters["cell"] = _cell
    return env


def _render(template: str, *, large_side: int = LARGE_SIDE, **context: object) -> str:
    return _templates().get_template(template).render(
        version=__version__, outline=OUTLINE_CSS, outline_edge=OUTLINE_EDGE_CSS,
        large_side=large_side, **context)


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    value = round(value, digits) + 0.0  # no "-0.00"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else _num(value)
    return str(value)


def _class_name(classes: Sequence[str], k: int | None) -> str:
    if k is None:
        return "–"
    return classes[k] if 0 <= k < len(classes) else str(k)


def page_names(patients: Iterable[PatientReport]) -> dict[int, str]:
    """Patient id -> a file name (no suffix) for its page, distinct even where file names
    ignore case: the subject code when it is a plain name, else `output.safe_name`'s; codes whose
    names clash get `-` and 8 hex digits of their study and code, and the patient id if that
    still clashes."""
    patients = list(patients)
    base = {p.key.patient_id: safe_name(p.key.patient) for p in patients}
    counts = Counter(name.casefold() for name in base.values())
    names: dict[int, str] = {}
    for p in patients:
        name = base[p.key.patient_id]
        if counts[name.casefold()] > 1:
            digest = hashlib.sha256(f"{p.key.study}\0{p.key.patient}".encode(
                "utf-8", "surrogatepass")).hexdigest()[:8]
            name = f"{name}-{digest}"
        names[p.key.patient_id] = name
    taken = Counter(n.casefold() for n in names.values())
    return {pid: (f"{n}-{pid}" if taken[n.casefold()] > 1 else n) for pid, n in names.items()}


def _tiny_models(report: CohortReport) -> list[str]:
    """The tiny test models the scores come from, or models trained from them (the pages then
    say so loudly)."""
    head = report.head
    models = [m for m in (head.embedder, head.segmenter) if m is not None] if head else []
    # The registry names every tiny test model "tiny-*" (eczema_batch.pipeline.registry).
    return [m.name for m in models
            if m.name.startswith("tiny-") or m.derived_from.startswith("tiny-")]


def _tiny_trained(report: CohortReport) -> bool:
    """Whether a tiny model in use was trained on a study (adapted or tuned) rather than random."""
    head = report.head
    models = [m for m in (head.embedder, head.segmenter) if m is not None] if head else []
    return any(m.derived_from.startswith("tiny-") for m in models)


def _slope_text(p: PatientReport) -> str:
    s = p.trend.slope
    if s is None:
        return "–"
    ci = f" [{s.ci_low:+.2f}, {s.ci_high:+.2f}]" if s.ci_low is not None else ""
    return f"{s.per_30_days:+.2f}{ci}"


@dataclass(frozen=True)
class _Common:
    """What every page shows: the scale, the rules, the models."""

    classes: tuple[str, ...]
    tiny: list[str]
    generated: str
    #: the tiny models were trained on a (synthetic) study, not random
    tiny_trained: bool = False


def _common(report: CohortReport, generated: str) -> _Common:
    return _Common(classes=report.classes, tiny=_tiny_models(report), generated=generated,
                   tiny_trained=_tiny_trained(report))


def _mean_scores(report: CohortReport) -> list[VisitNumberScore]:
    """Mean expected score of the patients' n-th visits, over the visits that have a score."""
    values: dict[int, list[float]] = {}
    for p in report.patients:
        for vt in p.trend.visits:
            if vt.visit.expected_score is not None:
                values.setdefault(vt.number, []).append(vt.visit.expected_score)
    out = []
    for number in sorted(values):
        v = values[number]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
        out.append(VisitNumberScore(number=number, n=len(v), mean=mean, sd=sd))
    return out


def _index(report: CohortReport, common: _Common, names: dict[int, str]) -> str:
    s, classes = report.summary, report.classes
    patients = [{
        "page": f"patients/{names[p.key.patient_id]}.html", "code": p.key.patient,
        "study": p.key.study, "visits": len(p.trend.visits),
        "baseline": _class_name(classes, p.trend.baseline.visit.severity
                                if p.trend.baseline else None),
        "last": _class_name(classes, p.trend.last.visit.severity if p.trend.last else None),
        "change": _num(p.trend.change_from_baseline, 2, True), "slope": _slope_text(p),
        "status": p.trend.status,
        "responder": {True: "yes", False: "no", None: "–"}[p.trend.responder],
        "flagged": p.trend.n_flagged,
    } for p in report.patients]
    scores = {m.number: m for m in _mean_scores(report)}
    per_visit = [{
        "number": v.number, "n": v.n, "days": _num(v.mean_days, 0),
        "score": _num(scores[v.number].mean) if v.number in scores else "–",
        "band": (_class_name(classes, score_band(scores[v.number].mean, len(classes)))
                 if v.number in scores else "–"),
        "change": _num(v.mean_change, 2, True), "sd": _num(v.sd_change),
    } for v in s.per_visit]
    return _render(
        "index.html", page=common, report=report, summary=s, head=report.head,
        statuses=[(st, s.by_status.get(st, 0)) for st in STATUSES],
        responders=(f"{s.responders} of {s.evaluable} evaluable patients "
                    f"({100 * s.responders / s.evaluable:.0f}%)" if s.evaluable else "–"),
        per_visit=per_visit, patients=patients, tables=report.tables,
        top=len(classes) - 1)


@dataclass(frozen=True)
class _VisitRow:
    number: int
    label: str
    date: str
    days: str
    n_images: int
    n_flagged: int
    n_reviewed: int
    #: the most probable class of the visit's mean vector, and its probability
    top_class: str
    top_p: str
    score: str
    #: the class band the expected score falls in
    band: str
    change: str
    since_previous: str
    worst: str
    #: why the class and the score band differ, what is provisional, what reviews count
    notes: tuple[str, ...]


def _visit_notes(classes: Sequence[str], vt: VisitTrend) -> tuple[str, ...]:
    v = vt.visit
    notes = []
    if v.provisional:
        notes.append("provisional: every scored image is flagged and waits for a rater")
    elif v.n_flagged:
        notes.append(f"{v.n_flagged} of {v.n_scored} scored image(s) flagged for review")
    if v.n_reviewed:
        notes.append(f"{v.n_reviewed} reviewed image(s) count as their rater's class")
    p = v.probabilities
    if v.severity is not None and v.expected_score is not None and p:
        likeliest = [k for k, pk in enumerate(p) if pk == max(p)]
        if len(likeliest) > 1:
            notes.append(
                "equally likely: " + ", ".join(_class_name(classes, k) for k in likeliest)
                + f" (p {max(p):.2f} each); the lower class is shown")
        band = score_band(v.expected_score, len(classes))
        if band != v.severity:
            notes.append(
                f"class and score differ: the probability is spread over several classes; "
                f"{_class_name(classes, v.severity)} is the likeliest one (p {max(p):.2f}), "
                f"the score lies in the {_class_name(classes, band)} band")
    return tuple(notes)


def _visit_rows(classes: Sequence[str], visits: Iterable[VisitTrend]) -> list[_VisitRow]:
    rows = []
    for vt in visits:
        v = vt.visit
        date = v.visit_date.isoformat() if v.visit_date else "–"
        rows.append(_VisitRow(
            number=vt.number, label="" if v.label == date else v.label, date=date,
            days="–" if vt.days_from_baseline is None else str(vt.days_from_baseline),
            n_images=v.n_images, n_flagged=v.n_flagged, n_reviewed=v.n_reviewed,
            top_class=_class_name(classes, v.severity),
            top_p=_num(max(v.probabilities)) if v.probabilities else "–",
            score=_num(v.expected_score),
            band=(_class_name(classes, score_band(v.expected_score, len(classes)))
                  if v.expected_score is not None else "–"),
            change=_num(vt.change_from_baseline, 2, True),
            since_previous=_num(vt.change_from_previous, 2, True),
            worst=_class_name(classes, v.worst_severity), notes=_visit_notes(classes, vt)))
    return rows


@dataclass(frozen=True)
class _Figure:
    image_id: int
    body_site: str
    #: "reviewed", "flagged" or ""
    kind: str
    model: str | None
    reviewed: str | None
    rater: str | None
    note: str | None
    reasons: list[str]
    #: file names under thumbs/ and images/ (None: no picture, `problem` says why)
    thumb: str | None
    large: str | None
    large_outlined: str | None
    problem: str | None
    #: the command that records a rater's decision for this image
    review_command: str


def _figure(report: CohortReport, record: ImageRecord,
            files: tuple[str, str, str | None] | None, problem: str | None) -> _Figure:
    classes = report.classes
    reasons = flag_reasons(record, report.thresholds)
    kind = "reviewed" if record.reviewed is not None else ("flagged" if reasons else "")
    model = None
    if record.probabilities is not None:
        model = f"{_class_name(classes, record.predicted)} ({max(record.probabilities):.2f})"
    thumb, large, outlined = files if files is not None else (None, None, None)
    return _Figure(
        image_id=record.image_id, body_site=record.body_site or "site not recorded", kind=kind,
        model=model,
        reviewed=_class_name(classes, record.reviewed) if record.reviewed is not None else None,
        rater=record.rater, note=record.note, reasons=reasons, thumb=thumb, large=large,
        large_outlined=outlined, problem=problem,
        review_command=(f"eczema-batch review set {record.image_id} --severity CLASS "
                        "--by RATER --note \"why\""))


def _patient_page(report: CohortReport, common: _Common, p: PatientReport, name: str,
                  figures: dict[int, list[_Figure]], *, large_side: int) -> str:
    t = p.trend
    sections = []
    for vt in t.visits:
        v = vt.visit
        when = v.visit_date.isoformat() if v.visit_date else "undated"
        sections.append({"number": vt.number, "label": "" if v.label == when else v.label,
                         "when": when, "figures": figures.get(v.visit_id, [])})
    scope = f"--study {shlex.quote(p.key.study)} --patient {shlex.quote(p.key.patient)}"
    return _render(
        "patient.html", page=common, report=report, p=p, trend=t, plot=f"{name}.png",
        responder={True: "yes", False: "no", None: "–"}[t.responder],
        change=_num(t.change_from_baseline, 2, True), slope=_slope_text(p),
        rows=_visit_rows(report.classes, t.visits), sections=sections,
        review_list=f"eczema-batch review list {scope}",
        review_set="eczema-batch review set IMAGE --severity CLASS --by RATER --note \"why\"",
        rebuild="eczema-batch report --html DIR",
        classes_choice="|".join(report.classes), top=len(report.classes) - 1,
        tables=p.tables, large_side=large_side)


@dataclass(frozen=True)
class _Pictures:
    """An image's pictures: their file names (thumbnail, larger view, larger view outlined), or
    why none was made and whether it was held back (its pixels identify the patient)."""

    files: tuple[str, str, str | None] | None = None
    problem: str | None = None
    held_back: bool = False


def identifying_images(session: Session, image_ids: list[int]) -> dict[int, str]:
    """Image id -> the DICOM tag that says its pixels identify the patient, for flagged images."""
    if not image_ids:
        return {}
    rows = session.execute(
        select(Image.id, Image.identifying_pixels)
        .where(Image.id.in_(image_ids), Image.identifying_pixels.is_not(None)))
    return {iid: tag for iid, tag in rows if tag is not None}


def _by_patient(records: Iterator[ImageRecord], patients: list[PatientReport]
                ) -> Iterator[tuple[PatientReport, list[ImageRecord]]]:
    """Pair each patient with its image records (both streams are in the same patient order)."""
    pending = next(records, None)
    for p in patients:
        mine = []
        while pending is not None and pending.patient_id == p.key.patient_id:
            mine.append(pending)
            pending = next(records, None)
        yield p, mine


def write_html_report(
    session: Session,
    report: CohortReport,
    out_dir: Path,
    *,
    max_pixels: int,
    image_root: str | None = None,
    thumb_side: int = THUMB_SIDE,
    large_side: int = LARGE_SIDE,
    threads: int = 4,
    include_identifying_pixels: bool = False,
) -> HtmlReport:
    """Write the cohort page, a page per patient, the plots and the pictures under `out_dir`.

    Pictures are made in `threads` threads: each decodes a full photo and its full-size mask
    (about 0.1 s for 12 MP), and Pillow, zlib and numpy release the GIL while they work.
    """
    with OutputFolder(out_dir) as folder, folder.folder("patients") as pages, \
            folder.folder("thumbs") as thumbs, folder.folder("images") as larges:
        return _write_report(session, report, folder, pages, thumbs, larges,
                             max_pixels=max_pixels, image_root=image_root,
                             sides=(thumb_side, large_side), threads=threads,
                             include_identifying_pixels=include_identifying_pixels)


def _write_report(session: Session, report: CohortReport, folder: OutputFolder,
                  pages: OutputFolder, thumbs: OutputFolder, larges: OutputFolder, *,
                  max_pixels: int, image_root: str | None, sides: tuple[int, int],
                  threads: int, include_identifying_pixels: bool) -> HtmlReport:
    out_dir = folder.path
    common = _common(report, utcnow().strftime("%Y-%m-%d %H:%M UTC"))
    names = page_names(report.patients)
    result = HtmlReport(index=out_dir / "index.html", page_names=names)
    records = iter_image_records(session, head=report.head, study=report.study,
                                 patient=report.patient)
    # The image stream is read to the end first: the per-patient look-ups below use the session.
    pairs = list(_by_patient(records, report.patients))

    def make_pictures(record: ImageRecord, source: CataloguedFile, mask_png: bytes | None,
                      tag: str | None) -> _Pictures:
        if tag is not None and not include_identifying_pixels:
            return _Pictures(problem=identifying_pixels_reason(tag), held_back=True)
        try:
            made = render_image(source, mask_png, thumb_side=sides[0], large_side=sides[1],
                                max_pixels=max_pixels, identifying=include_identifying_pixels)
        except IdentifyingPixelsError as exc:
            return _Pictures(problem=str(exc), held_back=True)
        except RejectedFileError as exc:
            return _Pictures(problem=str(exc))
        iid = record.image_id
        thumbs.write_bytes(f"{iid}.jpg", made.thumbnail)
        larges.write_bytes(f"{iid}.jpg", made.large)
        outlined = None
        if made.large_outlined is not None:
            outlined = f"{iid}-outline.jpg"
            larges.write_bytes(outlined, made.large_outlined)
        return _Pictures(files=(f"{iid}.jpg", f"{iid}.jpg", outlined))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for p, mine in pairs:
            files = image_files(session, [r.image_id for r in mine], image_root=image_root)
            masks = mask_pngs(session, [r.mask_id for r in mine if r.mask_id is not None])
            flagged = identifying_images(session, [r.image_id for r in mine])
            outcomes = pool.map(make_pictures, mine, [files[r.image_id] for r in mine],
                                [masks.get(r.mask_id or -1) for r in mine],
                                [flagged.get(r.image_id) for r in mine])
            figures: dict[int, list[_Figure]] = {}
            for record, made in zip(mine, outcomes, strict=True):
                if made.files is not None:
                    result.thumbnails += 1
                elif made.problem is not None:
                    (result.withheld if made.held_back else result.unreadable)[
                        record.image_id] = made.problem
                figures.setdefault(record.visit_id, []).append(
                    _figure(report, record, made.files, made.problem))
            name = names[p.key.patient_id]
            title = f"{p.key.patient}: {p.trend.status}"
            pages.write_bytes(f"{name}.png", severity_plot(p.trend, report.classes, title=title))
            pages.write_text(f"{name}.html", _patient_page(report, common, p, name, figures,
                                                         large_side=sides[1]))
            result.patient_pages += 1
    folder.write_bytes("cohort.png", cohort_plot(
        _mean_scores(report), report.summary.per_visit, report.classes,
        stable_band=report.rules.stable_band))
    folder.write_text("index.html", _index(report, common, names))
    return result


__all__ = ["HtmlReport", "ReportTable", "page_names", "write_html_report"]
