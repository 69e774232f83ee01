"""The trained heads in the catalogue: list them, and choose the one `eczema-batch run` uses.

At most one head is active per feature kind, the key `measuring.runtime.resolve_targets` looks
heads up by: the embedder identity and how crops are made (seggpt | none | manual).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from eczema_batch.catalogue.identities import same_weights
from eczema_batch.catalogue.models import Event, Head, Model
from eczema_batch.errors import NoHeadError


def activate_head(session: Session, head: Head) -> list[int]:
    """Make `head` the active one for its features; returns the ids it replaced."""
    replaced = list(session.scalars(select(Head.id).where(
        Head.active.is_(True),
        Head.id != head.id,
        # the same weights at another precision are the same features (model identities)
        Head.embedder_model_id.in_(same_weights(head.embedder_model_id)),
        Head.segmenter_mode == head.segmenter_mode,
        Head.segmenter_model_id.is_(None) if head.segmenter_model_id is None
        else Head.segmenter_model_id.in_(same_weights(head.segmenter_model_id)),
    )))
    if replaced:
        session.execute(update(Head).where(Head.id.in_(replaced)).values(active=False))
    head.active = True
    session.add(Event(kind="head.activated", subject_type="head", subject_id=head.id,
                      detail={"replaced": replaced}))
    session.flush()
    return replaced


@dataclass(frozen=True)
class HeadSummary:
    """A head as `heads list` shows it."""

    id: int
    name: str
    active: bool
    segmenter_mode: str
    #: "name@digest" of the embedder (and segmenter) whose features it eats
    embedder: str | None
    segmenter: str | None
    classes: list[str]
    images: int
    in_sample_weighted_f1: float | None
    digest: str
    created_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ActivatedHead:
    """`heads use`: the head, and the heads it replaced as the active one."""

    head: HeadSummary
    replaced: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {**self.head.as_dict(), "replaced": self.replaced}


def use_head(session: Session, head_id: int) -> ActivatedHead:
    head = session.get(Head, head_id)
    if head is None:
        raise NoHeadError(f"no head {head_id} in the catalogue: `eczema-batch heads list`")
    replaced = activate_head(session, head)
    return ActivatedHead(describe_head(session, head), replaced)


def describe_head(session: Session, head: Head) -> HeadSummary:
    names = {mid: f"{name}@{digest[:12]}" for mid, name, digest in session.execute(
        select(Model.id, Model.name, Model.digest).where(
            Model.id.in_([head.embedder_model_id, head.segmenter_model_id or -1])))}
    in_sample = (head.metrics or {}).get("in_sample", {})
    return HeadSummary(
        id=head.id,
        name=head.name,
        active=head.active,
        segmenter_mode=head.segmenter_mode,
        embedder=names.get(head.embedder_model_id),
        segmenter=names.get(head.segmenter_model_id) if head.segmenter_model_id else None,
        classes=list(head.classes),
        images=len(head.training_image_ids or []),
        in_sample_weighted_f1=in_sample.get("weighted_f1"),
        digest=head.digest,
        created_at=head.created_at.isoformat() if head.created_at else None,
    )


def list_heads(session: Session) -> list[HeadSummary]:
    return [describe_head(session, h) for h in session.scalars(select(Head).order_by(Head.id))]
