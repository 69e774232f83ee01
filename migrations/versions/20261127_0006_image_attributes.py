"""what the subgroup report and the image-quality gate read per image

- `device`: the camera, "Make Model" from EXIF or DICOM Manufacturer/ManufacturerModelName.
- `fitzpatrick`: the skin type (1-6) the manifest gives for the image, if any.
- `skin_ita`, `skin_ita_mask`: the Individual Typology Angle of the skin outside the lesion mask,
  estimated from the pixels, and the mask (kind:variant) it was measured outside.
- `quality`: blur, exposure and colour-cast measures of the decoded image; `quality_flag`: why it
  is out of range (None when in range or not measured).

Rows ingested before this revision have none of them: ingest measures them again when it sees
the file, and the skin tone is estimated when a report needs it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 02:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("device", sa.String(128), nullable=True))
        batch.add_column(sa.Column("fitzpatrick", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("skin_ita", sa.Float(), nullable=True))
        batch.add_column(sa.Column("skin_ita_mask", sa.String(216), nullable=True))
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("quality_flag", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        for column in ("quality_flag", "quality", "skin_ita_mask", "skin_ita", "fitzpatrick",
                       "device"):
            batch.drop_column(column)
