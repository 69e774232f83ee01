"""Model identities (name + weights digest + precision) as catalogue rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Model


def model_row_id(
    session: Session, *, kind: str, name: str, digest: str, precision: str,
    config: dict[str, Any],
) -> int:
    """The id of the model row for this identity, created on first sight."""
    stmt = select(Model.id).where(Model.name == name, Model.digest == digest,
                                  Model.precision == precision)
    found = session.scalar(stmt)
    if found is not None:
        return found
    try:
        with session.begin_nested():
            row = Model(kind=kind, name=name, digest=digest, precision=precision,
                        config=config)
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError:  # another process registered it first
        found = session.scalar(stmt)
        assert found is not None
        return found


def same_weights(model_id: int | None) -> Any:
    """The ids of every model row of the same weights (name and digest) as `model_id`, at any
    precision: a head trained on fp32 features also takes the bf16 ones."""
    same = Model.__table__.alias("same")
    return (
        select(same.c.id)
        .join(Model, (Model.name == same.c.name) & (Model.digest == same.c.digest))
        .where(Model.id == model_id)
    )
