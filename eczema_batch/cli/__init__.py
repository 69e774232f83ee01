"""The `eczema-batch` command: the only package that prints or exits.

Progress and tables go to stderr; `--json` puts one machine-readable object on stdout. Exit status:
0 the command did what it says, 3 it did part of it (some files rejected), 2 the input was wrong,
1 nothing could be done.

One module per command group, all registered on `common.app`; importing them here registers their
commands, in this order, which is the order `eczema-batch --help` lists them in.
"""

# isort: off
from eczema_batch.cli.common import app, main
from eczema_batch.cli import catalogue, measure, training, reports, review, agreement, demo  # noqa: F401
from eczema_batch.cli import tuning  # noqa: F401
from eczema_batch.cli import adapting  # noqa: F401
from eczema_batch.cli import skintone  # noqa: F401
# isort: on

__all__ = ["app", "main"]
