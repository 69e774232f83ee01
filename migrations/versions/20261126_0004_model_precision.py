"""models.precision: a model identity records the precision it ran in

Results of a bf16 and an fp32 run of the same weights differ slightly, and before this revision
they shared one model row, so their masks and embeddings overwrote each other and nothing said
which was which. The identity is now (name, digest, precision). Rows made before are marked
"unrecorded": their precision is not known (fp32 on a CPU, bf16 by default on a GPU), so a run
after the upgrade computes its own results under a new identity and leaves the old ones as they
are; heads trained on them stay usable (a head is matched by name and digest).

The downgrade refuses while a name and digest have rows at several precisions (it would have to
merge or drop results); otherwise it drops the column.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('precision', sa.String(length=16),
                                      server_default='unrecorded', nullable=False))
        batch_op.drop_constraint('uq_models_name_digest', type_='unique')
        batch_op.create_unique_constraint(
            'uq_models_name_digest_precision', ['name', 'digest', 'precision'])


def downgrade() -> None:
    shared = op.get_bind().execute(sa.text(
        "SELECT name, digest FROM models GROUP BY name, digest HAVING count(*) > 1"
    )).first()
    if shared is not None:
        raise RuntimeError(
            f"cannot go below revision 0004: model {shared[0]} has results at several "
            "precisions, which the older schema cannot tell apart"
        )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_name_digest_precision', type_='unique')
        batch_op.create_unique_constraint('uq_models_name_digest', ['name', 'digest'])
        batch_op.drop_column('precision')
