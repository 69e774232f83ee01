"""Training checkpoints that survive a kill: written whole or not at all, refused if foreign.

`models adapt-embedder` and `models tune-segmenter` save their state after every epoch to
`<model_dir>/.NAME.checkpoint/checkpoint.pt`. A rerun of the same command resumes from it; a run
with other settings, weights or images finds a fingerprint that does not match and stops rather
than silently mixing two trainings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from eczema_batch.errors import UsageError

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write `state` beside the old checkpoint and swap it in: a kill leaves one whole file."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{CHECKPOINT_FILE}.partial"
    with partial.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path | None, fingerprint: object, *, foreign: str
                    ) -> dict[str, Any] | None:
    """The checkpoint in `folder` if its state's "fingerprint" is `fingerprint`; None without
    one; UsageError(`foreign`) for a checkpoint of another run. The file is this tool's own
    (written by `save_checkpoint` in the user's model folder), hence `weights_only=False`."""
    if folder is None or not (folder / CHECKPOINT_FILE).is_file():
        return None
    state: dict[str, Any] = torch.load(folder / CHECKPOINT_FILE, map_location="cpu",
                                       weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise UsageError(f"{folder} {foreign}")
    return state
