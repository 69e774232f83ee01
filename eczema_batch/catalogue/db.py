"""Engine, sessions and schema migration.

The caller owns the transaction: helpers flush, use cases commit. `open_catalogue()` migrates the
embedded SQLite catalogue automatically; a PostgreSQL catalogue is migrated the same way (Alembic
takes a transaction-scoped lock there, so two processes starting at once do not race).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.errors import CatalogueError, TransientError

log = logging.getLogger(__name__)

#: Where Alembic's scripts are: inside the installed package (a wheel ships the repository's
#: top-level `migrations/` as `eczema_batch/migrations`), else the source tree's own folder
#: (an editable install, or a checkout on PYTHONPATH).
_MIGRATIONS_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "migrations",
    Path(__file__).resolve().parents[2] / "migrations",
)
#: Advisory-lock key for migrations on PostgreSQL ("eczema" in ASCII, any constant would do).
_PG_MIGRATION_LOCK = 0x65637A656D61


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, reports) run while a writer ingests; SQLite leaves foreign keys
    # off unless asked.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrations_dir() -> Path:
    """The folder holding Alembic's env.py and the catalogue's revisions."""
    for folder in _MIGRATIONS_CANDIDATES:
        if (folder / "env.py").is_file():
            return folder
    raise CatalogueError(
        "the catalogue's migrations are missing (looked in "
        f"{', '.join(str(c) for c in _MIGRATIONS_CANDIDATES)}): this installation of "
        "eczema-batch is incomplete; reinstall it (`pip install --force-reinstall eczema-batch`)"
    )


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction for Alembic, safe for SQLite's batch mode.

    Batch mode rebuilds a table (CREATE new, copy, DROP old). With foreign keys on, that DROP
    deletes the old rows first, which fires ON DELETE SET NULL / CASCADE in the tables that point
    at it: a migration would silently unlink or delete results. So on SQLite foreign keys are off
    while migrating (the pragma only takes effect outside a transaction, hence before begin), and
    the result is checked before commit. On PostgreSQL: a transaction-scoped lock, so two
    processes starting at once do not race.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # SQLAlchemy's autobegun transaction; SQLite has none open
        try:
            with connection.begin():
                if not sqlite:
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                       {"k": _PG_MIGRATION_LOCK})
                yield connection
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise CatalogueError(
                            f"the migration left {len(broken)} rows pointing at missing rows "
                            f"(first: {tuple(broken[0])}); nothing was changed. Report this "
                            "with `eczema-batch db current`'s output"
                        )
        finally:
            if sqlite:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    return ScriptDirectory.from_config(cfg).get_current_head()


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Bring the schema to head, or say how when auto-migration is off."""
    try:
        current = current_revision(engine)
        head = head_revision(engine)
    except OperationalError as exc:
        raise TransientError(
            f"cannot reach the catalogue database ({engine.url.render_as_string()}): "
            f"{str(exc.orig).strip().splitlines()[0]}"
        ) from exc
    if current == head:
        return
    if not auto_migrate:
        raise CatalogueError(
            f"the catalogue schema is at {current or 'nothing'}, this version needs {head}: "
            "run `eczema-batch db upgrade`"
        )
    log.info("migrating catalogue from %s to %s", current, head)
    upgrade(engine)


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (and connection pool) per URL per process."""
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = make_engine(url)
    return engine


def open_catalogue(url: str, *, auto_migrate: bool = True) -> sessionmaker[Session]:
    """A session factory for the catalogue at `url`, its schema brought to the newest revision."""
    engine = get_engine(url)
    ensure_schema(engine, auto_migrate=auto_migrate)
    return sessionmaker(engine, expire_on_commit=False)


def dispose_engines() -> None:
    """Forget pooled connections: after a fork (connections must not cross processes), in tests."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session
