"""Image perturbations for the robustness check: what another camera or room does to a photograph.

Each perturbation takes uint8 RGB pixels and returns new ones; the input is left as it is. The
random one (noise) draws from a generator the caller seeds, so the same seed gives the same
bytes. Strength zero (blur 0, brightness gain 1, noise 0, white-balance shift 0) returns the
pixels unchanged: the robustness baseline and a zero perturbation then agree to the bit.
`PerturbedPixels` applies one to the images a `pipeline.measure` call segments and embeds, and
leaves the reference (prompt) images as they are.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageFilter

from eczema_batch.pipeline.preprocess import check_image

if TYPE_CHECKING:
    from eczema_batch.pipeline.records import Pixels
    from eczema_batch.pipeline.segment import PromptPair

Kind = Literal["blur", "brightness", "noise", "jpeg", "white_balance"]
KINDS: tuple[Kind, ...] = ("blur", "brightness", "noise", "jpeg", "white_balance")

#: what each kind's `value` means, for the report
PARAMETERS: dict[Kind, str] = {
    "blur": "Gaussian sigma as a share of the image's longer side",
    "brightness": "gain on every channel",
    "noise": "Gaussian sigma in grey levels (0-255), independent per pixel and channel",
    "jpeg": "Pillow JPEG quality of a re-compression",
    "white_balance": "von Kries shift t: red gain 1+t, blue gain 1-t (t > 0 warm, t < 0 cool)",
}


@dataclass(frozen=True)
class Perturbation:
    kind: Kind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}: use one of {KINDS}")
        if self.kind == "jpeg" and not 1 <= self.value <= 95:
            raise ValueError("JPEG quality must be in 1..95")
        if self.kind in ("blur", "noise", "brightness") and self.value < 0:
            raise ValueError(f"{self.kind} must be >= 0")
        if self.kind == "white_balance" and not -1 < self.value < 1:
            raise ValueError("white-balance shift must be in (-1, 1)")

    @property
    def name(self) -> str:
        """Self-explanatory, e.g. "blur sigma 1% of side", "jpeg q20", "white balance warm 0.2"."""
        if self.kind == "blur":
            return f"blur sigma {self.value * 100:g}% of side"
        if self.kind == "brightness":
            return f"brightness x{self.value:g}"
        if self.kind == "noise":
            return f"noise sigma {self.value:g}"
        if self.kind == "jpeg":
            return f"jpeg q{self.value:g}"
        tone = "warm" if self.value > 0 else "cool" if self.value < 0 else "neutral"
        return f"white balance {tone} {abs(self.value):g}"

    @property
    def neutral(self) -> bool:
        return self.kind != "jpeg" and self.value == (1.0 if self.kind == "brightness" else 0.0)

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = check_image(image)
        if self.neutral:
            return image.copy()
        if self.kind == "blur":
            return blur(image, self.value)
        if self.kind == "brightness":
            return _gains(image, (self.value, self.value, self.value))
        if self.kind == "noise":
            return noise(image, self.value, rng)
        if self.kind == "jpeg":
            return jpeg(image, int(self.value))
        return _gains(image, (1.0 + self.value, 1.0, 1.0 - self.value))


#: the robustness check's default set: 2-3 strengths of each kind
DEFAULT_PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("blur", 0.005), Perturbation("blur", 0.01), Perturbation("blur", 0.02),
    Perturbation("brightness", 0.6), Perturbation("brightness", 1.4),
    Perturbation("noise", 5.0), Perturbation("noise", 15.0), Perturbation("noise", 30.0),
    Perturbation("jpeg", 50), Perturbation("jpeg", 20), Perturbation("jpeg", 10),
    Perturbation("white_balance", 0.2), Perturbation("white_balance", -0.2),
)


def blur(image: np.ndarray, share: float) -> np.ndarray:
    """Gaussian blur with sigma = `share` x the longer side (Pillow's radius is the sigma):
    relative, so a decoded thumbnail and the full photograph lose the same detail."""
    sigma = share * max(image.shape[:2])
    return np.asarray(Image.fromarray(image, mode="RGB").filter(ImageFilter.GaussianBlur(sigma)))


def noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    out = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return _to_uint8(out)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _gains(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    # A diagonal (von Kries) gain on the sRGB values, clipped: what a wrong white balance or
    # exposure does to a JPEG, saturation included.
    return _to_uint8(image.astype(np.float32) * np.asarray(gains, dtype=np.float32))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + np.float32(0.5)), 0.0, 255.0).astype(np.uint8)


def image_rng(seed: int, image_id: int, perturbation: Perturbation) -> np.random.Generator:
    """One generator per (seed, image, perturbation): the draws do not depend on which other
    images or perturbations ran, or in which order."""
    tag = zlib.crc32(f"{perturbation.kind}:{perturbation.value!r}".encode())
    return np.random.default_rng([seed, image_id, tag])


class PerturbedPixels:
    """A `Pixels` source whose images come back perturbed; prompt pairs come back untouched
    (the references are the study's annotated images, not the photograph being re-taken)."""

    def __init__(self, inner: Pixels, perturbation: Perturbation | None, *, seed: int) -> None:
        self.inner, self.perturbation, self.seed = inner, perturbation, seed
        self._done: dict[int, np.ndarray] = {}

    def prefetch(self, image_ids: Iterable[int]) -> None:
        self.inner.prefetch(image_ids)

    def get(self, image_id: int) -> np.ndarray:
        if self.perturbation is None:
            return self.inner.get(image_id)
        if image_id not in self._done:
            self._done[image_id] = self.perturbation.apply(
                self.inner.get(image_id), image_rng(self.seed, image_id, self.perturbation))
        return self._done[image_id]

    def pairs(self, reference_ids: Sequence[int], input_size: tuple[int, int]
              ) -> dict[int, PromptPair]:
        return self.inner.pairs(reference_ids, input_size)
