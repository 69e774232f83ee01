"""masks and crop embeddings of `run` keyed by their prompt set, as `evaluate`'s already were

Before this revision `run` stored its SegGPT masks (and the crop embeddings cut with them) under
"seggpt:<segmenter id>:k<K>" and `evaluate` under "seggpt:<segmenter id>:p<digest of the prompt
ids>", so the same mask could be computed twice and `run` never noticed that an image's nearest
references had changed. One key now serves both: the segmenter and the exact prompt set. Each
"k" row is renamed to its prompt set's key (read from the mask's prompt_ids); where `evaluate` had
already stored that very key, the two are the same result and the older "k" row goes, with the
crop embeddings and predictions that pointed at it moved to the one that stays. A crop whose mask
is gone is dropped (its prediction keeps its values; the next run computes the crop again).

The downgrade changes nothing: the older code reads prompt-set keys as evaluation results and
segments its run masks again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 21:00:00
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


#: run's old keys, "seggpt:<segmenter id>:k<K>" (a bound pattern: ":k" in SQL text is a parameter)
OLD = "seggpt:%:k%"


def _key(segmenter: str, prompt_ids: list[Any]) -> str:
    # Frozen copy of pipeline.records.MaskKey.variant as of this revision.
    if not prompt_ids:
        return f"seggpt:{segmenter}:pnone"
    joined = ",".join(str(i) for i in sorted(int(p) for p in prompt_ids))
    return f"seggpt:{segmenter}:p{hashlib.sha1(joined.encode()).hexdigest()[:12]}"


def _ids(value: Any) -> list[Any]:
    return list(json.loads(value) if isinstance(value, str) else (value or []))


def upgrade() -> None:
    bind = op.get_bind()
    run = bind.execute
    masks = run(sa.text(
        "SELECT id, image_id, variant, prompt_ids FROM masks "
        "WHERE kind = 'predicted' AND variant LIKE :old"), {"old": OLD}).all()
    #: old mask id -> (image id, new variant)
    renamed = {mid: (iid, _key(variant.split(":")[1], _ids(prompts)))
               for mid, iid, variant, prompts in masks}
    crops = run(sa.text(
        "SELECT id, image_id, model_id, mask_id FROM embeddings "
        "WHERE region = 'crop' AND variant LIKE :old"), {"old": OLD}).all()
    for eid, iid, model_id, mask_id in crops:
        if mask_id not in renamed:
            run(sa.text("UPDATE predictions SET embedding_id = NULL WHERE embedding_id = :e"),
                {"e": eid})
            run(sa.text("DELETE FROM embeddings WHERE id = :e"), {"e": eid})
            continue
        variant = renamed[mask_id][1]
        kept = run(sa.text(
            "SELECT id FROM embeddings WHERE image_id = :i AND model_id = :m "
            "AND region = 'crop' AND variant = :v"),
            {"i": iid, "m": model_id, "v": variant}).scalar()
        if kept is None:
            run(sa.text("UPDATE embeddings SET variant = :v WHERE id = :e"),
                {"v": variant, "e": eid})
        else:
            run(sa.text("UPDATE predictions SET embedding_id = :k WHERE embedding_id = :e"),
                {"k": kept, "e": eid})
            run(sa.text("DELETE FROM embeddings WHERE id = :e"), {"e": eid})
    for mid, (iid, variant) in renamed.items():
        kept = run(sa.text(
            "SELECT id FROM masks WHERE image_id = :i AND kind = 'predicted' AND variant = :v"),
            {"i": iid, "v": variant}).scalar()
        if kept is None:
            run(sa.text("UPDATE masks SET variant = :v WHERE id = :m"), {"v": variant, "m": mid})
        else:
            run(sa.text("UPDATE embeddings SET mask_id = :k WHERE mask_id = :m"),
                {"k": kept, "m": mid})
            run(sa.text("DELETE FROM masks WHERE id = :m"), {"m": mid})


def downgrade() -> None:
    pass
