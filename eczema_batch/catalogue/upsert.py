"""INSERT ... ON CONFLICT DO UPDATE on SQLite and PostgreSQL alike.

Results are keyed on (image, model identity, ...): writing the same result twice, as a redelivered
task does, changes nothing but the row's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Base


def upsert(
    session: Session,
    model: type[Base],
    rows: Sequence[dict[str, Any]],
    *,
    keys: Sequence[str],
) -> None:
    """Insert `rows`, replacing the non-key columns of rows whose `keys` already exist."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(model)
    columns = [c for c in rows[0] if c not in keys]
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: stmt.excluded[c] for c in columns}
    )
    session.execute(stmt, list(rows))


def insert_ignoring_conflicts(session: Session, model: type[Base], keys: Sequence[str]) -> Any:
    """INSERT that does nothing where a row with the same `keys` exists (or is being written by
    another transaction: the insert waits for it, then does nothing)."""
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert_fn(model).on_conflict_do_nothing(index_elements=list(keys))
