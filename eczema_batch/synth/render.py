"""Paint one synthetic eczema photograph and its lesion mask (vectorised numpy + Pillow).

A picture is skin of the patient's tone under a mild lighting gradient and vignette, with
low-frequency mottling and fine sensor noise, carrying one lesion made of a few overlapping soft
ellipses with a wobbly border. The lesion's extent, redness and roughness (plus white scale from
severity 2) grow with the severity class, so severity is learnable from pixels alone.

Everything smooth is painted at a working resolution of at most ``WORK_MAX`` pixels on the long
side and upscaled bilinearly; only the fine noise is drawn at full size. That keeps 12 MP pictures
cheap while the lesion keeps the same look at every size. The mask is the painted coverage
(upscaled alongside the picture) thresholded at one half, so it is exactly what was painted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

#: longest side of the grid the smooth parts are painted on
WORK_MAX = 800

# Skin tones from light to deep (sRGB), interpolated by a tone in [0, 1].
_SKIN_TONES = np.array(
    [
        [236.0, 198.0, 176.0],
        [214.0, 168.0, 138.0],
        [182.0, 130.0, 98.0],
        [140.0, 96.0, 70.0],
        [98.0, 66.0, 50.0],
    ],
    dtype=np.float32,
)

# Per severity class 0..3 (clear, mild, moderate, severe).
#: lesion area as a fraction of the picture (low, high)
AREA = ((0.004, 0.012), (0.035, 0.07), (0.10, 0.16), (0.22, 0.32))
#: how far the lesion is blended toward inflamed red (low, high)
REDNESS = ((0.10, 0.16), (0.34, 0.42), (0.56, 0.64), (0.80, 0.90))
#: amplitude of the lesion's roughness noise, in grey levels
ROUGHNESS = (1.5, 5.0, 10.0, 16.0)
#: share of lesion pixels covered by white scale
SCALE = (0.0, 0.004, 0.025, 0.07)

#: standard deviation of the fine sensor noise, in grey levels
GRAIN = 2.0

_INFLAMED_GAIN = np.array([1.0, 0.58, 0.64], dtype=np.float32)
_INFLAMED_SHIFT = np.array([22.0, 0.0, 4.0], dtype=np.float32)
_PALE = np.array([238.0, 230.0, 222.0], dtype=np.float32)
_BILINEAR = Image.Resampling.BILINEAR

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Painting:
    """A painted picture: RGB uint8 (H, W, 3) and the lesion mask, bool (H, W)."""

    rgb: NDArray[np.uint8]
    mask: NDArray[np.bool_]


def skin_colour(tone: float) -> FloatArray:
    """Base skin colour (RGB float32) for a tone in [0, 1], light to deep."""
    pos = float(np.clip(tone, 0.0, 1.0)) * (len(_SKIN_TONES) - 1)
    lo = min(int(pos), len(_SKIN_TONES) - 2)
    frac = pos - lo
    out: FloatArray = (1.0 - frac) * _SKIN_TONES[lo] + frac * _SKIN_TONES[lo + 1]
    return out


def _resize_float(field: FloatArray, width: int, height: int) -> FloatArray:
    """Bilinear resize of a 2-D float32 field with Pillow (fast, C)."""
    if field.shape == (height, width):
        return field
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.array(img.resize((width, height), _BILINEAR), dtype=np.float32)


class _Lerp:
    """Bilinear upsampling of a small grid to (h, w), corners aligned, elementwise only (exact
    IEEE arithmetic, so byte-identical on every machine, unlike a BLAS product)."""

    def __init__(self, cells: tuple[int, int], width: int, height: int) -> None:
        self.cells = cells
        self.iy0, self.iy1, self.fy = self._axis(cells[0], height)
        self.ix0, self.ix1, self.fx = self._axis(cells[1], width)
        self._rows = np.empty((height, cells[1]), np.float32)
        self._right = np.empty((height, width), np.float32)

    @staticmethod
    def _axis(n: int, size: int) -> tuple[NDArray[np.intp], NDArray[np.intp], FloatArray]:
        pos = np.linspace(0.0, n - 1.0, size, dtype=np.float64)
        i0 = np.minimum(pos.astype(np.intp), n - 2)
        return i0, i0 + 1, (pos - i0).astype(np.float32)

    def noise(self, rng: np.random.Generator, out: FloatArray) -> FloatArray:
        """Fill `out` with smooth noise: an N(0, 1) grid of `cells` upsampled; returns `out`."""
        grid = rng.standard_normal(self.cells, dtype=np.float32)
        rows = self._rows
        np.subtract(grid[self.iy1], grid[self.iy0], out=rows)
        rows *= self.fy[:, None]
        rows += grid[self.iy0]
        right = self._right
        np.take(rows, self.ix1, axis=1, out=right)
        np.take(rows, self.ix0, axis=1, out=out)
        right -= out
        right *= self.fx[None, :]
        out += right
        return out


def _grain_noise(rng: np.random.Generator, out: FloatArray) -> None:
    """Fill `out` with zero-mean, unit-variance white noise (uniform: 3x cheaper than normal)."""
    rng.random(dtype=np.float32, out=out)
    out -= np.float32(0.5)
    out *= np.float32(np.sqrt(12.0))


def _lesion_coverage(
    rng: np.random.Generator, cover: FloatArray, wobble: FloatArray, lerp: _Lerp, area: float
) -> None:
    """Paint into `cover` (zeroed, (h, w)) the soft coverage in [0, 1] of one lesion of about
    `area` (a fraction of the picture): a few overlapping ellipses with soft, wobbly borders."""
    height, width = cover.shape
    n_blobs = int(rng.integers(2, 6))
    # Radius of one disc holding the whole area; blobs overlap, so each gets more than 1/n of it.
    radius = float(np.sqrt(area * width * height / np.pi))
    blob_r = radius * float(np.sqrt(1.6 / n_blobs))
    cx = width * float(rng.uniform(0.3, 0.7))
    cy = height * float(rng.uniform(0.3, 0.7))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    # The border wobbles: the elliptical distance is scaled by smooth noise (clipped, so that a
    # blob never reaches past its bounding box).
    lerp.noise(rng, wobble)
    wobble *= np.float32(0.18)
    wobble += np.float32(1.0)
    np.clip(wobble, 0.8, 1.4, out=wobble)
    soft = np.float32(1.0 / 0.25)  # the soft edge is a quarter of a blob's radius wide
    for _ in range(n_blobs):
        bx = cx + float(rng.normal(0.0, 0.55 * radius))
        by = cy + float(rng.normal(0.0, 0.55 * radius))
        a = blob_r * float(rng.uniform(0.8, 1.3))
        b = a * float(rng.uniform(0.45, 1.0))
        theta = float(rng.uniform(0.0, np.pi))
        c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
        reach = a * 1.45  # (1 + edge / 2) / smallest wobble: coverage is 0 beyond
        x0, x1 = max(int(bx - reach), 0), min(int(bx + reach) + 1, width)
        y0, y1 = max(int(by - reach), 0), min(int(by + reach) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = xs[:, x0:x1] - np.float32(bx)
        dy = ys[y0:y1, :] - np.float32(by)
        u = (dx * (c / np.float32(a))) + dy * (s / np.float32(a))
        v = (dy * (c / np.float32(b))) - dx * (s / np.float32(b))
        q = u * u
        q += v * v
        np.sqrt(q, out=q)
        q *= wobble[y0:y1, x0:x1]
        # 1 inside, 0 outside, linear across the edge; 0.5 (the mask's threshold) mid-edge
        blob = (np.float32(1.0) - q) * soft + np.float32(0.5)
        np.clip(blob, 0.0, 1.0, out=blob)
        window = cover[y0:y1, x0:x1]
        np.maximum(window, blob, out=window)


class Painter:
    """Paints photographs of one size, reusing its work buffers from one picture to the next.

    Fresh large arrays are costly where page faults are (virtual machines): reusing the buffers
    makes a small picture about twice as fast. The arrays `paint` returns are the painter's own
    and change with the next call; copy them to keep them. One painter per thread.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        width, height = size
        if width < 8 or height < 8:
            raise ValueError(f"a picture must be at least 8x8 pixels, not {width}x{height}")
        self.size = (width, height)
        scale = min(1.0, WORK_MAX / max(width, height))
        w = max(8, round(width * scale))
        h = max(8, round(height * scale))
        self.work = (w, h)
        self.native = (w, h) == (width, height)
        self._cover = np.empty((h, w), np.float32)
        self._gain = np.empty((h, w), np.float32)
        self._noise = np.empty((h, w), np.float32)
        self._tmp = np.empty((h, w), np.float32)
        self._flakes = np.empty((h, w), np.float32)
        self._colour = np.empty((3, h, w), np.float32)
        self._planes = np.empty((3, h, w), np.uint8)
        self._rgb = np.empty((h, w, 3), np.uint8)
        self._wobble = _Lerp((7, 9), w, h)
        self._mottle = _Lerp((6, 8), w, h)
        self._papules = _Lerp((max(2, h // 6), max(2, w // 6)), w, h)
        self._field = np.empty((h, w), np.float32)
        ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
        xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
        self._xs, self._ys = xs, ys
        self._radius2 = xs * xs + ys * ys
        if not self.native:
            self._grain = np.empty((height, width), np.float32)
            self._big = np.empty((height, width, 3), np.float32)
            self._out = np.empty((height, width, 3), np.uint8)

    def paint(self, rng: np.random.Generator, *, severity: int, tone: float) -> Painting:
        """Paint one photograph showing a lesion of `severity` (0..3) on skin of `tone` (0..1)."""
        if severity not in (0, 1, 2, 3):
            raise ValueError(f"severity must be 0..3, not {severity}")
        w, h = self.work
        width, height = self.size
        cover, gain, noise, tmp = self._cover, self._gain, self._noise, self._tmp
        colour = self._colour

        # Skin: patient tone, a little white-balance jitter per photograph.
        base = skin_colour(tone) * rng.uniform(0.96, 1.04, 3).astype(np.float32)
        # Lighting: a linear gradient in a random direction, a mild vignette, mottling.
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        strength = np.float32(rng.uniform(0.05, 0.12))
        np.multiply(self._xs, strength * np.float32(np.cos(angle)), out=gain)
        gain += self._ys * (strength * np.float32(np.sin(angle)))
        gain -= self._radius2 * np.float32(rng.uniform(0.03, 0.08))
        field = self._mottle.noise(rng, self._field)
        field *= np.float32(0.025)
        gain += field
        gain += np.float32(1.0)

        # Lesion: coverage, then a blend toward an inflamed red of the same skin. Colours stay
        # planar (3, h, w) while painting: broadcasting over the first axis is the fast one.
        cover.fill(0.0)
        lo, hi = AREA[severity]
        _lesion_coverage(rng, cover, self._field, self._wobble, float(rng.uniform(lo, hi)))
        red_lo, red_hi = REDNESS[severity]
        redness = np.float32(rng.uniform(red_lo, red_hi))
        inflamed = base * _INFLAMED_GAIN + _INFLAMED_SHIFT
        np.multiply(cover, redness, out=tmp)
        np.multiply((inflamed - base)[:, None, None], tmp[None], out=colour)
        colour += base[:, None, None]
        # Scale: pale flakes on the lesion's core.
        if SCALE[severity] > 0.0:
            rng.random(dtype=np.float32, out=self._flakes)
            flakes = (self._flakes < np.float32(SCALE[severity])) & (cover > np.float32(0.6))
            colour[:, flakes] = 0.45 * colour[:, flakes] + 0.55 * _PALE[:, None]
        colour *= gain[None]
        # Roughness: grey-level noise inside the lesion, part of it coarse (papules); at native
        # size the fine sensor noise (luminance grain) shares its draw.
        rough = self._papules.noise(rng, self._field)
        rough *= np.float32(0.8 * ROUGHNESS[severity])
        rough *= cover
        _grain_noise(rng, noise)
        np.multiply(cover, np.float32(ROUGHNESS[severity]), out=tmp)
        if self.native:
            tmp += np.float32(GRAIN)
        tmp *= noise
        tmp += rough
        tmp += np.float32(0.5)  # rounds on the cast below
        colour += tmp[None]
        np.clip(colour, 0.0, 255.0, out=colour)
        np.copyto(self._planes, colour, casting="unsafe")
        rgb = self._rgb
        np.copyto(rgb, self._planes.transpose(1, 2, 0))
        if self.native:
            return Painting(rgb=rgb, mask=cover >= np.float32(0.5))

        big = Image.fromarray(rgb, mode="RGB").resize((width, height), _BILINEAR)
        grain = self._grain
        _grain_noise(rng, grain)
        grain *= np.float32(GRAIN)
        grain += np.float32(0.5)
        np.add(np.asarray(big), grain[..., None], out=self._big)
        np.clip(self._big, 0.0, 255.0, out=self._big)
        np.copyto(self._out, self._big, casting="unsafe")
        mask = _resize_float(cover, width, height) >= np.float32(0.5)
        return Painting(rgb=self._out, mask=mask)


def paint(
    rng: np.random.Generator, *, size: tuple[int, int], severity: int, tone: float
) -> Painting:
    """Paint one photograph of `size` (width, height): fresh arrays, the caller keeps them."""
    return Painter(size).paint(rng, severity=severity, tone=tone)
