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
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from eczema_batch.cli import app
from tests.conftest import service_missing
from tests.factories import write_jpeg
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
