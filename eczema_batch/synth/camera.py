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
#: JPEG quality range of the .jpg photographs
QUALITY = (78, 95)


@dataclass(frozen=True)
class Conditions:
    """How the pictures of one visit were taken."""

    gains: tuple[float, float, float]  # RGB gain: illuminant times exposure
    blur: float  # Gaussian blur radius, pixels
    noise: float  # extra sensor noise, grey levels
    jpeg_quality: int


def visit_conditions(rng: np.random.Generator) -> Conditions:
    """Draw one visit's conditions."""
    warmth = float(rng.uniform(-ILLUMINANT, ILLUMINANT))
    exposure = float(rng.uniform(*BRIGHTNESS))
    return Conditions(
        gains=(exposure * (1.0 + warmth), exposure, exposure * (1.0 - warmth)),
        blur=float(rng.uniform(*BLUR)),
        noise=float(rng.uniform(*NOISE)),
        jpeg_quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)),
    )


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
