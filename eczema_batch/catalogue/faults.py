"""What a database error means for the user: a full disk, a damaged catalogue, or neither.

SQLite and PostgreSQL report these by code (SQLite's result codes, PostgreSQL's SQLSTATE): a code
says it, where the message text differs by version and language.
"""

from __future__ import annotations

import errno

from sqlalchemy.exc import DBAPIError

from eczema_batch.errors import CatalogueError, DiskFullError, EczemaBatchError

#: SQLite result codes (sqlite3.h): the file is damaged, the disk is full, the file cannot be
#: opened, it is not a database.
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 11, 13, 14, 26
#: PostgreSQL SQLSTATE class 53: disk_full
PG_DISK_FULL = "53100"


def _sqlite_code(exc: DBAPIError) -> int | None:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF  # extended codes keep the primary low


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, DBAPIError):
        return (_sqlite_code(exc) == SQLITE_FULL
                or getattr(exc.orig, "sqlstate", None) == PG_DISK_FULL)
    return False


def explain_database_error(
    exc: BaseException, where: str, *, done: str = ""
) -> EczemaBatchError | None:
    """The error to show for `exc` met on the catalogue at `where`; None when it is none of ours.

    `done` says what the command had finished (and kept) before it, for a partial stop.
    """
    if isinstance(exc, DBAPIError) and is_disk_full(exc):
        kept = f"{done}; that is kept. " if done else "what was written before is kept. "
        return DiskFullError(
            f"the disk holding the catalogue ({where}) is full: {kept}Free some space, then run "
            "the same command again: it carries on where this one stopped",
            exit_code=3 if done else 1,
        )
    if not isinstance(exc, DBAPIError):
        return None
    code = _sqlite_code(exc)
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else ""
    if code == SQLITE_CANTOPEN:  # a file: nothing to wait for, unlike a server
        return CatalogueError(
            f"cannot open the catalogue {where} (SQLite: {detail}): check that the file and its "
            "folder can be read and written by this user"
        )
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return CatalogueError(
            f"the catalogue at {where} is damaged or is not an eczema-batch catalogue (SQLite: "
            f"{detail}); eczema-batch changed nothing in it. Restore it from a backup, or move it "
            "aside and start a new one (ECZEMA_BATCH_HOME or ECZEMA_BATCH_DATABASE_URL choose "
            "where)"
        )
    return None
