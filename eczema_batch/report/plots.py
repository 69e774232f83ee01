"""Pictures for the HTML report: severity over time, the cohort's change, thumbnails with masks.

matplotlib through its object API (Figure + the Agg canvas), never pyplot: no global state, no
display, safe in a worker or a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import decode_bytes, decode_mask_png
from eczema_batch.report.trends import PatientTrend, VisitNumberSummary
from eczema_batch.studyfiles import CataloguedFile

#: Lesion overlay colour (RGB) and opacity on thumbnails; the outline is drawn opaque.
OVERLAY_RGB = (230, 40, 40)
OVERLAY_ALPHA = 0.35
OUTLINE_RGB = (255, 220, 0)
_DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def severity_plot(trend: PatientTrend, classes: Sequence[str], *, title: str) -> bytes:
    """Expected score (0..C-1) per visit: by days since baseline, or by visit number if undated.

    Filled circles: predictions; squares: visits with a reviewed image; hollow: every image of
    the visit is flagged and waits for review.
    """
    scored = [v for v in trend.visits if v.visit.expected_score is not None]
    dated = all(v.days_from_baseline is not None for v in scored) and bool(scored)
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot()
    xs = [float(v.days_from_baseline if dated else v.number) for v in scored]  # type: ignore[arg-type]
    ys = [float(v.visit.expected_score) for v in scored]  # type: ignore[arg-type]
    ax.plot(xs, ys, color="#555555", linewidth=1.2, zorder=1)
    for x, y, v in zip(xs, ys, scored, strict=True):
        marker = "s" if v.visit.n_reviewed else "o"
        face = "white" if v.visit.provisional else "#1f77b4"
        ax.scatter([x], [y], marker=marker, s=46, facecolor=face, edgecolor="#1f77b4", zorder=2)
    ax.set_ylim(-0.2, len(classes) - 0.8)
    # parse_math=False: a `$` in a class name or patient code is text, not TeX to parse.
    ax.set_yticks(range(len(classes)), [f"{k} {c}" for k, c in enumerate(classes)],
                  parse_math=False)
    ax.grid(axis="y", color="#dddddd")
    ax.set_xlabel("days since baseline" if dated else "visit number (undated visits)")
    ax.set_ylabel("expected severity")
    ax.set_title(title, fontsize=10, parse_math=False)
    fig.tight_layout()
    return _png(fig)


def cohort_plot(per_visit: Sequence[VisitNumberSummary]) -> bytes:
    """Mean change from baseline (expected score) per visit number, +/- one SD."""
    fig = Figure(figsize=(6.4, 3.0))
    ax = fig.add_subplot()
    xs = [s.number for s in per_visit]
    ys = [s.mean_change for s in per_visit]
    err = [s.sd_change or 0.0 for s in per_visit]
    ax.axhline(0.0, color="#999999", linewidth=0.8)
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color="#1f77b4")
    ax.set_xticks(xs)
    ax.set_xlabel("visit number (1 = baseline)")
    ax.set_ylabel("change from baseline")
    ax.set_title("Mean change from baseline (+/- 1 SD); below 0 is better", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def thumbnail(
    source: CataloguedFile, mask_png: bytes | None, *, max_side: int, max_pixels: int,
    identifying: bool = False,
) -> bytes:
    """A JPEG thumbnail of the image with its lesion mask filled and outlined.

    Raises RejectedFileError when the image cannot be read (moved, changed since it was
    catalogued, broken): it is read under ingest's rules (`eczema_batch.studyfiles`). Raises
    IdentifyingPixelsError when the file's DICOM header says its pixels identify the patient,
    unless `identifying` allows them. The header is read here, from the file the thumbnail is made
    of, so that images catalogued before the catalogue kept that flag are held back too.
    """
    decoded = decode_bytes(source.read(), max_pixels=max_pixels, max_side=max_side * 2)
    if not identifying and decoded.dicom is not None and decoded.dicom.identifying_pixels:
        raise IdentifyingPixelsError(identifying_pixels_reason(decoded.dicom.identifying_pixels))
    image = Image.fromarray(np.array(decoded.pixels), "RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    if mask_png is not None:
        mask_image = Image.fromarray(decode_mask_png(mask_png).astype(np.uint8) * 255, "L")
        mask = np.asarray(mask_image.resize(image.size, Image.Resampling.NEAREST)) > 0
        pixels = np.asarray(image, dtype=np.float32)
        pixels[mask] = (1 - OVERLAY_ALPHA) * pixels[mask] + OVERLAY_ALPHA * np.array(OVERLAY_RGB)
        pixels[_outline(mask)] = OUTLINE_RGB
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class IdentifyingPixelsError(RejectedFileError):
    """the image's pixels identify the patient: no thumbnail is made of it"""


def identifying_pixels_reason(tag: str) -> str:
    return (f"its DICOM header says the pixels identify the patient ({tag} = YES): no "
            "thumbnail in a report meant to be shared; --include-identifying-pixels shows it")


def _outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or on the border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner
