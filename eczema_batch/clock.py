"""Time as the catalogue keeps it: aware datetimes in UTC."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """`value`, aware: SQLite hands datetimes back naive (they are stored in UTC)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value
