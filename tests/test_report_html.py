"""`eczema-batch report`: the terminal summary, and the HTML report as a real browser shows it.

The HTML pages are loaded in headless Chromium (Debian's `chromium`); the page marks on <body>
how many of its images loaded, so the DOM Chromium dumps says whether the plots and thumbnails
really display. Without Chromium the browser test skips (and fails when
ECZEMA_BATCH_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.catalogue.models import Image
from eczema_batch.cli import app
from eczema_batch.ingest.service import ingest_study
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
        make_review(s, s.get_one(type(image), ids["visit1"]), 1, rater="rater-07")
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


def _dom(browser: str, page: Path) -> str:
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_html_report_in_a_browser(study: dict[str, int], tmp_path: Path) -> None:
    browser = _chromium()
    out = tmp_path / "html"
    code, _, err = _invoke("report", "--html", str(out))
    assert code == 0, err
    assert "HTML report: file://" in err and f"no thumbnail for image {study['flagged']}" in err
    page = out / "patients" / f"p{study['patient']}.html"
    dom = _dom(browser, page)
    text = _text(dom)
    # plot + 3 thumbnails load; the missing file is said, not shown broken
    assert 'data-images-loaded="4"' in dom and 'data-images-broken="0"' in dom
    assert "Patient P1" in text and "Status improving" in text
    assert "reviewed by rater-07: mild" in text
    assert "mask: SegGPT found no lesion" in text
    assert "no thumbnail: the file is gone from the study folder" in text
    assert len(re.findall(r'<figure class="thumb', dom)) == 4
    assert 'class="thumb flagged"' in dom and 'class="thumb reviewed"' in dom
    index = _dom(browser, out / "index.html")
    assert 'data-images-loaded="1"' in index and 'data-images-broken="0"' in index
    assert f'href="patients/p{study["patient"]}.html"' in index
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
