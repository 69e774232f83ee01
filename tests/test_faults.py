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
from tests.factories import write_jpeg

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
