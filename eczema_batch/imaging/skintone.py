"""Skin tone of a photograph: the Individual Typology Angle (ITA) of the skin around the lesion.

ITA = atan2(L* - 50, b*) in degrees, in CIELAB (sRGB, D65), the colorimetric skin-colour measure
dermatology uses where no Fitzpatrick type was recorded (Chardon et al. 1991; Del Bino & Bernerd
2013). It is measured outside the lesion mask (the lesion's redness is the signal being measured,
not the skin's tone), on pixels that look like skin: clipped pixels and grey or blue-green ones
(a background cloth, a wall) are left out when enough skin-hued pixels remain. Medians, not means,
so a background band or a shadow at one edge moves the estimate little.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import NDArray

#: ITA categories (degrees, lower bound inclusive), light to dark, after Chardon et al. 1991
ITA_CATEGORIES: Final[tuple[tuple[str, float], ...]] = (
    ("very light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", -math.inf),
)
#: Fitzpatrick types grouped the way dermatology trials usually report them
FITZPATRICK_GROUPS: Final[dict[int, str]] = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV",
                                             5: "V-VI", 6: "V-VI"}
#: fewer skin-hued pixels than this share of those outside the lesion: use them all instead
_MIN_SKIN_SHARE = 0.05
#: pixels with a channel at or beyond these are clipped and say nothing about the skin
_DARK, _BRIGHT = 6, 250
#: CIELAB chroma below which a pixel is grey (its hue angle means nothing)
_MIN_CHROMA = 5.0

_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def _srgb_to_linear() -> NDArray[np.float64]:
    c = np.arange(256, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


#: sRGB level -> linear light (the sRGB transfer function, as a table of its 256 values)
_LINEAR = _srgb_to_linear()


def srgb_to_lab(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    """(..., 3) uint8 sRGB to (..., 3) CIELAB (D65 white, 2 degree observer); the one
    conversion the skin-tone estimate and the quality gate's colour cast share."""
    # einsum, not `linear @ matrix`: a matmul goes to BLAS, whose idle threads spin and took the
    # second core from the other ingest decode process (ingest ran 2x slower).
    f = _lab_f(np.einsum("...c,kc->...k", _LINEAR[np.asarray(rgb, dtype=np.uint8)], _TO_XYZ_WHITE))
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


#: sRGB linear light -> CIE XYZ, each row divided by the D65 white's value
_TO_XYZ_WHITE = _SRGB_TO_XYZ / _D65_WHITE[:, np.newaxis]


def _lab_f(t: NDArray[np.float64]) -> NDArray[np.float64]:
    delta = 6.0 / 29.0
    return np.where(t > delta**3, np.cbrt(t), t / (3 * delta**2) + 4.0 / 29.0)


def ita_degrees(lightness: float, b: float) -> float:
    """ITA from L* and b*; atan2 keeps it defined (+-90) where b* is 0."""
    return math.degrees(math.atan2(lightness - 50.0, b))


def skin_ita(rgb: NDArray[np.uint8], lesion: NDArray[np.bool_] | None) -> float | None:
    """The ITA of the skin outside `lesion` (same height and width as `rgb`), None when no pixel
    outside it is usable."""
    pixels = np.asarray(rgb).reshape(-1, 3)
    keep = ~((pixels >= _BRIGHT).any(axis=1) | (pixels <= _DARK).all(axis=1))
    if lesion is not None:
        if lesion.shape != rgb.shape[:2]:
            raise ValueError(f"mask {lesion.shape} and image {rgb.shape[:2]} differ in size")
        keep &= ~lesion.reshape(-1)
    if not keep.any():
        return None
    lab = srgb_to_lab(pixels[keep])
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    hue = np.degrees(np.arctan2(lab[:, 2], lab[:, 1]))
    # Skin hues lie between red and yellow (about 20-80 degrees in a*b*).
    skin = (chroma >= _MIN_CHROMA) & (hue >= 0.0) & (hue <= 100.0)
    if skin.sum() >= _MIN_SKIN_SHARE * len(lab):
        lab = lab[skin]
    return ita_degrees(float(np.median(lab[:, 0])), float(np.median(lab[:, 2])))


def ita_category(ita: float) -> str:
    for name, low in ITA_CATEGORIES:
        if ita >= low:
            return name
    raise AssertionError("the last category has no lower bound")


def fitzpatrick_group(skin_type: int) -> str:
    """"I-II", "III-IV" or "V-VI" for a Fitzpatrick type 1-6."""
    try:
        return FITZPATRICK_GROUPS[skin_type]
    except KeyError:
        raise ValueError(f"Fitzpatrick type {skin_type}: must be 1 to 6") from None


def skin_tone(fitzpatrick: int | None, ita: float | None) -> tuple[str | None, str | None]:
    """The subgroup an image's skin tone falls in, as `evaluate`'s subgroups name it, and where
    it came from: the manifest's Fitzpatrick type, else the estimated ITA."""
    if fitzpatrick is not None:
        return f"Fitzpatrick {fitzpatrick_group(fitzpatrick)}", "manifest"
    if ita is not None:
        return f"ITA {ita_category(ita)}", "estimated"
    return None, None


#: every skin-tone group `skin_tone` names, light to dark, manifest types first
TONE_GROUPS: Final[tuple[str, ...]] = (
    *(f"Fitzpatrick {g}" for g in dict.fromkeys(FITZPATRICK_GROUPS.values())),
    *(f"ITA {name}" for name, _ in ITA_CATEGORIES),
)


def tone_order(group: str) -> tuple[int, str]:
    """A sort key that lists skin-tone groups light to dark, anything else after them."""
    return (TONE_GROUPS.index(group) if group in TONE_GROUPS else len(TONE_GROUPS), group)
