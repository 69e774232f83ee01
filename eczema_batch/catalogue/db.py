"""Engine, sessions and schema migration.

The caller owns the transaction: helpers flush, use cases commit. `open_catalogue()` migrates the
embedded SQLite catalogue automatically; a server (PostgreSQL) catalogue is migrated only by
`eczema-batch db upgrade` (under a transaction-scoped lock, so two at once do not race): any other
command refuses an out-of-date schema and says so. A schema newer than the code is always refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.errors import CatalogueError, ConfigError, TransientError

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
    """An engine for `url`. A SQLite file's folder must exist: a URL is never a reason to create
    folders (a typo would scatter catalogues); the workspace folder is made by the CLI."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).resolve().parent
            if not folder.is_dir():
                raise ConfigError(
                    f"the catalogue {database} is to be in {folder}, which is not a folder that "
                    "exists: create it, or fix ECZEMA_BATCH_DATABASE_URL (eczema-batch creates "
                    "no folder for a URL)"
                )
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

    Python's sqlite3 opens a transaction only before INSERT, UPDATE or DELETE: left to it, each
    CREATE TABLE commits on its own, and a process killed while creating the schema leaves half
    of it, unversioned, that nothing can open again. So on SQLite the transaction is begun here,
    explicitly (IMMEDIATE: the write lock first, so two processes migrating at once queue on it
    instead of both reading the old version): the whole migration commits, or none of it.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # SQLAlchemy's autobegun transaction; SQLite has none open
        try:
            with connection.begin():
                if sqlite:
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                else:
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


def describe(engine: Engine) -> str:
    """The catalogue's URL for a message: a SQLite file's path, a server URL without password."""
    path = sqlite_path(engine.url.render_as_string(hide_password=False))
    return str(path) if path else engine.url.render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite catalogue (None for a server or an in-memory database)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def _scripts(engine: Engine) -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(
        alembic_config(engine.url.render_as_string(hide_password=False))
    )


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str
    #: "empty": no catalogue yet; "behind": an upgrade is due; "newer": a revision this version
    #: does not know (a newer eczema-batch wrote it)
    state: Literal["current", "empty", "behind", "newer"]


def schema_state(engine: Engine) -> SchemaState:
    from alembic.util import CommandError

    scripts = _scripts(engine)
    head = str(scripts.get_current_head())
    current = current_revision(engine)
    if current == head:
        return SchemaState(current, head, "current")
    if current is None:
        return SchemaState(current, head, "empty")
    try:
        scripts.get_revision(current)
    except CommandError:
        return SchemaState(current, head, "newer")
    return SchemaState(current, head, "behind")


def _refuse_newer(engine: Engine, schema: SchemaState) -> None:
    """A revision this version does not know was written by a newer one: never touch it."""
    if schema.state == "newer":
        from eczema_batch import __version__

        raise CatalogueError(
            f"the catalogue at {describe(engine)} has schema revision {schema.current}, which "
            f"eczema-batch {__version__} does not know (its newest is {schema.head}): a newer "
            "version of eczema-batch made it. Use that version (or upgrade this installation); "
            "nothing was changed"
        )


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    _refuse_newer(engine, schema_state(engine))
    with migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def head_revision(engine: Engine) -> str:
    return str(_scripts(engine).get_current_head())


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Bring the schema to head when `auto_migrate`, else refuse an out-of-date one and say how.

    A schema newer than this code is refused either way: its revision is named, nothing is
    changed.
    """
    try:
        schema = schema_state(engine)
    except DBAPIError as exc:
        from eczema_batch.catalogue.faults import explain_database_error

        problem = explain_database_error(exc, describe(engine))
        if problem is not None:
            raise problem from exc
        if not isinstance(exc, OperationalError):
            raise
        raise TransientError(
            f"cannot reach the catalogue database ({describe(engine)}): "
            f"{str(exc.orig).strip().splitlines()[0]}"
        ) from exc
    if schema.state == "current":
        return
    _refuse_newer(engine, schema)
    if not auto_migrate:
        if schema.state == "empty":
            raise CatalogueError(
                f"the database at {describe(engine)} holds no eczema-batch catalogue: create "
                "its schema with `eczema-batch db upgrade` (with docker compose, the `migrate` "
                "service does it)"
            )
        raise CatalogueError(
            f"the catalogue at {describe(engine)} has schema revision {schema.current}; this "
            f"version needs {schema.head}: run `eczema-batch db upgrade` once (stop the workers "
            "of the older version first)"
        )
    log.info("migrating catalogue from %s to %s", schema.current, schema.head)
    upgrade(engine)


def migrates_itself(url: str) -> bool:
    """The embedded SQLite catalogue keeps its schema current by itself.

    A server database is shared by workers that may run different versions: its schema changes
    only when someone asks (`eczema-batch db upgrade`, the compose `migrate` service).
    """
    return make_url(url).get_backend_name() == "sqlite"


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (and connection pool) per URL per process."""
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = make_engine(url)
    return engine


def open_catalogue(url: str, *, auto_migrate: bool | None = None) -> sessionmaker[Session]:
    """A session factory for the catalogue at `url`, whose schema must be at the newest revision.

    `auto_migrate` (default: `migrates_itself(url)`) brings an older schema up to date instead of
    refusing it.
    """
    engine = get_engine(url)
    ensure_schema(engine, auto_migrate=migrates_itself(url) if auto_migrate is None
                  else auto_migrate)
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
