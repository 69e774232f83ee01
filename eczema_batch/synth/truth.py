"""The known truth of a synthetic study, written outside the study folder.

A real study holds labels and manual masks on a share of its images only; to score what the tool
infers for the rest, a benchmark needs what was painted. The truth folder holds:

    truth/truth.csv                           path,patient,visit_date,body_site,severity,trend,tone
    truth/S001/2024-01-15/left-arm.mask.png   the painted lesion of every image (0/255)

`path` is the image's path in the study (as in its manifest.csv), `severity` the painted class
0..3, `trend` the patient's course and `tone` the Fitzpatrick type (I..VI) of the painted skin.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from eczema_batch.errors import UsageError
from eczema_batch.synth.plan import ImageSpec

#: truth.csv header, in order
TRUTH_FIELDS = ("path", "patient", "visit_date", "body_site", "severity", "trend", "tone")


def truth_mask_path(spec: ImageSpec) -> str:
    """The true mask's path relative to the truth folder: the image's path, `.mask.png` for its
    extension (the same name a manual mask has in the study)."""
    return f"{spec.path.rsplit('.', 1)[0]}.mask.png"


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV document with `header` (POSIX paths, "\\n" line ends: the same bytes everywhere)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def truth_text(specs: Iterable[ImageSpec]) -> str:
    """truth.csv for `specs`."""
    return csv_text(TRUTH_FIELDS, (
        (spec.path, spec.patient.code, spec.visit_date.isoformat(), spec.body_site,
         spec.severity, spec.patient.trend.value, spec.patient.fitzpatrick)
        for spec in specs))


def check_truth_folder(truth: Path, root: Path) -> None:
    """Raise UsageError unless `truth` is a new or empty folder apart from the study `root`."""
    truth_abs, root_abs = truth.resolve(), root.resolve()
    if truth_abs == root_abs or root_abs in truth_abs.parents:
        raise UsageError(
            f"--truth must be outside the study folder ({truth} is inside {root}): a real study "
            f"holds no truth; choose a folder beside it, e.g. {root}-truth"
        )
    if truth_abs in root_abs.parents:
        raise UsageError(
            f"the study folder must not be inside --truth ({root} is inside {truth}): "
            "choose two separate folders"
        )
    if truth.exists() and not truth.is_dir():
        raise UsageError(f"--truth {truth} is not a folder")
    if truth.is_dir() and any(truth.iterdir()):
        raise UsageError(f"--truth {truth} is not empty: choose a new folder")


def write_truth_mask(truth: Path, spec: ImageSpec, mask: NDArray[np.bool_]) -> None:
    """Write the painted lesion `mask` of `spec` under `truth` as a 0/255 8-bit PNG."""
    target = truth / truth_mask_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    pixels = mask.astype(np.uint8)
    pixels *= 255
    Image.fromarray(pixels, mode="L").save(target, "PNG")


def write_truth_table(truth: Path, specs: Iterable[ImageSpec]) -> None:
    """Write truth.csv under `truth`."""
    truth.mkdir(parents=True, exist_ok=True)
    (truth / "truth.csv").write_text(truth_text(specs), encoding="utf-8", newline="")
