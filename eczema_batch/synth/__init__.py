"""Synthetic eczema studies: a study folder to try the tool on, test it and benchmark it.

`write_synthetic_study` writes the layout `eczema-batch ingest` reads (DESIGN.md, "Study folder"):

    root/manifest.csv                         path,patient,visit_date,body_site,severity,mask
    root/S001/2024-01-15/left-arm.jpg         photograph (JPEG, PNG, or DICOM as img-<site>.dcm)
    root/S001/2024-01-15/left-arm.mask.png    manual lesion mask (0/255) on the reference images

With `truth`, the known truth (every image's painted lesion mask, its severity, the patient's
trend and Fitzpatrick skin type) goes to a separate folder (see `eczema_batch.synth.truth`); the
study folder stays what a real study is.

Patients (subject codes, never names) each improve, stay stable or worsen over their visits, so
trends show in reports. Pictures are skin of varied tones with a lesion whose extent, redness and
roughness grow with the severity class 0..3, so a model can learn severity from pixels; a manual
mask is exactly the painted lesion. Each visit's pictures are taken under their own light,
exposure, focus, noise, JPEG quality and framing (background at one edge in most visits;
`eczema_batch.synth.camera`). Everything is seeded: the same arguments give byte-identical files.
Nothing here is real patient data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from eczema_batch.errors import UsageError
from eczema_batch.synth.camera import Conditions, frame, photograph, visit_conditions
from eczema_batch.synth.dicom import write_dicom
from eczema_batch.synth.plan import BODY_SITES, Format, ImageSpec, Trend, plan_study
from eczema_batch.synth.render import Painter, paint
from eczema_batch.synth.truth import (
    TRUTH_FIELDS,
    check_truth_folder,
    csv_text,
    truth_text,
    write_truth_mask,
    write_truth_table,
)

__all__ = [
    "BODY_SITES",
    "MANIFEST_FIELDS",
    "TRUTH_FIELDS",
    "Conditions",
    "Format",
    "ImageSpec",
    "SynthSummary",
    "Trend",
    "camera_conditions",
    "manifest_text",
    "paint",
    "plan_study",
    "render_image",
    "truth_text",
    "write_synthetic_study",
]

#: manifest.csv header, in order
MANIFEST_FIELDS = ("path", "patient", "visit_date", "body_site", "severity", "mask")


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic_study` wrote."""

    root: Path
    patients: int
    visits: int
    images: int
    references: int  # images with a manual mask
    dicom: int
    labels: dict[int, int]  # severity class -> count (all four classes, zeros included)
    truth: Path | None = None  # the truth folder, when one was written


def render_image(
    spec: ImageSpec, *, seed: int, size: tuple[int, int]
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The pixels of one planned picture: RGB uint8 (H, W, 3) and its lesion mask, bool (H, W)."""
    painting = paint(
        np.random.default_rng(spec.seed(seed)),
        size=size,
        severity=spec.severity,
        tone=spec.patient.tone,
    )
    conditions = camera_conditions(spec, seed)
    rgb, mask = frame(painting.rgb, painting.mask, conditions)
    return _photograph(spec, seed, rgb, conditions), mask


def camera_conditions(spec: ImageSpec, seed: int) -> Conditions:
    """The camera conditions of `spec`'s visit (one random stream per visit, shared by its
    pictures)."""
    return visit_conditions(np.random.default_rng([seed, 3, spec.patient.index, spec.visit_index]))


def _photograph(
    spec: ImageSpec, seed: int, rgb: NDArray[np.uint8], conditions: Conditions
) -> NDArray[np.uint8]:
    """The painted `rgb` as the camera took it at `spec`'s visit (its own noise stream, so the
    painting's stream stays what it was)."""
    rng = np.random.default_rng([seed, 4, spec.patient.index, spec.visit_index, spec.site_index])
    return photograph(rgb, conditions, rng)


def _write_images(
    root: Path,
    specs: Sequence[ImageSpec],
    seed: int,
    size: tuple[int, int],
    truth: Path | None = None,
) -> int:
    """Paint and write `specs` under `root` (and their true masks under `truth`, if given);
    returns how many were written."""
    painter = Painter(size)
    folders: set[str] = set()
    for spec in specs:
        painting = painter.paint(
            np.random.default_rng(spec.seed(seed)), severity=spec.severity, tone=spec.patient.tone
        )
        conditions = camera_conditions(spec, seed)
        framed, mask = frame(painting.rgb, painting.mask, conditions)
        rgb = _photograph(spec, seed, framed, conditions)
        target = root / spec.path
        if spec.folder not in folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            folders.add(spec.folder)
        if spec.format.is_dicom:
            write_dicom(target, rgb, spec, seed, quality=conditions.jpeg_quality)
        else:
            image = Image.fromarray(rgb, mode="RGB")
            if spec.format is Format.PNG:
                image.save(target, "PNG", compress_level=1)
            else:
                exif = Image.Exif()
                exif[0x010F], exif[0x0110] = spec.patient.camera  # Make, Model
                image.save(target, "JPEG", quality=conditions.jpeg_quality, exif=exif)
        if spec.mask_path is not None:
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(
                root / spec.mask_path, "PNG"
            )
        if truth is not None:
            write_truth_mask(truth, spec, mask)
    return len(specs)


def _chunks(specs: Sequence[ImageSpec], parts: int) -> Iterable[Sequence[ImageSpec]]:
    step = max(1, -(-len(specs) // parts))
    for i in range(0, len(specs), step):
        yield specs[i : i + step]


def manifest_text(specs: Sequence[ImageSpec], *, fitzpatrick_share: float = 0.0) -> str:
    """manifest.csv for `specs` (paths relative to the study root). With `fitzpatrick_share`,
    a `fitzpatrick` column gives the painted skin type of that share of the patients (the first
    ones: tones are spread over patients at random), blank for the others, as when only some
    sites record it."""
    rows = [(spec.path, spec.patient.code, spec.visit_date.isoformat(), spec.body_site,
             spec.severity, spec.mask_path or "") for spec in specs]
    if fitzpatrick_share <= 0.0:
        return csv_text(MANIFEST_FIELDS, rows)
    patients = len({spec.patient.index for spec in specs})
    typed = round(fitzpatrick_share * patients)
    return csv_text((*MANIFEST_FIELDS, "fitzpatrick"), (
        (*row, spec.patient.fitzpatrick if spec.patient.index < typed else "")
        for row, spec in zip(rows, specs, strict=True)))


def _check(
    root: Path,
    *,
    patients: int,
    visits: int,
    seed: int,
    images_per_visit: int,
    fractions: dict[str, float],
    size: tuple[int, int],
    visit_interval_days: int,
    workers: int,
    truth: Path | None,
) -> None:
    for name, value in (
        ("patients", patients),
        ("visits", visits),
        ("images_per_visit", images_per_visit),
        ("visit_interval_days", visit_interval_days),
        ("workers", workers),
    ):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    if seed < 0:
        raise UsageError(f"seed must be 0 or more, not {seed}")
    for name, share in fractions.items():
        if not 0.0 <= share <= 1.0:
            raise UsageError(f"{name} must be between 0 and 1, not {share}")
    if len(size) != 2 or min(size) < 16:
        raise UsageError(f"size must be (width, height), at least 16x16 pixels, not {size}")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    if root.is_dir() and any(root.iterdir()):
        raise UsageError(f"{root} is not empty: choose a new folder")
    if truth is not None:
        check_truth_folder(truth, root)


def write_synthetic_study(
    root: Path,
    *,
    patients: int,
    visits: int,
    seed: int = 0,
    images_per_visit: int = 2,
    reference_fraction: float = 0.3,
    dicom_fraction: float = 0.15,
    png_fraction: float = 0.1,
    size: tuple[int, int] = (320, 240),
    start_date: date = date(2024, 1, 15),
    visit_interval_days: int = 28,
    manifest: bool = True,
    workers: int = 1,
    truth: Path | None = None,
    fitzpatrick_share: float = 0.0,
) -> SynthSummary:
    """Write a synthetic study of `patients` x `visits` x `images_per_visit` photographs.

    `size` is (width, height). A `reference_fraction` of the images get a manual mask (spread so
    that every severity class has some), `dicom_fraction` are DICOM (half uncompressed, half JPEG
    baseline), `png_fraction` PNG (at most what DICOM leaves), the rest JPEG.

    `truth`, a new or empty folder outside `root`, receives the known truth: truth.csv and the
    painted lesion mask of every image (`eczema_batch.synth.truth`). `fitzpatrick_share`: that
    share of the patients has its skin type in the manifest (`manifest_text`).

    `workers` > 1 paints in that many processes (spawned: a calling script needs the usual
    ``if __name__ == "__main__":`` guard) and writes the same files. Raises UsageError on bad
    arguments or when `root` or `truth` exists and is not empty; nothing is written then.
    """
    root = Path(root)
    truth = Path(truth) if truth is not None else None
    size = (int(size[0]), int(size[1]))
    _check(
        root,
        patients=patients,
        visits=visits,
        seed=seed,
        images_per_visit=images_per_visit,
        fractions={
            "reference_fraction": reference_fraction,
            "dicom_fraction": dicom_fraction,
            "png_fraction": png_fraction,
            "fitzpatrick_share": fitzpatrick_share,
        },
        size=size,
        visit_interval_days=visit_interval_days,
        workers=workers,
        truth=truth,
    )
    specs = plan_study(
        patients=patients,
        visits=visits,
        seed=seed,
        images_per_visit=images_per_visit,
        reference_fraction=reference_fraction,
        dicom_fraction=dicom_fraction,
        png_fraction=png_fraction,
        start_date=start_date,
        visit_interval_days=visit_interval_days,
    )
    root.mkdir(parents=True, exist_ok=True)
    workers = min(workers, len(specs), os.cpu_count() or 1)
    if workers <= 1:
        _write_images(root, specs, seed, size, truth)
    else:
        # spawn: safe whatever threads the caller runs (fork would copy their locks)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_write_images, root, chunk, seed, size, truth)
                for chunk in _chunks(specs, workers * 4)
            ]
            for future in futures:
                future.result()
    if manifest:
        (root / "manifest.csv").write_text(
            manifest_text(specs, fitzpatrick_share=fitzpatrick_share), encoding="utf-8",
            newline="")
    if truth is not None:
        write_truth_table(truth, specs)
    labels = dict.fromkeys(range(4), 0)
    for spec in specs:
        labels[spec.severity] += 1
    return SynthSummary(
        root=root,
        patients=patients,
        visits=visits,
        images=len(specs),
        references=sum(spec.reference for spec in specs),
        dicom=sum(spec.format.is_dicom for spec in specs),
        labels=labels,
        truth=truth,
    )
