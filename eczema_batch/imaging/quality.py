"""Image-quality measures of a decoded photo (blur, exposure, colour cast) and the gate's judgement.

Pure numpy on a small copy (`SAMPLE_SIDE`), read in evenly spread strips (about a quarter of its
rows): ingest measures every photograph in its decode workers, where a measure costs what a
320 x 240 JPEG's decode does (`python -m bench.quality`). Measures depend on the scale they are
taken at (a Laplacian sees less detail in a smaller copy), so every image is measured at the same
longest side and the thresholds below were chosen at that side. Thresholds are compared at
ingest; the measures are stored with them, so a flag can always be explained from the catalogue
alone. No matmul anywhere here: numpy hands it to BLAS, whose idle threads spin and took the
second core from the other decode process (ingest ran 2x slower).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from eczema_batch.imaging.skintone import srgb_to_lab

if TYPE_CHECKING:
    from eczema_batch.config import Settings

#: Longest side of the copy measured (pixels); images already smaller are measured as they are.
SAMPLE_SIDE = 512
#: Changes when a measure's definition changes (not when thresholds do: those are stored too).
#: 1: the whole copy; 2: strips of its rows (BAND_ROWS of every BAND_PERIOD), the colour median
#: of 1,024 pixels (the same quantities, estimated; measures already stored are kept).
METHOD = 2
#: Grey levels at or below / at or above these are clipped shadows / highlights.
DARK_LEVEL = 2
BRIGHT_LEVEL = 253


@dataclass(frozen=True)
class QualityMeasures:
    #: variance of the 4-neighbour Laplacian of the grey image (0-255 levels): low is blurred
    sharpness: float
    #: mean grey level, 0 (black) to 1 (white)
    luminance: float
    #: shares of pixels clipped to black / to white
    dark_share: float
    bright_share: float
    #: median CIELAB a*, b* of the picture, and how far that colour lies from every skin colour
    cast_a: float
    cast_b: float
    cast: float

    def as_dict(self) -> dict[str, float]:
        # not dataclasses.asdict, which deep-copies: ingest calls this for every photograph
        return {name: round(float(getattr(self, name)), 4) for name in _MEASURE_NAMES}


@dataclass(frozen=True)
class QualityThresholds:
    """Where the gate flags an image (Settings: ECZEMA_BATCH_QUALITY_*).

    Defaults from measurements (README, "Image quality"): synthetic studies (129 photos at 320 and
    1024 px) against copies made bad on purpose. Sharpness 4.7-2200 (median 55) against 0.5-1.9
    after a Gaussian blur of radius 3 px; luminance 0.28-0.78 against 0.04-0.12 (x0.15) and
    0.83-1.0 (+140 levels); cast 0 against a median of 11-17 with strong blue, green and magenta
    white balance. Synthetic skin is smoother than a photograph's: calibrate `min_sharpness` on
    a study's own photos (`images.quality` keeps every measure).
    """

    min_sharpness: float = 3.0
    min_luminance: float = 0.15
    max_luminance: float = 0.85
    max_dark_share: float = 0.25
    max_bright_share: float = 0.10
    max_cast: float = 4.0

    def as_dict(self) -> dict[str, float]:
        return dict(_thresholds_items(self))


_MEASURE_NAMES = tuple(QualityMeasures.__dataclass_fields__)


@functools.cache
def _thresholds_items(t: QualityThresholds) -> tuple[tuple[str, float], ...]:
    """Once per set of thresholds, not once per photograph."""
    return tuple(asdict(t).items())


def thresholds_from(settings: Settings) -> QualityThresholds:
    """The thresholds set by ECZEMA_BATCH_QUALITY_* (defaults: QualityThresholds')."""
    names = QualityThresholds.__dataclass_fields__
    return QualityThresholds(**{name: getattr(settings, f"quality_{name}") for name in names})


def measure(rgb: NDArray[np.uint8]) -> QualityMeasures:
    """Measure an RGB uint8 (h, w, 3) image (ingest passes a copy shrunk to SAMPLE_SIDE)."""
    bands = _bands(rgb)
    # Channel by channel, not `rgb @ weights` (no BLAS: see above), in place: ingest pays for
    # every temporary array on every file.
    wide = bands.astype(np.float32)
    grey = wide[..., 0] * _LUMA[0]
    grey += wide[..., 1] * _LUMA[1]
    grey += wide[..., 2] * _LUMA[2]
    levels = grey.reshape(-1)
    cast_a, cast_b = _median_chroma(rgb)
    return QualityMeasures(
        sharpness=_laplacian_variance(grey),
        luminance=float(levels.mean() / 255.0),
        dark_share=int(np.count_nonzero(levels <= DARK_LEVEL)) / levels.size,
        bright_share=int(np.count_nonzero(levels >= BRIGHT_LEVEL)) / levels.size,
        cast_a=cast_a, cast_b=cast_b, cast=_outside_skin_hues(cast_a, cast_b),
    )


#: ITU-R BT.601 luma weights
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
#: The measures read the first BAND_ROWS rows of every BAND_PERIOD: about a quarter of the
#: picture, evenly spread, in strips the Laplacian runs along (rows 2-3 of each 4 are its
#: centres). A statistic of the whole frame needs no more (a 320 x 240 copy still gives 8,900
#: Laplacian values), and ingest measures every photograph it reads. The period is prime so that
#: the strips fall at every offset of a periodic pattern (JPEG's 8 x 8 blocks, a weave).
BAND_ROWS, BAND_PERIOD = 4, 17


def _bands(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(strips, BAND_ROWS, w, 3) views of `rgb`; a picture under two periods high is one strip."""
    height = rgb.shape[0]
    if height < 2 * BAND_PERIOD:
        return rgb[np.newaxis]
    strips = height // BAND_PERIOD
    whole = rgb[: strips * BAND_PERIOD].reshape(strips, BAND_PERIOD, *rgb.shape[1:])
    return whole[:, :BAND_ROWS]


def _laplacian_variance(grey: NDArray[np.float32]) -> float:
    """Variance of the 4-neighbour Laplacian over the centre rows of (strips, rows, w) grey."""
    if grey.shape[1] < 3 or grey.shape[2] < 3:
        return 0.0
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
    lap += grey[:, 1:-1, :-2]
    lap += grey[:, 1:-1, 2:]
    lap -= 4.0 * grey[:, 1:-1, 1:-1]
    return float(lap.var())


#: The colour median reads about this many pixels (evenly spaced, taken before the clipped ones
#: are dropped): a median needs no more (its standard error is ~1.25 sigma / sqrt(n), under 0.3
#: CIELAB units for skin, against a threshold of 4), and each pixel more is ingest time.
CHROMA_PIXELS = 1024


def _median_chroma(rgb: NDArray[np.uint8]) -> tuple[float, float]:
    """Median a*, b* of the unclipped pixels. In a skin photo the median is skin: a drape or a
    sheet at the edge (a tenth of the frame) does not move it, as it would move a mean or a
    brightest-pixels measure (a blue drape is the brightest thing beside dark skin)."""
    pixels = rgb.reshape(-1, 3)
    # every step-th pixel of the whole frame; an odd step moves the column from row to row
    sampled = pixels[:: -(-len(pixels) // CHROMA_PIXELS) | 1]
    wide = sampled.astype(np.float32)
    levels = wide[:, 0] * _LUMA[0] + wide[:, 1] * _LUMA[1] + wide[:, 2] * _LUMA[2]
    chosen = sampled[(levels > DARK_LEVEL) & (levels < BRIGHT_LEVEL)]
    if not len(chosen):
        return 0.0, 0.0
    a, b = _medians(srgb_to_lab(chosen)[:, 1:])
    return a, b


def _medians(values: NDArray[np.float64]) -> tuple[float, ...]:
    """Each column's median, as np.median gives it, from one partition (np.median's own
    overhead was most of the gate's time on a small photograph)."""
    half = len(values) // 2
    kth = [half] if len(values) % 2 else [half - 1, half]
    middle = np.partition(values, kth, axis=0)[kth]
    return tuple(float(v) for v in middle.mean(axis=0))


#: Hue angles (degrees, CIELAB h_ab) of skin under a neutral light: red to yellow. Synthetic skin
#: of every tone measured 41-73 degrees, and the ITA literature's skin sits in the same quadrant;
#: strong blue and magenta casts moved it below 21 degrees, a green one above 107.
SKIN_HUES = (30.0, 95.0)


def _outside_skin_hues(a: float, b: float) -> float:
    """How far (CIELAB units) the colour (a*, b*) lies from every skin colour: 0 within the skin
    hues or for a neutral grey, else its distance to the nearest edge of that sector. A warm
    (tungsten) cast stays inside the sector and is not caught: it cannot be told from redder skin;
    blue, green and magenta white-balance errors, which no skin has, are."""
    chroma = float(np.hypot(a, b))
    hue = float(np.degrees(np.arctan2(b, a)))
    low, high = SKIN_HUES
    if low <= hue <= high:
        return 0.0
    # angle to the nearer edge of the sector, going round the circle
    off = min((low - hue) % 360.0, (hue - high) % 360.0)
    return chroma * float(np.sin(np.radians(off))) if off < 90.0 else chroma


def _cast_name(a: float, b: float) -> str:
    hue = float(np.degrees(np.arctan2(b, a)))
    if SKIN_HUES[1] < hue <= 150.0:
        return "green"
    if -45.0 <= hue < SKIN_HUES[0]:
        return "magenta"
    return "blue"


def flag_reasons(m: QualityMeasures, t: QualityThresholds) -> list[str]:
    """Why the image is out of range, in words a reviewer can check; [] when it passes."""
    reasons = []
    if m.sharpness < t.min_sharpness:
        reasons.append(f"blurred (Laplacian variance {m.sharpness:.0f} < {t.min_sharpness:g})")
    if m.luminance < t.min_luminance:
        reasons.append(f"underexposed (mean luminance {m.luminance:.2f} < {t.min_luminance:g})")
    if m.luminance > t.max_luminance:
        reasons.append(f"overexposed (mean luminance {m.luminance:.2f} > {t.max_luminance:g})")
    if m.dark_share > t.max_dark_share:
        reasons.append(f"shadows clipped ({m.dark_share:.0%} of pixels black > "
                       f"{t.max_dark_share:.0%})")
    if m.bright_share > t.max_bright_share:
        reasons.append(f"highlights clipped ({m.bright_share:.0%} of pixels white > "
                       f"{t.max_bright_share:.0%})")
    if m.cast > t.max_cast:
        reasons.append(f"{_cast_name(m.cast_a, m.cast_b)} colour cast (median a* "
                       f"{m.cast_a:.0f}, b* {m.cast_b:.0f}: {m.cast:.1f} > {t.max_cast:g} "
                       "from skin hues)")
    return reasons


def quality_record(m: QualityMeasures, t: QualityThresholds) -> tuple[dict[str, Any], str | None]:
    """What the catalogue stores: `images.quality` (measures, method, thresholds) and
    `images.quality_flag` (the reasons, "; "-joined, or None)."""
    reasons = flag_reasons(m, t)
    doc = {"method": METHOD, "side": SAMPLE_SIDE, **m.as_dict(), "thresholds": t.as_dict()}
    return doc, "; ".join(reasons) or None


def not_measured(reason: str) -> dict[str, Any]:
    """`images.quality` of a picture ingest decoded but did not measure (no flag): present, so
    that ingest does not decode it again to measure it."""
    return {"method": METHOD, "not_measured": reason}


def measures_from(doc: dict[str, Any]) -> QualityMeasures:
    """The measures stored by `quality_record`."""
    return QualityMeasures(**{k: float(doc[k]) for k in QualityMeasures.__dataclass_fields__})
