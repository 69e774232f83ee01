"""Who may change a catalogue's schema.

The embedded SQLite catalogue keeps itself current. A PostgreSQL catalogue is shared by workers that
may run different versions: only `eczema-batch db upgrade` changes its schema; every other command
refuses an empty or out-of-date one and says what to run. A schema newer than the code is refused
everywhere, with its revision named, and left as it was. A role that can only read can still
report, export and ask for the status.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from eczema_batch.catalogue.db import (
    current_revision,
    dispose_engines,
    get_engine,
    head_revision,
    open_catalogue,
    upgrade,
)
from eczema_batch.config import get_settings
from tests.conftest import POSTGRES_URL, service_missing
from tests.factories import write_jpeg
from tests.report_factories import (
    make_head,
    make_image,
    make_patient,
    make_prediction,
    make_study,
    make_visit,
)
from tests.test_cli import invoke

UNKNOWN = "ffffffff9999"
#: Commands that open the catalogue, none of which may change a server's schema.
COMMANDS = [("status",), ("report",), ("export",), ("heads", "list"), ("review", "list")]


def _use(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    monkeypatch.setenv("ECZEMA_BATCH_DATABASE_URL", url)
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(home))
    get_settings.cache_clear()


@pytest.fixture
def server_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL schema of its own, empty: no catalogue in it yet."""
    if not POSTGRES_URL:
        service_missing("PostgreSQL not configured: set ECZEMA_BATCH_TEST_POSTGRES_URL")
    assert POSTGRES_URL is not None
    schema = f"eb_rules_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # noqa: BLE001 (the reason is what the skip reports)
        service_missing(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    _use(monkeypatch, url, tmp_path / "home")
    yield url
    dispose_engines()
    get_settings.cache_clear()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names())


def _set_revision(url: str, revision: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def test_server_schema_is_created_only_by_db_upgrade(server_url: str, tmp_path: Path) -> None:
    write_jpeg(tmp_path / "study" / "P001" / "2024-01-15" / "a.jpg")
    for args in [*COMMANDS, ("ingest", str(tmp_path / "study")), ("run",)]:
        code, out, err = invoke(*args)
        assert code == 1, (args, err)
        assert "holds no eczema-batch catalogue" in err and "eczema-batch db upgrade" in err
        assert out == ""
    assert _tables(server_url) == set(), "a command other than db upgrade created tables"

    code, _, err = invoke("db", "upgrade")
    assert code == 0, err
    assert f"schema from empty to revision {head_revision(get_engine(server_url))}" in err
    code, out, _ = invoke("ingest", str(tmp_path / "study"), "--json")
    assert code == 0


def test_server_schema_behind_is_refused_until_db_upgrade(server_url: str) -> None:
    engine = get_engine(server_url)
    upgrade(engine, "0001")
    for args in COMMANDS:
        code, _, err = invoke(*args)
        assert code == 1, (args, err)
        assert "has schema revision 0001" in err
        assert "run `eczema-batch db upgrade`" in err
    assert current_revision(engine) == "0001"
    code, out, _ = invoke("db", "current", "--json")
    assert code == 0 and '"state": "behind"' in out

    code, _, err = invoke("db", "upgrade")
    assert code == 0, err
    assert current_revision(engine) == head_revision(engine)
    code, _, err = invoke("status")
    assert code == 0, err


def test_workers_and_library_callers_never_migrate_a_server(server_url: str) -> None:
    from eczema_batch.errors import CatalogueError

    with pytest.raises(CatalogueError, match="holds no eczema-batch catalogue"):
        open_catalogue(server_url)
    assert _tables(server_url) == set()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_newer_schema_is_refused_and_left_alone(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if backend == "postgresql":
        url = request.getfixturevalue("server_url")
    else:
        url = f"sqlite:///{tmp_path / 'catalogue.sqlite3'}"
        _use(monkeypatch, url, tmp_path / "home")
    upgrade(get_engine(url))
    _set_revision(url, UNKNOWN)
    for args in [*COMMANDS, ("db", "upgrade")]:
        code, _, err = invoke(*args)
        assert code == 1, (args, err)
        assert f"has schema revision {UNKNOWN}" in err
        assert "a newer version of eczema-batch made it" in err
    code, out, _ = invoke("db", "current")
    assert code == 0 and "made by a newer eczema-batch" in out
    assert current_revision(get_engine(url)) == UNKNOWN
    dispose_engines()


def test_the_embedded_catalogue_creates_and_migrates_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.delenv("ECZEMA_BATCH_DATABASE_URL", raising=False)
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(home))
    get_settings.cache_clear()
    path = (home / "catalogue.sqlite3").resolve()
    code, _, err = invoke("status")
    assert code == 0, err
    assert f"created a new catalogue: {path}" in err.splitlines()[0]
    code, _, err = invoke("status")
    assert code == 0 and "created a new catalogue" not in err

    # One revision behind, as an older version of eczema-batch left it.
    engine = get_engine(f"sqlite:///{path}")
    from alembic import command

    from eczema_batch.catalogue.db import alembic_config, migration_connection

    cfg = alembic_config(f"sqlite:///{path}")
    with migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0001")
    assert current_revision(engine) == "0001"
    code, _, err = invoke("status")
    assert code == 0, err
    assert current_revision(engine) == head_revision(engine)
    dispose_engines()


@pytest.fixture
def reader_url(server_url: str) -> Iterator[str]:
    """The same catalogue, seen by a PostgreSQL role that may only read (SELECT)."""
    upgrade(get_engine(server_url))
    schema = server_url.rsplit("%3D", 1)[1]
    role = f"eb_reader_{uuid.uuid4().hex[:8]}"
    with get_engine(server_url).begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
        conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"))
    assert POSTGRES_URL is not None
    scheme, rest = POSTGRES_URL.split("://", 1)
    host = rest.rsplit("@", 1)[-1]
    sep = "&" if "?" in host else "?"
    yield f"{scheme}://{role}@{host}{sep}options=-csearch_path%3D{schema}"
    dispose_engines()
    with get_engine(server_url).begin() as conn:
        conn.execute(text(f"DROP OWNED BY {role}"))
        conn.execute(text(f"DROP ROLE {role}"))


def test_a_read_only_role_can_report_export_and_ask_the_status(
    server_url: str, reader_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    day = dt.date(2024, 1, 15)
    with open_catalogue(server_url)() as s, s.begin():
        study = make_study(s)
        head = make_head(s)
        patient = make_patient(s, study, "P1")
        for days, probabilities in ((0, [0.0, 0.2, 0.6, 0.2]), (30, [0.1, 0.6, 0.2, 0.1])):
            visit = make_visit(s, patient, day + dt.timedelta(days))
            make_prediction(s, make_image(s, visit), head, probabilities)
    _use(monkeypatch, reader_url, tmp_path / "home")
    with get_engine(reader_url).connect() as conn:  # the role really cannot write
        with pytest.raises(Exception, match="permission denied"):
            conn.execute(text("DELETE FROM studies"))

    code, out, err = invoke("status", "--json")
    assert code == 0, err
    assert '"images": 2' in out
    code, out, err = invoke("report", "--json")
    assert code == 0, err
    code, out, err = invoke("report", "--patient", "P1")
    assert code == 0, err
    code, out, err = invoke("export", "--level", "visit")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["visit_number"] for r in rows] == ["1", "2"]
    code, out, err = invoke("export", "--level", "patient", "--format", "json")
    assert code == 0, err


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_refuses_a_newer_schema_and_names_it(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a worker logs for each message: the newer revision, not advice to upgrade the schema
    (an older worker's `db upgrade` cannot help)."""
    from eczema_batch_workers import tasks

    from eczema_batch.errors import CatalogueError

    if backend == "postgresql":
        url = request.getfixturevalue("server_url")
    else:
        url = f"sqlite:///{tmp_path / 'catalogue.sqlite3'}"
    upgrade(get_engine(url))
    _set_revision(url, UNKNOWN)
    tasks._catalogue.cache_clear()
    with pytest.raises(CatalogueError) as refused:
        tasks._catalogue(url)
    message = str(refused.value)
    assert f"has schema revision {UNKNOWN}" in message
    assert "a newer version of eczema-batch made it" in message
    assert "db upgrade" not in message
    assert current_revision(get_engine(url)) == UNKNOWN
    tasks._catalogue.cache_clear()
    dispose_engines()
