"""What ingest did not catalogue, as stored in the catalogue's `rejections` table.

A rejection's `kind` says what was refused:

- `rejected`: the whole file (it cannot be decoded, its manifest row gives a wrong date...).
- `duplicate`: a second copy of a catalogued picture.
- `label`: the manifest's severity for a photograph that is catalogued all the same; filed under
  the photograph's path.
- `mask`: a manual mask whose photograph is catalogued without it; filed under the mask's path.
- `fitzpatrick`: the manifest's Fitzpatrick skin type, refused while the photograph is
  catalogued; filed under the photograph's path (with a refused label, one row says both).

A label or a mask is one part of a photograph's record: losing the photograph for it would lose the
study a visit, so only that part is refused. Parts are filed under paths of their own so that one
photograph can have both and the table's (study, path) key still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

FILE = "rejected"
DUPLICATE = "duplicate"
LABEL = "label"
MASK = "mask"
FITZPATRICK = "fitzpatrick"


def rejection(path: str, reason: str, kind: str = FILE) -> dict[str, str]:
    """One entry of `IngestReport.rejected` (and of `ingest --json`)."""
    return {"path": path, "kind": kind, "reason": reason}


@dataclass(frozen=True)
class PartProblem:
    """What is wrong with a photograph's label or mask; rejected once the photograph is in."""

    kind: str
    #: where the rejection is filed: the photograph for a label, the mask file for a mask
    path: str
    problem: str

    def rejection(self, image: str) -> dict[str, str]:
        if self.kind == LABEL:  # filed under the photograph: no need to name it again
            outcome = "the photograph is catalogued without a severity label: correct the row"
        elif self.kind == FITZPATRICK:
            outcome = "the photograph is catalogued without a Fitzpatrick type: correct the row"
        else:
            outcome = f"{image} is catalogued without this mask: correct it"
        return rejection(self.path, f"{self.problem}; {outcome} and ingest again to add it",
                         self.kind)
