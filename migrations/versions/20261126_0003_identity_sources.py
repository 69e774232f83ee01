"""identity: studies.pseudonym_key_check

`pseudonym_key_check` is set on a study that keys on DICOM PatientID: an HMAC of a fixed text with
the pseudonym key, so that a later ingest with another key (which would give every patient a new
code) is refused. It reveals no pseudonym and no PatientID.

The column is new and nullable: the downgrade drops it (a later ingest with another key is then
no longer refused).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pseudonym_key_check', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('pseudonym_key_check')
