"""What a camera does to a painted picture, visit by visit: the light, the exposure, the focus.

Photographs of one patient taken weeks apart differ by more than the skin: another room's light
(white balance), another exposure (brightness), a slightly soft focus, a noisier sensor and
another JPEG quality. Each visit draws its own conditions, shared by the pictures taken at it, so
a tool that tracks a patient over time meets what it would meet in a clinic. The lesion mask is
untouched: the truth is what was painted. All of it is elementwise float32 arithmetic or Pillow
filters on integers, so the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

#: white-balance shift: red gained and blue lost by up to this share (warm light) or the reverse
ILLUMINANT = 0.05
#: exposure: overall brightness gain range
BRIGHTNESS = (0.88, 1.1)
#: Gaussian blur radius range, in pixels (0 to a slightly soft focus)
BLUR = (0.0, 0.7)
#: extra sensor noise standard deviation range, in grey levels
NOISE = (0.0, 2.5)
#: JPEG quality range of the photographs (.jpg files and the JPEG inside DICOM)
QUALITY = (78, 95)
#: share of the visits whose framing shows background at one edge, and that edge's width range
#: (a share of the picture's side): the lesion sits in the middle, the band never reaches it
BACKGROUND_CHANCE = 0.6
BACKGROUND_WIDTH = (0.03, 0.09)
#: what is behind the patient (sRGB): a grey wall, a blue and a green drape, a white sheet
BACKGROUNDS = ((150.0, 150.0, 146.0), (70.0, 110.0, 160.0), (80.0, 130.0, 110.0),
               (225.0, 228.0, 230.0))
_EDGES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class Conditions:
    """How the pictures of one visit were taken."""

    gains: tuple[float, float, float]  # RGB gain: illuminant times exposure
    blur: float  # Gaussian blur radius, pixels
    noise: float  # extra sensor noise, grey levels
    jpeg_quality: int
    #: background at one edge of the frame: (edge, width as a share of the side, sRGB colour)
    background: tuple[str, float, tuple[float, float, float]] | None = None


def visit_conditions(rng: np.random.Generator) -> Conditions:
    """Draw one visit's conditions."""
    warmth = float(rng.uniform(-ILLUMINANT, ILLUMINANT))
    exposure = float(rng.uniform(*BRIGHTNESS))
    blur = float(rng.uniform(*BLUR))
    noise = float(rng.uniform(*NOISE))
    quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
    background = None
    if rng.random() < BACKGROUND_CHANCE:  # drawn last: the other draws stay what they were
        background = (_EDGES[int(rng.integers(len(_EDGES)))],
                      float(rng.uniform(*BACKGROUND_WIDTH)),
                      BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    return Conditions(
        gains=(exposure * (1.0 + warmth), exposure, exposure * (1.0 - warmth)),
        blur=blur, noise=noise, jpeg_quality=quality, background=background,
    )


def frame(rgb: NDArray[np.uint8], mask: NDArray[np.bool_], conditions: Conditions
          ) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The painted skin as framed at the visit: background over a band at one edge.

    Returns new arrays. The band hides whatever was painted under it, lesion included, so the
    mask is cleared there too: the truth stays exactly what the picture shows.
    """
    if conditions.background is None:
        return rgb, mask
    edge, share, colour = conditions.background
    height, width = mask.shape
    band = max(1, round(share * (height if edge in ("top", "bottom") else width)))
    region = {"top": np.s_[:band, :], "bottom": np.s_[height - band:, :],
              "left": np.s_[:, :band], "right": np.s_[:, width - band:]}[edge]
    out, cleared = rgb.copy(), mask.copy()
    out[region] = np.asarray(colour, dtype=np.float32).round().astype(np.uint8)
    cleared[region] = False
    return out, cleared


def photograph(
    rgb: NDArray[np.uint8], conditions: Conditions, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """`rgb` (H, W, 3) as taken under `conditions`: a new array, `rgb` is left as it is."""
    image = Image.fromarray(rgb, mode="RGB")
    if conditions.blur >= 0.1:
        image = image.filter(ImageFilter.GaussianBlur(conditions.blur))
    out = np.asarray(image, dtype=np.float32) * np.asarray(conditions.gains, dtype=np.float32)
    if conditions.noise > 0.0:
        noise = rng.standard_normal(out.shape[:2], dtype=np.float32)
        noise *= np.float32(conditions.noise)
        out += noise[..., None]
    out += np.float32(0.5)  # rounds on the cast below
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)
