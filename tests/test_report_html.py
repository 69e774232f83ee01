"""`eczema-batch report`: the terminal summary, and the HTML report as a real browser shows it.

The HTML pages are loaded in headless Chromium (Debian's `chromium`); the page marks on <body>
how many of its images loaded, so the DOM Chromium dumps (after the page's script ran) says
whether the plots and pictures really display, and whether anything from the data became an
element. Without Chromium the browser tests skip, and fail when ECZEMA_BATCH_REQUIRE_SERVICES=1
(CI's `.ci/run` installs Chromium and sets it).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image
from eczema_batch.cli import app
from eczema_batch.ingest.service import ingest_study
from eczema_batch.report.cohort import PatientReport, ReportTable, build_report
from eczema_batch.report.html import page_names, write_html_report
from eczema_batch.report.plots import VisitNumberScore, cohort_figure, severity_figure
from eczema_batch.report.queries import PatientKey, ReviewThresholds
from eczema_batch.report.trends import (
    TrendRules,
    VisitNumberSummary,
    VisitScore,
    patient_trend,
)
from eczema_batch.severity import DEFAULT_CLASSES
from tests.conftest import service_missing
from tests.factories import write_dicom, write_jpeg
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_review,
    make_study,
    make_visit,
)

D0 = dt.date(2024, 1, 1)


@pytest.fixture
def study(factory: sessionmaker[Session], tmp_path: Path) -> dict[str, int]:
    """P1 improves over three visits (one image reviewed, one flagged, one file missing)."""
    root = tmp_path / "study"
    with factory() as s, s.begin():
        study = make_study(s, root=str(root))
        head = make_head(s)
        p = make_patient(s, study, "P1")
        ids: dict[str, int] = {"patient": p.id}
        for n, probs in enumerate(([0.0, 0.1, 0.3, 0.6], [0.1, 0.3, 0.6, 0.0],
                                   [0.2, 0.7, 0.1, 0.0])):
            visit = make_visit(s, p, D0 + dt.timedelta(days=30 * n))
            path = f"P1/{visit.label}/arm.jpg"
            write_jpeg(root / path, (96, 72), seed=n)
            image = make_image(s, visit, path=path, size=(96, 72), file=root / path)
            make_prediction(s, image, head, probs)
            ids[f"visit{n}"] = image.id
        make_review(s, s.get_one(type(image), ids["visit1"]), 1, rater="rater-07",
                    note="crusted")
        flagged = make_image(s, visit, path="P1/missing.jpg", size=(96, 72), body_site="trunk")
        make_prediction(s, flagged, head, [0.1, 0.45, 0.4, 0.05],
                        mask_flag="SegGPT found no lesion")
        ids["flagged"] = flagged.id
        make_patient(s, study, "Q1")  # enrolled, no visits yet
        return ids


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_terminal_report(study: dict[str, int]) -> None:
    code, _, err = _invoke("report", "--patient", "P1")
    assert code == 0, err
    assert "improving" in err and "responders" in err
    assert "▇▃▄" in err  # expected scores 2.5, 1.0 (reviewed), (0.9 + 1.4) / 2 on 0-3
    assert "(R)" in err and "a rater's reviewed label replaces" in err
    code, stdout, err = _invoke("report", "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["summary"]["by_status"] == {"improving": 1, "unknown": 1}
    assert payload["summary"]["flagged_images"] == 1
    code, _, err = _invoke("report", "--patient", "NOPE")
    assert code == 2 and "no patient 'NOPE'" in err


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        service_missing("chromium is not installed (Debian: apt-get install chromium)")
    assert found is not None
    return found


def _browse(browser: str, url: str, *args: str, cwd: Path | None = None) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             *args, url],
            capture_output=True, text=True, timeout=120, check=True, cwd=cwd)
    return done.stdout


def _dom(browser: str, page: Path) -> str:
    return _browse(browser, page.resolve().as_uri(), "--dump-dom")


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_html_report_in_a_browser(study: dict[str, int], tmp_path: Path) -> None:
    browser = _chromium()
    out = tmp_path / "html"
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 0, err
    assert "HTML report: file://" in err and f"no thumbnail for image {study['flagged']}" in err
    page = out / "patients" / "P1.html"
    dom = _dom(browser, page)
    text = _text(dom)
    # plot + 3 thumbnails + 3 larger views with and without the outline load; the missing file
    # is said, not shown broken
    assert 'data-images-loaded="10"' in dom and 'data-images-broken="0"' in dom
    assert "Patient P1" in text and "Status improving" in text
    assert "reviewed by rater-07: mild" in text and "note: crusted" in text
    # The class is the likeliest one, the score is shown with its band, and they agree here.
    assert re.search(r"severe \(0\.60\) 2\.50 \(severe\)", text)
    assert re.search(r"mild \(0\.57\) 1\.15 \(mild\)", text)
    assert "class and score differ" not in text
    assert "eczema-batch review list --study trial --patient P1" in text
    assert "eczema-batch review set IMAGE --severity CLASS --by RATER" in text
    assert f"eczema-batch review set {study['flagged']} --severity CLASS" in text
    assert "mask: SegGPT found no lesion" in text
    assert "no thumbnail: the file is gone from the study folder" in text
    assert len(re.findall(r'<figure class="thumb', dom)) == 4
    assert 'class="thumb flagged"' in dom and 'class="thumb reviewed"' in dom
    index = _dom(browser, out / "index.html")
    assert 'data-images-loaded="1"' in index and 'data-images-broken="0"' in index
    assert 'href="patients/P1.html"' in index
    assert "1 of 1 evaluable patients (100%)" in _text(index)


def test_images_whose_pixels_identify_the_patient_get_no_thumbnail(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    root = tmp_path / "study"
    visit = root / "P1" / "2024-01-15"
    write_dicom(visit / "clean.dcm", seed=1, BurnedInAnnotation="NO")
    write_dicom(visit / "burned.dcm", seed=2, BurnedInAnnotation="YES")
    write_dicom(visit / "face.dcm", seed=3, RecognizableVisualFeatures="YES")
    write_dicom(visit / "older.dcm", seed=4, BurnedInAnnotation="yes")
    ingest_study(root, factory=factory, max_pixels=10**8, processes=1)
    with factory() as s, s.begin():
        head = make_head(s)
        images = {Path(i.path).stem: i for i in s.scalars(select(Image))}
        for image in images.values():
            make_prediction(s, image, head, [0.1, 0.6, 0.2, 0.1])
        assert {k: i.identifying_pixels for k, i in images.items()} == {
            "clean": None, "burned": "BurnedInAnnotation", "face": "RecognizableVisualFeatures",
            "older": "BurnedInAnnotation"}
        # As if catalogued before the catalogue kept the flag: the file's header still counts.
        images["older"].identifying_pixels = None
        ids = {k: i.id for k, i in images.items()}

    code, out, err = _invoke("status", "--json")
    assert code == 0 and json.loads(out)["studies"][0]["identifying_pixels"] == 2
    assert "2 image(s) whose DICOM header says the pixels identify the patient" in _invoke(
        "status")[2]

    out_dir = tmp_path / "report"
    code, _, err = _invoke("report", "--html", str(out_dir))
    assert code == 0, err
    assert sorted(p.name for p in (out_dir / "thumbs").iterdir()) == [f"{ids['clean']}.jpg"]
    assert "3 image(s) without a thumbnail" in err and "--include-identifying-pixels" in err
    page = (out_dir / "patients" / next(
        p.name for p in (out_dir / "patients").iterdir() if p.suffix == ".html")).read_text()
    for name, tag in (("burned", "BurnedInAnnotation"), ("face", "RecognizableVisualFeatures"),
                      ("older", "BurnedInAnnotation")):
        figure = page[page.index(f'data-image-id="{ids[name]}"'):]
        figure = figure[:figure.index("</figure>")]
        assert "<img" not in figure
        assert f"the pixels identify the patient ({tag} = YES)" in figure

    shared = tmp_path / "care-team"
    code, _, err = _invoke("report", "--html", str(shared), "--include-identifying-pixels")
    assert code == 0, err
    assert len(list((shared / "thumbs").iterdir())) == 4


HOSTILE_CODE = "<script>alert(1)</script>"
HOSTILE_NOTE = "<b>x</b><img src=x onerror=alert(2)>"


@pytest.fixture
def hostile(factory: sessionmaker[Session], tmp_path: Path) -> dict[str, int]:
    """Codes, labels, a rater and a note that are HTML, in one visit; the same code in another
    study, and two codes that differ only in case."""
    root = tmp_path / "study"
    with factory() as s, s.begin():
        study = make_study(s, name="<i>trial</i>", root=str(root))
        head = make_head(s)
        p = make_patient(s, study, HOSTILE_CODE)
        visit = make_visit(s, p, D0, label="<u>v1</u>")
        write_jpeg(root / "x/a.jpg", (96, 72), seed=1)
        image = make_image(s, visit, path="x/a.jpg", size=(96, 72), file=root / "x/a.jpg",
                           body_site="<svg onload=alert(3)>")
        make_prediction(s, image, head, [0.4, 0.1, 0.1, 0.4])
        make_review(s, image, 2, rater="<em>dr</em>", note=HOSTILE_NOTE)
        second = make_image(s, visit, path="x/b.jpg", size=(96, 72))
        make_prediction(s, second, head, [0.4, 0.1, 0.1, 0.4])
        # The same code in another study, and one that differs only in case: three pages.
        other = make_study(s, name="other", root=str(root))
        twins = [make_patient(s, other, HOSTILE_CODE).id, make_patient(s, other, "s1").id,
                 make_patient(s, study, "S1").id]
        return {"patient": p.id, "image": image.id, "twin": twins[0]}


def _elements(dom: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}\b[^>]*>", dom, flags=re.IGNORECASE)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_data_is_shown_as_text_never_as_markup(hostile: dict[str, int], tmp_path: Path) -> None:
    browser = _chromium()
    out = tmp_path / "html"
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 0, err
    pages = sorted(p.name for p in (out / "patients").glob("*.html"))
    assert len(pages) == 4 and all("<" not in n and "/" not in n for n in pages)
    assert {"S1.html", "s1.html"}.isdisjoint(pages)  # they would clash on macOS
    index = _dom(browser, out / "index.html")
    links = re.findall(r'href="(patients/[^"]+)"', index)
    assert sorted(links) == sorted(f"patients/{n}" for n in pages)
    assert len(_elements(index, "script")) == 1  # the page's own
    assert "<i>" not in index and "&lt;i&gt;trial&lt;/i&gt;" in index
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index

    (page,) = (out / "patients" / n for n in pages
               if (out / "patients" / n).read_text().count("&lt;i&gt;trial") and
               "&lt;u&gt;v1" in (out / "patients" / n).read_text())
    dom = _dom(browser, page)
    text = _text(dom)
    assert len(_elements(dom, "script")) == 1
    for markup in ("<b>x", "<u>v1", "<em>dr", "<i>trial", "<svg"):
        assert markup not in dom.lower(), markup
    assert all('src="x"' not in tag and "onerror" not in tag for tag in _elements(dom, "img"))
    assert "onload" not in "".join(_elements(dom, "svg"))
    assert 'data-images-broken="0"' in dom and 'data-images-loaded="4"' in dom
    # The visible text is the data, character for character.
    assert f"Patient {HOSTILE_CODE.replace('<', '&lt;').replace('>', '&gt;')}" in text
    assert f"note: {HOSTILE_NOTE.replace('<', '&lt;').replace('>', '&gt;')}" in text
    assert "reviewed by &lt;em&gt;dr&lt;/em&gt;: moderate" in text
    # one-hot moderate + (0.4, 0.1, 0.1, 0.4): mean (0.2, 0.05, 0.55, 0.2), score 1.75
    assert "moderate (0.55) 1.75 (moderate)" in text
    # The shell command quotes the code, so a rater can paste it.
    assert "--patient '&lt;script&gt;alert(1)&lt;/script&gt;'" in text

    # The larger view opens from the thumbnail's link: a dark overlay over the page, the picture
    # with the cyan outline; with the checkbox cleared (a copy of the page), without it.
    outlined = _view(browser, page, hostile["image"], tmp_path / "on.png")
    unticked = page.with_name("unticked.html")
    unticked.write_text(page.read_text().replace(
        f'id="outline-{hostile["image"]}" checked', f'id="outline-{hostile["image"]}"'))
    plain = _view(browser, unticked, hostile["image"], tmp_path / "off.png")
    # (the test picture is noise, so some of its own pixels are cyan-ish too)
    assert outlined > plain + 300, (outlined, plain)


def _view(browser: str, page: Path, image_id: int, shot: Path) -> int:
    """Open an image's larger view; the number of outline-cyan pixels on the screen."""
    _browse(browser, page.resolve().as_uri() + f"#view-{image_id}", f"--screenshot={shot}",
            "--window-size=1000,800", "--hide-scrollbars")
    with PILImage.open(shot) as picture:
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    assert rgb[:40, :40].max() < 60, "the larger view did not open (no dark overlay)"
    return int(((rgb[..., 0] < 100) & (rgb[..., 1] > 170) & (rgb[..., 2] > 170)).sum())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_visit_whose_class_is_not_its_score_band_says_why(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with factory() as s, s.begin():
        study = make_study(s)
        head = make_head(s)
        visit = make_visit(s, make_patient(s, study, "P1"), D0)
        make_prediction(s, make_image(s, visit), head, [0.4, 0.1, 0.1, 0.4], mask_flag="x")
    out = tmp_path / "html"
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 0, err
    text = _text((out / "patients" / "P1.html").read_text())
    assert "clear (0.40) 1.50 (moderate)" in text
    assert "class and score differ" in text and "clear is the likeliest one (p 0.40)" in text
    assert "the score lies in the moderate band" in text
    assert "provisional: every scored image is flagged" in text


def test_page_names_are_plain_distinct_and_stay_inside() -> None:
    codes = [("a", "S001"), ("b", "S001"), ("a", "s1"), ("a", "S1"), ("a", "../../etc"),
             ("a", "P 1"), ("a", "P/1"), ("a", "."), ("a", ""), ("a", "-rf"), ("a", "x" * 300),
             ("a", HOSTILE_CODE), ("a", "index")]
    patients = [PatientReport(PatientKey(study, code, n), patient_trend([], TrendRules()))
                for n, (study, code) in enumerate(codes)]
    names = page_names(patients)
    assert len({n.casefold() for n in names.values()}) == len(codes)
    for name in names.values():
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) and len(name) < 120, name
    assert names[4].startswith("etc-") and names[12] == "index"
    assert names[0].startswith("S001-") and names[1].startswith("S001-")


def test_plots_keep_the_severity_scale_and_a_span_of_days() -> None:
    rules = TrendRules()
    once = patient_trend([VisitScore(1, "v1", D0, 1, n_scored=1,
                                     probabilities=(0.1, 0.8, 0.1, 0.0))], rules)
    ax = severity_figure(once, DEFAULT_CLASSES, title="once").axes[0]
    assert ax.get_ylim() == (-0.5, 3.5)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "0 clear", "1 mild", "2 moderate", "3 severe"]
    low, high = ax.get_xlim()
    assert low < 0 < 28 <= high < 40
    flat = [VisitNumberSummary(1, 5, 0.0, 0.0, 0.0), VisitNumberSummary(2, 5, 30.0, 0.013, 0.01)]
    left, right = cohort_figure([VisitNumberScore(1, 5, 1.2, 0.1)], flat, DEFAULT_CLASSES,
                                stable_band=0.5).axes
    assert left.get_ylim() == (-0.5, 3.5) and right.get_ylim() == (-3.2, 3.2)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_extra_tables_render_when_the_report_carries_them(
    study: dict[str, int], factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with factory() as s:
        report = build_report(s, rules=TrendRules(), thresholds=ReviewThresholds())
        report.tables.append(ReportTable(
            "Rater agreement", ("raters", "kappa", "n"), (("<b>a</b> vs b", 0.61234, 12),
                                                          ("c vs d", None, 0)),
            note="Cohen's kappa <weighted>"))
        written = write_html_report(s, report, tmp_path / "html", max_pixels=10**8)
    index = written.index.read_text()
    assert '<h2>Rater agreement</h2>' in index and "Cohen&#39;s kappa &lt;weighted&gt;" in index
    assert "<td>&lt;b&gt;a&lt;/b&gt; vs b</td><td>0.61</td><td>12</td>" in index
    assert "<td>c vs d</td><td>–</td><td>0</td>" in index
    assert 'class="extra-table"' not in (tmp_path / "html" / "patients" / "P1.html").read_text()
