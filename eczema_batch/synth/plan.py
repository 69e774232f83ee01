"""Plan a synthetic study: who is photographed when, where, at what severity, in which format.

The plan is pure data (no pixels) and depends only on its arguments, so a test or a benchmark
can ask what a study holds without writing it, and every picture can be painted on its own
(each has its own random stream), in any order, by any process, with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum

import numpy as np

#: body sites photographed (file stems); each patient keeps the same sites at every visit
BODY_SITES = ("left-arm", "right-arm", "left-leg", "right-leg", "neck", "trunk", "hands")

#: DICOM Body Part Examined for each site
BODY_PART = {
    "left-arm": "ARM",
    "right-arm": "ARM",
    "left-leg": "LEG",
    "right-leg": "LEG",
    "neck": "NECK",
    "trunk": "TRUNK",
    "hands": "HAND",
}

#: Cameras of the synthetic clinics, (make, model) as EXIF and DICOM name them
CAMERAS = (("Canon", "Canon EOS 250D"), ("Apple", "iPhone 13"), ("FotoFinder", "medicam 1000"))
#: Fitzpatrick skin types, light to deep; a patient's type is the sixth of the tone range its
#: tone falls in, and tones are spread in strata over patients, so 6k patients hold every type
FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")

#: chance that one image of a visit is a class above or below the visit's severity
SITE_DEVIATION = 0.15


class Trend(StrEnum):
    """How a patient's eczema moves over the study."""

    IMPROVING = "improving"
    STABLE = "stable"
    WORSENING = "worsening"


class Format(StrEnum):
    """How one picture is stored."""

    JPEG = "jpeg"  # .jpg, quality per visit (camera.QUALITY)
    PNG = "png"  # .png
    DICOM = "dicom"  # .dcm, VL Photographic Image, uncompressed RGB
    DICOM_JPEG = "dicom-jpeg"  # .dcm, VL Photographic Image, JPEG baseline

    @property
    def is_dicom(self) -> bool:
        return self in (Format.DICOM, Format.DICOM_JPEG)


@dataclass(frozen=True)
class Patient:
    index: int  # 0-based
    code: str  # subject code, e.g. S001 (never a name)
    trend: Trend
    tone: float  # skin tone, 0 (light) .. 1 (deep)
    sites: tuple[tuple[str, str], ...]  # (body site, file stem) photographed at every visit

    @property
    def camera(self) -> tuple[str, str]:
        """(make, model) of the clinic's camera: the patients of a study share a few, so the
        subgroup report has devices to compare (no random draw: every other picture stays)."""
        return CAMERAS[self.index % len(CAMERAS)]

    @property
    def fitzpatrick(self) -> str:
        """The Fitzpatrick skin type (I..VI) of the painted tone."""
        return FITZPATRICK[min(int(self.tone * len(FITZPATRICK)), len(FITZPATRICK) - 1)]


@dataclass(frozen=True)
class ImageSpec:
    """One picture of the study, everything needed to paint and write it."""

    patient: Patient
    visit_index: int  # 0-based
    visit_date: date
    site_index: int  # 0-based, position among the patient's sites
    body_site: str  # one of BODY_SITES
    stem: str  # file stem without prefix: the body site, then -2, -3.. when sites repeat
    severity: int  # 0..3
    format: Format
    reference: bool  # has a manual mask

    @property
    def folder(self) -> str:
        """The visit folder, relative to the study root (POSIX)."""
        return f"{self.patient.code}/{self.visit_date.isoformat()}"

    @property
    def path(self) -> str:
        """The picture's path relative to the study root (POSIX)."""
        if self.format.is_dicom:
            return f"{self.folder}/img-{self.stem}.dcm"
        suffix = ".png" if self.format is Format.PNG else ".jpg"
        return f"{self.folder}/{self.stem}{suffix}"

    @property
    def mask_path(self) -> str | None:
        """The manual mask's path relative to the study root, or None without one."""
        if not self.reference:
            return None
        stem = self.path.rsplit("/", 1)[1].rsplit(".", 1)[0]
        return f"{self.folder}/{stem}.mask.png"

    def seed(self, seed: int) -> list[int]:
        """Entropy for this picture's own random stream."""
        return [seed, 1, self.patient.index, self.visit_index, self.site_index]


def subject_code(index: int, patients: int) -> str:
    """S001, S002, ... (wider when there are more than 999 patients)."""
    return f"S{index + 1:0{max(3, len(str(patients)))}d}"


def _sites(count: int, rng: np.random.Generator) -> tuple[tuple[str, str], ...]:
    """`count` (body site, file stem) pairs: distinct sites first, then the same again as -2.."""
    order = [BODY_SITES[i] for i in rng.permutation(len(BODY_SITES))]
    out = []
    for k in range(count):
        site = order[k % len(order)]
        rounds = k // len(order)
        out.append((site, site if rounds == 0 else f"{site}-{rounds + 1}"))
    return tuple(out)


def _severities(trend: Trend, visits: int, rng: np.random.Generator) -> list[int]:
    """Severity per visit drifting with `trend`, with a little noise, clipped to 0..3."""
    if trend is Trend.IMPROVING:
        start, change = rng.uniform(2.6, 3.6), -rng.uniform(2.0, 3.4)
    elif trend is Trend.WORSENING:
        start, change = rng.uniform(-0.6, 0.4), rng.uniform(2.0, 3.4)
    else:
        start, change = rng.uniform(-0.3, 3.3), 0.0
    steps = np.arange(visits) / max(visits - 1, 1)
    level = start + change * steps + rng.normal(0.0, 0.3, visits)
    return [int(v) for v in np.clip(np.rint(level), 0, 3)]


def _visit_dates(
    visits: int, start: date, interval_days: int, rng: np.random.Generator
) -> list[date]:
    jitter = min(3, (interval_days - 1) // 2)
    out = [start]
    for i in range(1, visits):
        shift = int(rng.integers(-jitter, jitter + 1)) if jitter else 0
        out.append(start + timedelta(days=i * interval_days + shift))
    return out


def _choose_references(severity: list[int], count: int, rng: np.random.Generator) -> set[int]:
    """`count` image indices, spread over classes: every class present gets one before any gets
    a second, then roughly in proportion to its size."""
    keys: list[tuple[float, float, int]] = []
    for cls in sorted(set(severity)):
        members = [i for i, s in enumerate(severity) if s == cls]
        order = rng.permutation(len(members))
        for rank, pos in enumerate(order):
            keys.append((rank / len(members), float(rng.random()), members[pos]))
    keys.sort()
    return {i for _, _, i in keys[:count]}


def plan_study(
    *,
    patients: int,
    visits: int,
    seed: int,
    images_per_visit: int,
    reference_fraction: float,
    dicom_fraction: float,
    png_fraction: float,
    start_date: date,
    visit_interval_days: int,
) -> list[ImageSpec]:
    """Every picture of the study, ordered by patient, visit and site. Arguments as in
    `write_synthetic_study` (checked there)."""
    rng = np.random.default_rng([seed, 0])
    trends = [list(Trend)[i % 3] for i in range(patients)]
    trends = [trends[i] for i in rng.permutation(patients)]
    tones = (rng.permutation(patients) + rng.random(patients)) / patients

    # Pictures (patient, visit, site) in order, with their severity.
    rows: list[tuple[Patient, int, date, int, tuple[str, str], int]] = []
    for p in range(patients):
        prng = np.random.default_rng([seed, 2, p])
        patient = Patient(
            index=p,
            code=subject_code(p, patients),
            trend=trends[p],
            tone=float(tones[p]),
            sites=_sites(images_per_visit, prng),
        )
        levels = _severities(patient.trend, visits, prng)
        dates = _visit_dates(visits, start_date, visit_interval_days, prng)
        for v in range(visits):
            for k, site in enumerate(patient.sites):
                sev = levels[v]
                if prng.random() < SITE_DEVIATION:
                    sev = int(np.clip(sev + (1 if prng.random() < 0.5 else -1), 0, 3))
                rows.append((patient, v, dates[v], k, site, sev))

    total = len(rows)
    n_dicom = round(total * dicom_fraction)
    n_png = min(round(total * png_fraction), total - n_dicom)
    formats = [Format.JPEG] * total
    for rank, i in enumerate(rng.permutation(total)):
        if rank < n_dicom:
            formats[i] = Format.DICOM if rank % 2 == 0 else Format.DICOM_JPEG
        elif rank < n_dicom + n_png:
            formats[i] = Format.PNG
    references = _choose_references([r[5] for r in rows], round(total * reference_fraction), rng)
    return [
        ImageSpec(
            patient=patient,
            visit_index=v,
            visit_date=when,
            site_index=k,
            body_site=site[0],
            stem=site[1],
            severity=sev,
            format=formats[i],
            reference=i in references,
        )
        for i, (patient, v, when, k, site, sev) in enumerate(rows)
    ]
