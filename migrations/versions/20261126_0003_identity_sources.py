"""identity: images.identifying_pixels; studies.pseudonym_key_check

`identifying_pixels` names the DICOM tag that says an image's pixels identify the patient
(BurnedInAnnotation or RecognizableVisualFeatures = YES): such images are flagged and kept out of
shared outputs. Images catalogued before this revision are NULL (not flagged); the HTML report
still reads the header of each DICOM file it makes a thumbnail of.

`pseudonym_key_check` is set on a study that keys on DICOM PatientID: an HMAC of a fixed text with
the pseudonym key, so that a later ingest with another key (which would give every patient a new
code) is refused. It reveals no pseudonym and no PatientID.

Both columns are new and nullable: the downgrade drops them and loses only those flags.

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
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('identifying_pixels', sa.String(length=32), nullable=True))
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pseudonym_key_check', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('pseudonym_key_check')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_column('identifying_pixels')
