"""After ingest: `run` and `report --html` read a catalogued image only while it is still the file
ingest catalogued, under ingest's rules (README, "Safety").

A file replaced since ingest — by a link to an outside picture, a FIFO, a hard link to an outside
file, other content of the same size, a bigger file, or a folder on its path swapped for a link —
fails alone with its reason: the rest of the work completes, no job is left running, nothing
outside the study is measured or shown. Hangs are guarded by running the real CLI in a
subprocess with a timeout.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from html import unescape
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.models import Embedding, Image, Job, Mask
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.synth import write_synthetic_study
from tests._model_fixtures import tiny_model_dir  # noqa: F401
from tests.factories import write_jpeg
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)

HANG = 300
REPO = Path(__file__).resolve().parent.parent
CHANGED = ("the file's content changed since it was catalogued (its SHA-256 is not the "
           "catalogue's): restore the original file; a new picture needs a new name and an "
           "ingest")
LINK = ("the file is now a symbolic link: links are never followed (nothing outside the study "
        "folder is read)")
FOLDER = ("a folder on its path is now a symbolic link or not a folder: links are never "
          "followed (nothing outside the study folder is read)")
FIFO = "a named pipe (FIFO), not a regular file: only image files are read"


def cli(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "eczema_batch", *args], capture_output=True,
                            text=True, timeout=HANG, cwd=REPO, env=os.environ.copy())
    return result.returncode, result.stdout, result.stderr


def replace_with_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def replace_with_fifo(path: Path, _: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def replace_with_hard_link(path: Path, target: Path) -> None:
    path.unlink()
    os.link(target, path)


def rewrite_same_size(path: Path, _: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_with_bigger(path: Path, target: Path) -> None:
    shutil.copyfile(target, path)
    with path.open("ab") as file:
        file.write(b"\0" * 4096)


REPLACEMENTS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "link": (replace_with_link, LINK),
    "fifo": (replace_with_fifo, FIFO),
    "hard link": (replace_with_hard_link, "the file changed since it was catalogued (it is"),
    "same size": (rewrite_same_size, CHANGED),
    "bigger": (replace_with_bigger, "the file changed since it was catalogued (it is"),
}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    write_jpeg(folder / "v" / "secret.jpg", (64, 48), seed=99)
    return folder


@pytest.mark.one_database  # file checks and the models: no database behaviour
def test_run_fails_a_replaced_image_alone_and_reads_nothing_outside(
    tmp_path: Path, factory: sessionmaker[Session], outside: Path,
    tiny_model_dir: Path,  # noqa: F811
) -> None:
    root = tmp_path / "study"
    write_synthetic_study(root, patients=5, visits=2, seed=3, size=(64, 48),
                          reference_fraction=0.4)
    assert ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).exit_code == 0
    with factory() as session:
        references = set(session.scalars(select(Mask.image_id).where(Mask.kind == "manual")))
        paths = dict(session.execute(select(Image.id, Image.path).order_by(Image.id)).all())
    queries = [iid for iid in paths if iid not in references]
    secret = outside / "v" / "secret.jpg"
    expected: dict[int, str] = {}
    for iid, (replace, reason) in zip(queries, REPLACEMENTS.values(), strict=False):
        replace(root / paths[iid], secret)
        expected[iid] = reason
    # A visit folder of other images swapped for a link to an outside folder of the same names.
    swapped = next(iid for iid in queries if iid not in expected)
    visit = (root / paths[swapped]).parent
    shutil.copytree(visit, outside / "copy")
    for name in os.listdir(outside / "copy"):
        shutil.copyfile(secret, outside / "copy" / name)
    shutil.rmtree(visit)
    visit.symlink_to(outside / "copy")
    for iid, path in paths.items():
        if (root / path).parent == visit:
            expected[iid] = FOLDER

    code, out, err = cli("run", "--model-dir", str(tiny_model_dir), "--segmenter-model",
                         "tiny-seggpt", "--embedder-model", "tiny-dino", "--device", "cpu",
                         "--json")
    payload = json.loads(out)
    failed = {int(k): v for k, v in payload["failed_images"].items()}
    assert set(failed) == set(expected), err
    for iid, reason in expected.items():
        assert failed[iid].startswith(reason), (iid, failed[iid])
    with factory() as session:
        assert session.scalars(select(Job.state).where(Job.state == "running")).all() == []
        measured = set(session.scalars(select(Embedding.image_id).where(
            Embedding.region == "crop")))
        assert measured == set(paths) - set(expected)
        assert not set(session.scalars(select(Mask.image_id).where(
            Mask.kind == "predicted"))) & set(expected)
        status = dict(session.execute(select(Image.id, Image.decode_status)).all())
    assert all(status[iid] != "ok" for iid in expected)
    assert code == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_html_report_shows_no_replaced_image(
    tmp_path: Path, factory: sessionmaker[Session], outside: Path
) -> None:
    root = tmp_path / "study"
    secret = outside / "v" / "secret.jpg"
    with factory() as s, s.begin():
        study = make_study(s, root=str(root))
        head = make_head(s)
        patient = make_patient(s, study, "P1")
        visit = make_visit(s, patient, dt.date(2024, 1, 1))
        ids: dict[str, int] = {}
        for n, name in enumerate(["intact", *REPLACEMENTS]):
            rel = f"P1/v1/{n}.jpg"
            write_jpeg(root / rel, (96, 72), seed=n)
            image = make_image(s, visit, path=rel, size=(96, 72), file=root / rel)
            make_prediction(s, image, head, [0.1, 0.2, 0.3, 0.4])
            ids[name] = image.id
    for n, (replace, _) in enumerate(REPLACEMENTS.values(), start=1):
        replace(root / f"P1/v1/{n}.jpg", secret)

    out = tmp_path / "html"
    code, _, err = cli("report", "--html", str(out))
    assert code == 0, err
    assert sorted(os.listdir(out / "thumbs")) == [f"{ids['intact']}.jpg"]
    assert sorted(os.listdir(out / "images")) == sorted([f"{ids['intact']}.jpg",
                                                         f"{ids['intact']}-outline.jpg"])
    page = (out / "patients" / "P1.html").read_text(encoding="utf-8")
    for name, (_, reason) in REPLACEMENTS.items():
        assert f"no thumbnail for image {ids[name]}: {reason}" in " ".join(err.split())
        assert reason.split(":")[0] in unescape(page)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() != digest
               for p in [*(out / "thumbs").iterdir(), *(out / "images").iterdir()])
