"""Faults: a process killed mid-write, two processes at once, a broken or foreign catalogue, a full
disk, an output path that cannot be written. Each leaves the catalogue usable and says what happened
in a message, never a traceback.

The kills are real SIGKILLs of real processes, sent at a chosen moment: a small wrapper (like the
workers' in test_workers.py) watches the SQL the process sends and kills itself, or flags a file,
when a given statement goes out.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from eczema_batch.catalogue.db import (
    current_revision,
    dispose_engines,
    get_engine,
    head_revision,
    open_catalogue,
)
from eczema_batch.catalogue.models import Image, Study
from eczema_batch.config import get_settings
from eczema_batch.synth import write_synthetic_study
from tests.conftest import service_missing
from tests.factories import write_jpeg
from tests.test_cli import invoke

REPO = Path(__file__).resolve().parents[1]

#: `python -m eczema_batch ...`, which SIGKILLs itself just after its Nth SQL statement matching
#: EB_TEST_KILL_AT (a prefix, case-insensitive), or touches EB_TEST_FLAG before each statement
#: that matches EB_TEST_FLAG_AT.
BOOT = """
import os, signal, sys
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine import Engine
kill_at, flag_at = os.environ.get("EB_TEST_KILL_AT"), os.environ.get("EB_TEST_FLAG_AT")
countdown = [int(os.environ.get("EB_TEST_KILL_AFTER", "1"))]
@event.listens_for(Engine, "before_cursor_execute")
def before(conn, cursor, statement, *args):
    if flag_at and statement.lstrip().upper().startswith(flag_at.upper()):
        Path(os.environ["EB_TEST_FLAG"]).touch()
@event.listens_for(Engine, "after_cursor_execute")
def after(conn, cursor, statement, *args):
    if kill_at and statement.lstrip().upper().startswith(kill_at.upper()):
        countdown[0] -= 1
        if countdown[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
sys.argv[0] = "eczema-batch"
from eczema_batch.cli import main
main()
"""


def cli_process(*args: str, env: dict[str, str | None]) -> subprocess.Popen[bytes]:
    """The CLI in a process of its own; `env` adds to this one's environment (None: removes)."""
    merged = {**os.environ, **env}
    return subprocess.Popen([sys.executable, "-c", BOOT, *args], cwd=REPO,
                            env={k: v for k, v in merged.items() if v is not None},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cli(*args: str, env: dict[str, str | None], timeout: float = 120) -> tuple[int, str]:
    proc = cli_process(*args, env=env)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


# -- the first schema creation -----------------------------------------------------------------


@pytest.mark.parametrize(("statement", "nth"), [
    ("CREATE TABLE", 1),     # the first table, as the audit's `table events already exists`
    ("CREATE TABLE", 7),     # half the tables
    ("CREATE INDEX", 12),    # tables all made, indexes half
    ("INSERT INTO alembic_version", 1),   # versioned, not yet committed
    ("UPDATE alembic_version", 1),        # 0002 applied, not yet committed
])
def test_a_kill_during_the_first_schema_creation_leaves_no_half_catalogue(
    tmp_path: Path, statement: str, nth: int
) -> None:
    home = tmp_path / "home"
    env: dict[str, str | None] = {"ECZEMA_BATCH_HOME": str(home), "ECZEMA_BATCH_DATABASE_URL": None,
           "EB_TEST_KILL_AT": statement, "EB_TEST_KILL_AFTER": str(nth)}
    code, err = cli("status", env=env)
    assert code == -9, f"the process was to be killed at {statement} #{nth}: {err}"
    path = home / "catalogue.sqlite3"
    url = f"sqlite:///{path}"
    # Nothing or everything: a killed creation left no table behind.
    assert set(inspect(get_engine(url)).get_table_names()) == set()
    dispose_engines()
    code, err = cli("status", env={**env, "EB_TEST_KILL_AT": None})
    assert code == 0, err
    assert current_revision(get_engine(url)) == head_revision(get_engine(url))
    dispose_engines()


def test_three_first_commands_at_once_make_one_catalogue(tmp_path: Path) -> None:
    """All three find no schema and go to create it; the test holds the file's write lock until
    all three wait for it. The first creates the schema, the others then find it made."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "catalogue.sqlite3"
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("PRAGMA journal_mode=WAL")
    lock.execute("BEGIN IMMEDIATE")
    flags = [tmp_path / f"flag{i}" for i in range(3)]
    try:
        procs = [cli_process("status", env={"ECZEMA_BATCH_HOME": str(home),
                                            "ECZEMA_BATCH_DATABASE_URL": None,
                                            "EB_TEST_FLAG_AT": "BEGIN IMMEDIATE",
                                            "EB_TEST_FLAG": str(flag)})
                 for flag in flags]
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in flags):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the commands never got to the migration"
            time.sleep(0.05)
    finally:
        lock.execute("COMMIT")
        lock.close()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    url = f"sqlite:///{path}"
    assert current_revision(get_engine(url)) == head_revision(get_engine(url))
    dispose_engines()


# -- two ingests of one new study at once --------------------------------------------------------


def test_two_ingests_of_a_new_study_at_once_share_its_row(
    db_url: str, tmp_path: Path
) -> None:
    """Both ingests find no study row and go to insert it; the test holds the table's write lock
    until both are there, so the race happens every time."""
    root = tmp_path / "trial"
    for patient in ("P001", "P002"):
        for seed in range(3):
            write_jpeg(root / patient / "2024-01-15" / f"{seed}.jpg",
                       seed=seed + (10 if patient == "P002" else 0))
    flags = [tmp_path / "flag0", tmp_path / "flag1"]
    engine = get_engine(db_url)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        lock = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
    else:
        conn = engine.connect()
        conn.execute(text("LOCK TABLE studies IN SHARE MODE"))  # reads go on, inserts wait
    try:
        procs = [cli_process("ingest", str(root), "--json",
                             env={"ECZEMA_BATCH_DATABASE_URL": db_url,
                                  "EB_TEST_FLAG_AT": "INSERT INTO studies",
                                  "EB_TEST_FLAG": str(flag)})
                 for flag in flags]
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in flags):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the ingests never got to the study row"
            time.sleep(0.05)
    finally:
        if sqlite:
            lock.execute("COMMIT")
            lock.close()
        else:
            conn.commit()
            conn.close()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    with open_catalogue(db_url)() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.scalar(select(func.count()).select_from(Image)) == 6
    get_settings.cache_clear()


# -- a disk that is full or read-only (a real tmpfs mount, made full or read-only) --------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 320 KiB tmpfs mounted for the test (root may mount; without the right, skip)."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        service_missing(f"cannot mount a tmpfs to fill up: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fill(where: Path) -> None:
    """Leave no free byte on the disk at `where`."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_stops_ingest_with_a_message_and_keeps_whole_batches(
    small_disk: Path, tmp_path: Path
) -> None:
    """SQLite only: the catalogue's file is on the full disk (a PostgreSQL server's disk is not
    ours to fill; its `disk_full` SQLSTATE gets the same message)."""
    root = tmp_path / "trial"
    write_synthetic_study(root, patients=20, visits=4, seed=2, size=(32, 24))
    env: dict[str, str | None] = {"ECZEMA_BATCH_HOME": str(small_disk / "home"),
                                  "ECZEMA_BATCH_DATABASE_URL": None,
                                  "ECZEMA_BATCH_INGEST_BATCH_FILES": "20"}
    code, err = cli("ingest", str(root), env=env)
    assert code == 3, err
    assert "Traceback" not in err
    assert f"the disk holding the catalogue ({small_disk / 'home' / 'catalogue.sqlite3'}) is " \
        "full: " in err
    kept = int(err.split(" is full: ")[1].split(" of ")[0])
    assert kept > 0 and kept % 20 == 0
    url = f"sqlite:///{small_disk / 'home' / 'catalogue.sqlite3'}"
    with open_catalogue(url)() as session:  # the batches written before are whole
        assert session.scalar(select(func.count()).select_from(Image)) == kept
    dispose_engines()
    remount(small_disk, "size=4m")  # space freed: the same command carries on
    code, err = cli("ingest", str(root), "--json", env=env)
    assert code == 0, err
    with open_catalogue(url)() as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 160
    dispose_engines()


def test_an_export_onto_a_full_disk_says_so(
    db_url: str, small_disk: Path
) -> None:
    fill(small_disk)
    out = small_disk / "visits.csv"
    code, _, err = invoke("export", "--level", "image", "-o", str(out))
    assert code == 1, err
    assert "the disk is full" in err and str(out) in err
    assert not out.exists() and not (small_disk / "visits.csv.partial").exists()


@pytest.mark.parametrize("case", ["missing folder", "a folder", "read-only disk",
                                  "seg onto a file"])
def test_an_export_path_that_cannot_be_written_is_refused_before_any_work(
    db_url: str, tmp_path: Path, case: str, request: pytest.FixtureRequest
) -> None:
    args = ["export", "--level", "visit"]
    if case == "missing folder":
        out, expected = tmp_path / "nowhere" / "visits.csv", "does not exist"
    elif case == "a folder":
        out, expected = tmp_path, "is a folder"
    elif case == "read-only disk":
        disk = request.getfixturevalue("small_disk")
        remount(disk, "ro")  # read-only for root too
        out, expected = disk / "visits.csv", "cannot write in"
    else:
        (tmp_path / "file").write_text("x")
        out, expected = tmp_path / "file", "is a file"
        args += ["--format", "dicom-seg"]
    code, stdout, err = invoke(*args, "-o", str(out))
    assert code == 2, err
    assert expected in err and str(out) in err and stdout == ""
    assert not (tmp_path / "nowhere").exists()


# -- a damaged catalogue, a foreign one --------------------------------------------------------


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "text file"])
def test_a_damaged_catalogue_is_named_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str, _sqlite_template: Path
) -> None:
    path = tmp_path / "catalogue.sqlite3"
    template = _sqlite_template.read_bytes()
    path.write_bytes({"random bytes": os.urandom(len(template)),
                      "truncated": template[: len(template) // 3],
                      "text file": b"patient,visit\nP001,2024-01-15\n"}[damage])
    before = path.read_bytes()
    monkeypatch.setenv("ECZEMA_BATCH_DATABASE_URL", f"sqlite:///{path}")
    get_settings.cache_clear()
    write_jpeg(tmp_path / "study" / "P001" / "2024-01-15" / "a.jpg")
    for args in [("status",), ("export",), ("report",), ("ingest", str(tmp_path / "study")),
                 ("db", "current"), ("db", "upgrade"), ("run",)]:
        code, stdout, err = invoke(*args)
        assert code == 1, (args, err)
        assert f"the catalogue at {path} is damaged or is not an eczema-batch catalogue" in err
        assert stdout == ""
    assert path.read_bytes() == before
    dispose_engines()
    get_settings.cache_clear()


# -- folders: only the workspace is created ------------------------------------------------------


def test_a_sqlite_url_whose_folder_is_missing_is_refused_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'typo' / 'deeper' / 'catalogue.sqlite3'}"
    monkeypatch.setenv("ECZEMA_BATCH_DATABASE_URL", url)
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    for args in [("status",), ("db", "upgrade"), ("db", "current")]:
        code, _, err = invoke(*args)
        assert code == 2, (args, err)
        assert f"is to be in {tmp_path / 'typo' / 'deeper'}, which is not a folder that " \
            "exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    get_settings.cache_clear()


def test_only_the_workspace_folder_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ECZEMA_BATCH_DATABASE_URL", raising=False)
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(tmp_path / "missing" / "home"))
    get_settings.cache_clear()
    code, _, err = invoke("status")
    assert code == 2, err
    assert f"the folder {tmp_path / 'missing'} does not exist" in err
    assert not (tmp_path / "missing").exists()

    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    code, _, err = invoke("status")
    assert code == 0, err
    assert (tmp_path / "home" / "catalogue.sqlite3").is_file()
    dispose_engines()
    get_settings.cache_clear()
