"""The static HTML report: a cohort page and a page per patient, readable offline in any browser.

    DIR/index.html              cohort summary, mean change per visit, every patient with a link
    DIR/cohort.png
    DIR/patients/p<ID>.html     a patient's visits, severity plot, thumbnails with masks and flags
    DIR/patients/p<ID>.png
    DIR/thumbs/<IMAGE>.jpg

Every text is escaped; links are relative, so the folder can be copied or zipped. A thumbnail that
cannot be made (the study folder moved, the file changed since it was catalogued) is listed with
the reason instead of failing the report.

The report is meant to be shared, so an image whose DICOM header says its pixels identify the
patient (BurnedInAnnotation or RecognizableVisualFeatures = YES: a name burnt into the picture, a
face) gets no thumbnail, only a note and a flag, unless the user asks for them
(`include_identifying_pixels`).

Every file is written whole, inside DIR and never through a symbolic link (eczema_batch/output.py);
file names are made of catalogue ids only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch import __version__
from eczema_batch.catalogue.models import Image
from eczema_batch.clock import utcnow
from eczema_batch.errors import RejectedFileError
from eczema_batch.output import OutputFolder
from eczema_batch.report.cohort import CohortReport, PatientReport
from eczema_batch.report.plots import (
    IdentifyingPixelsError,
    cohort_plot,
    identifying_pixels_reason,
    severity_plot,
    thumbnail,
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

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:72em}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
.improving{color:#1a7f37}.worsening{color:#c62828}.stable{color:#555}.unknown{color:#999}
.thumbs{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:210px;font-size:.85em}
figure.flagged img{outline:3px solid #e69500}
figure.reviewed img{outline:3px solid #1a7f37}
ul.flags{color:#b45f00;padding-left:1.2em;margin:.2em 0}
img.broken{outline:3px dashed #c62828}
.note{color:#666;font-size:.9em}
.tiny{background:#fdecea;border:2px solid #c62828;padding:.5em .8em;font-weight:bold}
"""
# Marks images that did not load (and counts them on <body>), so a reader sees a broken link.
_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0));
  broken.forEach(i => i.classList.add("broken"));
  document.body.dataset.imagesLoaded = String(images.length - broken.length);
  document.body.dataset.imagesBroken = String(broken.length);
});
"""


@dataclass
class HtmlReport:
    index: Path
    patient_pages: int = 0
    thumbnails: int = 0
    #: image id -> why no thumbnail could be made
    unreadable: dict[int, str] = field(default_factory=dict)
    #: image id -> why its thumbnail was held back (its pixels identify the patient)
    withheld: dict[int, str] = field(default_factory=dict)


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script>"
            f"</head>\n<body>\n{body}\n</body></html>\n")


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "–"
    value = round(value, digits) + 0.0  # no "-0.00"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cls(classes: tuple[str, ...], k: int | None) -> str:
    if k is None:
        return "–"
    return escape(classes[k] if k < len(classes) else str(k))


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _slope_text(p: PatientReport) -> str:
    s = p.trend.slope
    if s is None:
        return "–"
    ci = f" [{s.ci_low:+.2f}, {s.ci_high:+.2f}]" if s.ci_low is not None else ""
    return f"{s.per_30_days:+.2f}{ci}"


def _tiny_banner(report: CohortReport) -> str:
    """A loud warning when the scores come from the tiny random-weight test models."""
    head = report.head
    names = [m.name for m in (head.embedder, head.segmenter) if m is not None] if head else []
    # The registry names every tiny test model "tiny-*" (eczema_batch.pipeline.registry).
    tiny = [n for n in names if n.startswith("tiny-")]
    if not tiny:
        return ""
    return (f'<p class="tiny" id="tiny-models">Scored with tiny random-weight test models '
            f'({escape(", ".join(tiny))}): every number here is meaningless; it shows the '
            "workflow, not eczema severity.</p>")


def _index(report: CohortReport, generated: str) -> str:
    s, classes = report.summary, report.classes
    head = report.head
    model = (f"head {escape(head.name)} ({escape(head.digest[:12])}), embedder "
             f"{escape(head.embedder.name) if head.embedder else '–'}, segmenter "
             f"{escape(head.segmenter.name) if head.segmenter else '–'}" if head else
             "no severity head has predictions yet: run <code>eczema-batch train</code> and "
             "<code>eczema-batch run</code>")
    status_rows = [[f'<span class="{st}">{st}</span>', str(s.by_status.get(st, 0))]
                   for st in STATUSES]
    responders = (f"{s.responders} of {s.evaluable} evaluable patients "
                  f"({100 * s.responders / s.evaluable:.0f}%)" if s.evaluable else "–")
    per_visit = [[str(v.number), str(v.n), _num(v.mean_days, 0), _num(v.mean_change, 2, True),
                  _num(v.sd_change)] for v in s.per_visit]
    patients = [[
        f'<a href="patients/p{p.key.patient_id}.html">{escape(p.key.patient)}</a>',
        escape(p.key.study), str(len(p.trend.visits)),
        _cls(classes, p.trend.baseline.visit.severity if p.trend.baseline else None),
        _cls(classes, p.trend.last.visit.severity if p.trend.last else None),
        _num(p.trend.change_from_baseline, 2, True), _slope_text(p),
        f'<span class="{p.trend.status}">{p.trend.status}</span>',
        {True: "yes", False: "no", None: "–"}[p.trend.responder], str(p.trend.n_flagged),
    ] for p in report.patients]
    rules, th = report.rules, report.thresholds
    return _page("Eczema severity: cohort", f"""
<h1>Eczema severity: cohort{' ' + escape(report.study) if report.study else ''}</h1>
<p class="note">eczema-batch {escape(__version__)}, {escape(generated)}. Scores: {model}.</p>
{_tiny_banner(report)}
<h2>Patients by status</h2>
{_table(["status", "patients"], status_rows)}
<p>Responders (last visit at least {rules.responder_classes} class(es) better than baseline):
<b id="responders">{responders}</b>. Stable means a change from baseline within
&plusmn;{rules.stable_band:g} (expected score, 0&ndash;{len(classes) - 1}).</p>
<p>Images: {s.images}; scored {s.scored_images}; waiting for review
<b id="flagged">{s.flagged_images}</b>; reviewed {s.reviewed_images}. Flagged when the top
probability is below {th.min_confidence:g}, the mask is flagged, or the prompts' mean similarity
is below {th.min_prompt_similarity:g}.</p>
<h2>Mean change from baseline per visit</h2>
<img src="cohort.png" alt="mean change from baseline per visit number" width="640">
{_table(["visit", "patients", "mean days", "mean change", "SD"], per_visit)}
<h2>Patients</h2>
{_table(["patient", "study", "visits", "baseline", "last", "change", "slope /30 d [95% CI]",
         "status", "responder", "flagged"], patients)}
""")


def _visit_rows(report: CohortReport, visits: Iterable[VisitTrend]) -> list[list[str]]:
    classes = report.classes
    rows = []
    for vt in visits:
        v = vt.visit
        marks = " (reviewed)" if v.n_reviewed else ""
        marks += " (all flagged)" if v.provisional else ""
        date = v.visit_date.isoformat() if v.visit_date else "–"
        label = str(vt.number) if v.label == date else f"{vt.number} {escape(v.label)}"
        rows.append([label, escape(date),
                     "–" if vt.days_from_baseline is None else str(vt.days_from_baseline),
                     str(v.n_images), str(v.n_flagged), str(v.n_reviewed),
                     _cls(classes, v.severity) + marks, _num(v.expected_score),
                     _num(vt.change_from_baseline, 2, True),
                     _num(vt.change_from_previous, 2, True), _cls(classes, v.worst_severity)])
    return rows


def _figure(report: CohortReport, record: ImageRecord, thumb: str | None, problem: str | None
            ) -> str:
    classes = report.classes
    reasons = flag_reasons(record, report.thresholds)
    kind = "reviewed" if record.reviewed is not None else ("flagged" if reasons else "")
    lines = [f"image {record.image_id}, {escape(record.body_site or 'site not recorded')}"]
    if record.probabilities is not None:
        top = max(record.probabilities)
        lines.append(f"model: {_cls(classes, record.predicted)} ({top:.2f})")
    if record.reviewed is not None:
        lines.append(f"<b>reviewed by {escape(record.rater or '?')}: "
                     f"{_cls(classes, record.reviewed)}</b>")
    flags = "".join(f"<li>{escape(r)}</li>" for r in reasons)
    picture = (f'<img src="../thumbs/{escape(thumb)}" alt="image {record.image_id}">' if thumb
               else f'<p class="note">no thumbnail: {escape(problem or "unknown")}</p>')
    return (f'<figure class="thumb {kind}" data-image-id="{record.image_id}">{picture}'
            f'<figcaption>{"<br>".join(lines)}'
            f'{f"<ul class=flags>{flags}</ul>" if flags else ""}</figcaption></figure>')


def _patient_page(report: CohortReport, p: PatientReport, figures: dict[int, list[str]]) -> str:
    t = p.trend
    code = escape(p.key.patient)
    sections = []
    for vt in t.visits:
        v = vt.visit
        when = v.visit_date.isoformat() if v.visit_date else "undated"
        label = "" if v.label == when else f" {escape(v.label)}"
        sections.append(f"<h3>Visit {vt.number}{label} ({escape(when)})</h3>"
                        f'<div class="thumbs">{"".join(figures.get(v.visit_id, []))}</div>')
    responder = {True: "yes", False: "no", None: "–"}[t.responder]
    reviewed = (" Reviewed images count as their rater's class instead of the model's."
                if t.n_reviewed else "")
    return _page(f"Patient {p.key.patient}", f"""
<p><a href="../index.html">&larr; cohort</a></p>
<h1>Patient {code} <small>({escape(p.key.study)})</small></h1>
{_tiny_banner(report)}
<p>Status <b id="status" class="{t.status}">{t.status}</b>; responder <b>{responder}</b>;
change from baseline <b>{_num(t.change_from_baseline, 2, True)}</b>; slope per 30 days
{_slope_text(p)}; <b id="pending">{t.n_flagged}</b> image(s) waiting for review,
{t.n_reviewed} reviewed.{reviewed}</p>
<img src="p{p.key.patient_id}.png" alt="severity over time for {code}" width="640">
{_table(["visit", "date", "days", "images", "flagged", "reviewed", "class", "score", "change",
         "since previous", "worst image"], _visit_rows(report, t.visits))}
<h2>Images</h2>
<p class="note">Red: the lesion mask the severity was measured on. Orange frame: waiting for
review; green frame: reviewed.</p>
{"".join(sections)}
""")


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
    threads: int = 4,
    include_identifying_pixels: bool = False,
) -> HtmlReport:
    """Write the cohort page, a page per patient, the plots and the thumbnails under `out_dir`.

    Thumbnails are made in `threads` threads: each decodes a full photo and its full-size mask
    (about 0.1 s for 12 MP), and Pillow, zlib and numpy release the GIL while they work.
    """
    with OutputFolder(out_dir) as folder, folder.folder("patients") as pages, \
            folder.folder("thumbs") as thumbs:
        return _write_report(session, report, folder, pages, thumbs, max_pixels=max_pixels,
                             image_root=image_root, thumb_side=thumb_side, threads=threads,
                             include_identifying_pixels=include_identifying_pixels)


def _write_report(session: Session, report: CohortReport, folder: OutputFolder,
                  pages: OutputFolder, thumbs: OutputFolder, *, max_pixels: int,
                  image_root: str | None, thumb_side: int, threads: int,
                  include_identifying_pixels: bool) -> HtmlReport:
    out_dir = folder.path
    generated = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    result = HtmlReport(index=out_dir / "index.html")
    records = iter_image_records(session, head=report.head, study=report.study,
                                 patient=report.patient)
    # The image stream is read to the end first: the per-patient look-ups below use the session.
    pairs = list(_by_patient(records, report.patients))

    def make_thumb(record: ImageRecord, source: CataloguedFile, mask_png: bytes | None,
                   tag: str | None) -> tuple[str, bool] | None:
        """(why it cannot be made, whether it was held back), or None once it is written."""
        if tag is not None and not include_identifying_pixels:
            return identifying_pixels_reason(tag), True
        try:
            jpeg = thumbnail(source, mask_png, max_side=thumb_side, max_pixels=max_pixels,
                             identifying=include_identifying_pixels)
        except IdentifyingPixelsError as exc:
            return str(exc), True
        except RejectedFileError as exc:
            return str(exc), False
        thumbs.write_bytes(f"{record.image_id}.jpg", jpeg)
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for p, mine in pairs:
            files = image_files(session, [r.image_id for r in mine], image_root=image_root)
            masks = mask_pngs(session, [r.mask_id for r in mine if r.mask_id is not None])
            flagged = identifying_images(session, [r.image_id for r in mine])
            outcomes = pool.map(make_thumb, mine, [files[r.image_id] for r in mine],
                                [masks.get(r.mask_id or -1) for r in mine],
                                [flagged.get(r.image_id) for r in mine])
            figures: dict[int, list[str]] = {}
            for record, outcome in zip(mine, outcomes, strict=True):
                name: str | None = f"{record.image_id}.jpg"
                problem = None
                if outcome is None:
                    result.thumbnails += 1
                else:
                    name = None
                    problem, held_back = outcome
                    (result.withheld if held_back else result.unreadable)[record.image_id] = (
                        problem)
                figures.setdefault(record.visit_id, []).append(
                    _figure(report, record, name, problem))
            title = f"{p.key.patient}: {p.trend.status}"
            pages.write_bytes(f"p{p.key.patient_id}.png",
                              severity_plot(p.trend, report.classes, title=title))
            pages.write_text(f"p{p.key.patient_id}.html", _patient_page(report, p, figures))
            result.patient_pages += 1
    folder.write_bytes("cohort.png", cohort_plot(report.summary.per_visit))
    folder.write_text("index.html", _index(report, generated))
    return result
