"""Pictures for the HTML report: severity over time, the cohort's course, images with masks.

matplotlib through its object API (Figure + the Agg canvas), never pyplot: no global state, no
display, safe in a worker or a test.

Every plot of severity uses the severity scale itself: a fixed y-axis from the lowest to the
highest class with the class names on it, and the band of each class shaded (a score within 0.5
of class k reads as k). A change of a few hundredths then looks like what it is, flat; a
patient with one visit gets a fixed span of days, not an axis of +/- 0.04 days.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import decode_bytes, decode_mask_png
from eczema_batch.report.trends import PatientTrend, VisitNumberSummary
from eczema_batch.studyfiles import CataloguedFile

#: The lesion outline (RGB), drawn opaque between two dark edges: cyan is the colour farthest
#: from the reds and browns of inflamed skin, and the dark edges keep it visible on pale skin.
OUTLINE_RGB = (0, 255, 255)
OUTLINE_EDGE_RGB = (0, 0, 0)
#: The same colours for the page's legend (CSS).
OUTLINE_CSS = "#00ffff"
OUTLINE_EDGE_CSS = "#000000"
#: The smallest day span a dated patient plot shows: a patient seen once (or twice within a few
#: days) is drawn on four weeks, with day 0 at the left.
MIN_DAY_SPAN = 28
#: The smallest visit-number span of the plots by visit number.
MIN_VISIT_SPAN = 3
_DPI = 100
_POINT = "#1f4e9c"
_BAND = ("#f4f4f4", "#ffffff")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def score_band(score: float, n_classes: int) -> int:
    """The class whose band [k - 0.5, k + 0.5) holds an expected score (2.5 is severe's)."""
    k = int(np.floor(score + 0.5))
    return min(n_classes - 1, max(0, k))


def _severity_axis(ax: Axes, classes: Sequence[str]) -> None:
    """A fixed y-axis from the lowest to the highest class, class names on it, bands shaded."""
    top = len(classes) - 1
    for k in range(len(classes)):
        ax.axhspan(k - 0.5, k + 0.5, color=_BAND[k % 2], zorder=0, linewidth=0)
    ax.set_ylim(-0.5, top + 0.5)
    # parse_math=False: a `$` in a class name or patient code is text, not TeX to parse.
    ax.set_yticks(range(len(classes)), [f"{k} {c}" for k, c in enumerate(classes)],
                  parse_math=False)
    ax.grid(axis="y", color="#d0d0d0", linewidth=0.8)


def _x_span(values: Sequence[float], *, minimum: float, start: float) -> tuple[float, float]:
    """Axis limits from `start` to at least `start + minimum`, with a margin either side."""
    high = max([start + minimum, *values])
    margin = max(0.5, 0.04 * (high - start))
    return start - margin, high + margin


def severity_plot(trend: PatientTrend, classes: Sequence[str], *, title: str) -> bytes:
    return _png(severity_figure(trend, classes, title=title))


def severity_figure(trend: PatientTrend, classes: Sequence[str], *, title: str) -> Figure:
    """Expected score per visit on the severity scale: by days since baseline (or visit number
    when a scored visit is undated).

    Filled circles: the model's; squares: visits with a reviewed image; hollow: every image of
    the visit is flagged and waits for review.
    """
    scored = [v for v in trend.visits if v.visit.expected_score is not None]
    dated = all(v.days_from_baseline is not None for v in scored) and bool(scored)
    fig = Figure(figsize=(7.2, 3.6))
    ax = fig.add_subplot()
    _severity_axis(ax, classes)
    xs = [float(v.days_from_baseline if dated else v.number) for v in scored]  # type: ignore[arg-type]
    ys = [float(v.visit.expected_score) for v in scored]  # type: ignore[arg-type]
    ax.plot(xs, ys, color="#555555", linewidth=1.2, zorder=2)
    for x, y, v in zip(xs, ys, scored, strict=True):
        marker = "s" if v.visit.n_reviewed else "o"
        face = "white" if v.visit.provisional else _POINT
        ax.scatter([x], [y], marker=marker, s=50, facecolor=face, edgecolor=_POINT, zorder=3,
                   linewidths=1.5)
    if dated:
        ax.set_xlim(*_x_span(xs, minimum=MIN_DAY_SPAN, start=0.0))
        ax.set_xlabel("days since baseline")
    else:
        ax.set_xlim(*_x_span(xs, minimum=MIN_VISIT_SPAN - 1, start=1.0))
        ax.set_xlabel("visit number" + (" (undated visits)" if scored else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not scored:
        ax.text(0.5, 0.5, "no scored visit yet", transform=ax.transAxes, ha="center",
                va="center", color="#777777")
    ax.set_ylabel("expected severity")
    ax.set_title(title, fontsize=10, parse_math=False)
    ax.legend(handles=_marker_legend(), loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _marker_legend() -> list[Line2D]:
    def mark(marker: str, face: str, label: str) -> Line2D:
        return Line2D([], [], linestyle="none", marker=marker, markersize=7,
                      markerfacecolor=face, markeredgecolor=_POINT, label=label)
    return [mark("o", _POINT, "model"), mark("s", _POINT, "reviewed image(s)"),
            mark("o", "white", "all images flagged")]


@dataclass(frozen=True)
class VisitNumberScore:
    """Mean expected score of the patients' n-th visits (the cohort plot's left panel)."""

    number: int
    n: int
    mean: float
    sd: float | None


def cohort_plot(scores: Sequence[VisitNumberScore], per_visit: Sequence[VisitNumberSummary],
                classes: Sequence[str], *, stable_band: float) -> bytes:
    return _png(cohort_figure(scores, per_visit, classes, stable_band=stable_band))


def cohort_figure(scores: Sequence[VisitNumberScore], per_visit: Sequence[VisitNumberSummary],
                  classes: Sequence[str], *, stable_band: float) -> Figure:
    """Left: mean expected score per visit number on the severity scale; right: mean change from
    baseline on a fixed axis of +/- the whole scale, with the stable band shaded. Both +/- 1 SD."""
    fig = Figure(figsize=(10.0, 3.4))
    left, right = fig.subplots(1, 2)
    _severity_axis(left, classes)
    xs = [s.number for s in scores]
    left.errorbar(xs, [s.mean for s in scores], yerr=[s.sd or 0.0 for s in scores], marker="o",
                  capsize=3, color=_POINT, zorder=3)
    left.set_title("Mean expected severity per visit (+/- 1 SD)", fontsize=10)
    left.set_ylabel("expected severity")
    top = len(classes) - 1
    right.axhspan(-stable_band, stable_band, color="#eeeeee", zorder=0, linewidth=0,
                  label=f"stable band (+/- {stable_band:g})")
    right.axhline(0.0, color="#999999", linewidth=0.8)
    cx = [s.number for s in per_visit]
    right.errorbar(cx, [s.mean_change for s in per_visit],
                   yerr=[s.sd_change or 0.0 for s in per_visit], marker="o", capsize=3,
                   color=_POINT, zorder=3)
    right.set_ylim(-top - 0.2, top + 0.2)
    right.set_yticks(range(-top, top + 1))
    right.set_title("Mean change from baseline (+/- 1 SD); below 0 is better", fontsize=10)
    right.set_ylabel("change (classes of expected score)")
    right.legend(loc="upper right", fontsize=8, frameon=False)
    for ax, numbers in ((left, xs), (right, cx)):
        ax.set_xlim(*_x_span([float(n) for n in numbers], minimum=MIN_VISIT_SPAN - 1, start=1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("visit number (1 = baseline)")
        if not numbers:
            ax.text(0.5, 0.5, "no scored visit yet", transform=ax.transAxes, ha="center",
                    va="center", color="#777777")
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Rendering:
    """An image for the report: a thumbnail (outline drawn), a larger view without and with it."""

    thumbnail: bytes
    large: bytes
    #: the larger view with the mask outlined; None when the image has no mask
    large_outlined: bytes | None


def render_image(
    source: CataloguedFile, mask_png: bytes | None, *, thumb_side: int, large_side: int,
    max_pixels: int, identifying: bool = False,
) -> Rendering:
    """JPEGs of the image at two sizes, with its lesion mask outlined.

    Raises RejectedFileError when the image cannot be read (moved, changed since it was
    catalogued, broken): it is read under ingest's rules (`eczema_batch.studyfiles`). Raises
    IdentifyingPixelsError when the file's DICOM header says its pixels identify the patient,
    unless `identifying` allows them. The header is read here, from the file the pictures are made
    of, so that images catalogued before the catalogue kept that flag are held back too.
    """
    side = max(thumb_side, large_side)
    decoded = decode_bytes(source.read(), max_pixels=max_pixels, max_side=side * 2)
    if not identifying and decoded.dicom is not None and decoded.dicom.identifying_pixels:
        raise IdentifyingPixelsError(identifying_pixels_reason(decoded.dicom.identifying_pixels))
    image = Image.fromarray(np.array(decoded.pixels), "RGB")
    mask = (Image.fromarray(decode_mask_png(mask_png).astype(np.uint8) * 255, "L")
            if mask_png is not None else None)
    large = image.copy()
    large.thumbnail((large_side, large_side), Image.Resampling.BILINEAR)
    small = image.copy()
    small.thumbnail((thumb_side, thumb_side), Image.Resampling.BILINEAR)
    return Rendering(
        thumbnail=_jpeg(_outlined(small, mask) if mask is not None else small),
        large=_jpeg(large),
        large_outlined=_jpeg(_outlined(large, mask)) if mask is not None else None)


def _jpeg(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _outlined(image: Image.Image, mask_image: Image.Image) -> Image.Image:
    """The image with the mask's outline drawn: cyan, 1 px per 300 px of side, between dark
    edges of 1 px. The lesion itself is left as it is: a fill would tint the skin being judged."""
    mask = np.asarray(mask_image.resize(image.size, Image.Resampling.NEAREST)) > 0
    width = max(1, round(max(image.size) / 300))
    line = _outline(mask)
    for _ in range(width - 1):
        line = _dilate(line)
    edge = _dilate(line) & ~line
    pixels = np.array(image)
    pixels[edge] = OUTLINE_EDGE_RGB
    pixels[line] = OUTLINE_RGB
    return Image.fromarray(pixels, "RGB")


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


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (4-neighbours)."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2]
            | padded[1:-1, 2:])
