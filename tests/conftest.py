"""Shared fixtures: a real catalogue on SQLite and on PostgreSQL, the same tests on both.

PostgreSQL comes from ECZEMA_BATCH_TEST_POSTGRES_URL (scripts/test sets it to the local server),
Redis from ECZEMA_BATCH_TEST_REDIS_URL. Without them the tests that need them skip with the reason;
with ECZEMA_BATCH_REQUIRE_SERVICES=1 (CI) a missing service fails instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.db import dispose_engines, get_engine, open_catalogue, upgrade
from eczema_batch.catalogue.models import Base
from eczema_batch.config import get_settings

POSTGRES_URL = os.environ.get("ECZEMA_BATCH_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("ECZEMA_BATCH_TEST_REDIS_URL")
REQUIRE_SERVICES = os.environ.get("ECZEMA_BATCH_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> None:
    """Skip on a laptop; fail where the services are promised (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (ECZEMA_BATCH_REQUIRE_SERVICES=1: CI must run this test)")
    pytest.skip(reason)


def _postgres_reachable(url: str) -> str | None:
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return str(exc).splitlines()[0]
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `one_database` runs on SQLite only: its result comes from the models, and
    what the database does with it is tested on both databases elsewhere."""
    dropped = [
        item for item in items
        if item.get_closest_marker("one_database") is not None
        and getattr(getattr(item, "callspec", None), "params", {}).get("db_url") == "postgresql"
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "catalogue.sqlite3"
    engine = get_engine(f"sqlite:///{path}")
    upgrade(engine)
    dispose_engines()
    return path


@pytest.fixture(scope="session")
def _postgres_schema() -> Iterator[str]:
    """A private schema for this test session, migrated once; tests truncate it."""
    if not POSTGRES_URL:
        service_missing("PostgreSQL not configured: set ECZEMA_BATCH_TEST_POSTGRES_URL")
    assert POSTGRES_URL is not None
    if problem := _postgres_reachable(POSTGRES_URL):
        service_missing(f"PostgreSQL at {POSTGRES_URL} is unreachable: {problem}")
    schema = f"eb_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    upgrade(get_engine(url))
    yield url
    dispose_engines()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _truncate_postgres(url: str) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """A migrated, empty catalogue; also made the process's configured catalogue."""
    if request.param == "sqlite":
        template = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "catalogue.sqlite3"
        shutil.copyfile(template, path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("_postgres_schema")
        _truncate_postgres(url)
    monkeypatch.setenv("ECZEMA_BATCH_DATABASE_URL", url)
    monkeypatch.setenv("ECZEMA_BATCH_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    if request.param == "sqlite":
        dispose_engines()


@pytest.fixture
def factory(db_url: str) -> sessionmaker[Session]:
    return open_catalogue(db_url)


def require_redis() -> str:
    """The test Redis URL once it answers; otherwise skip (or fail in CI) with the reason."""
    if not REDIS_URL:
        service_missing("Redis not configured: set ECZEMA_BATCH_TEST_REDIS_URL")
    assert REDIS_URL is not None
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        service_missing(f"Redis at {REDIS_URL} is unreachable: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_url() -> str:
    return require_redis()
