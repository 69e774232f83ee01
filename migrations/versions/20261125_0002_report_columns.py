"""report columns: masks.prompt_similarity; predictions.probabilities as JSONB on PostgreSQL

Reports aggregate every prediction of a cohort in one query. Averaging each mask's JSON list of
prompt similarities there, and re-parsing each prediction's plain-JSON probabilities once per
class, was about 0.5 s of a 1.7 s cohort query at 300,000 images (bench/report.py, PostgreSQL).
The mean is now stored beside the list (backfilled here from it); on PostgreSQL the probabilities
become JSONB, which the server keeps parsed. Values are unchanged, so the downgrade loses nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('masks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prompt_similarity', sa.Float(), nullable=True))
    _backfill_prompt_similarity()
    if op.get_context().dialect.name == 'postgresql':
        op.alter_column('predictions', 'probabilities', type_=postgresql.JSONB(),
                        existing_type=sa.JSON(), existing_nullable=False,
                        postgresql_using='probabilities::jsonb')


def downgrade() -> None:
    if op.get_context().dialect.name == 'postgresql':
        op.alter_column('predictions', 'probabilities', type_=sa.JSON(),
                        existing_type=postgresql.JSONB(), existing_nullable=False,
                        postgresql_using='probabilities::json')
    with op.batch_alter_table('masks', schema=None) as batch_op:
        batch_op.drop_column('prompt_similarity')


def _backfill_prompt_similarity() -> None:
    # The writers' mean (eczema_batch.catalogue.models.mean_prompt_similarity), in SQL so that
    # `alembic upgrade --sql` can print it too; only masks with prompts (SegGPT's) get one.
    if op.get_context().dialect.name == 'postgresql':
        mean = ('(SELECT avg(value::float) '
                'FROM json_array_elements_text(prompt_similarities::json) AS value)')
    else:
        mean = '(SELECT avg(value) FROM json_each(prompt_similarities))'
    op.execute(f'UPDATE masks SET prompt_similarity = {mean}')
