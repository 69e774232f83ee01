"""The image-quality gate: what its measures read on synthetic photographs and on copies of them
made bad on purpose (the README's calibration table), and what they cost beside ingest's check.

For each size a synthetic study is written; every photograph is decoded in full, made bad in the
ways the gate looks for (blur, exposure, white balance), encoded again as a JPEG (quality 95) and
measured as ingest measures it: `check_bytes(..., sample_side=SAMPLE_SIDE)`, then `measure`.
Prints, per set, each measure's range (median) and how many copies the default thresholds flag.

Cost, over the study's own files (JPEG, PNG and DICOM as written): ingest's check without a sample
(the code before the gate) is the baseline; then the check with the sample, and with the measures
too, each as a ratio to it (the best of 7 passes).

    python -m bench.quality [--patients 7] [--sizes 320x240,1024x768]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from eczema_batch.imaging import check_bytes, decode_bytes
from eczema_batch.imaging.quality import (
    SAMPLE_SIDE,
    QualityMeasures,
    QualityThresholds,
    flag_reasons,
    measure,
)
from eczema_batch.ingest.scan import scan_study
from eczema_batch.synth import write_synthetic_study

MAX_PIXELS = 200_000_000
Damage = Callable[[NDArray[np.uint8]], NDArray[np.uint8]]


def _blur(radius: float) -> Damage:
    return lambda rgb: np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def _levels(gains: tuple[float, float, float], offset: float = 0.0) -> Damage:
    def damage(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        out = rgb.astype(np.float32) * np.asarray(gains, dtype=np.float32) + offset
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return damage


SETS: dict[str, Damage] = {
    "synthetic photographs": lambda rgb: rgb,
    "Gaussian blur, radius 3 px": _blur(3),
    "Gaussian blur, radius 1.5 px": _blur(1.5),
    "dark (x0.15)": _levels((0.15, 0.15, 0.15)),
    "overexposed (+140 levels)": _levels((1.0, 1.0, 1.0), 140),
    "blue white balance": _levels((0.7, 0.85, 1.3)),
    "green white balance": _levels((0.75, 1.2, 0.8)),
    "magenta white balance": _levels((1.15, 0.7, 1.3)),
    "warm white balance (R x1.15, B x0.8)": _levels((1.15, 1.0, 0.8)),
}


def _measured(rgb: NDArray[np.uint8]) -> QualityMeasures:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    sample = check_bytes(out.getvalue(), max_pixels=MAX_PIXELS, sample_side=SAMPLE_SIDE).sample
    assert sample is not None
    return measure(sample)


def _span(values: list[float], digits: int) -> str:
    return (f"{min(values):.{digits}f}-{max(values):.{digits}f} "
            f"(median {float(np.median(values)):.{digits}f})")


def calibration(photos: list[NDArray[np.uint8]]) -> None:
    thresholds = QualityThresholds()
    print(f"{'set':38s} {'sharpness':>28s} {'luminance':>24s} {'cast':>24s}  flagged")
    for name, damage in SETS.items():
        measures = [_measured(damage(rgb)) for rgb in photos]
        flagged = sum(bool(flag_reasons(m, thresholds)) for m in measures)
        print(f"{name:38s} {_span([m.sharpness for m in measures], 1):>28s} "
              f"{_span([m.luminance for m in measures], 2):>24s} "
              f"{_span([m.cast for m in measures], 1):>24s}  {flagged} of {len(measures)}")


def _best(call: Callable[[], object], repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def cost(files: list[bytes]) -> None:
    def check() -> None:
        for data in files:
            check_bytes(data, max_pixels=MAX_PIXELS)

    def sampled() -> None:
        for data in files:
            check_bytes(data, max_pixels=MAX_PIXELS, sample_side=SAMPLE_SIDE)

    def measured() -> None:
        for data in files:
            sample = check_bytes(data, max_pixels=MAX_PIXELS, sample_side=SAMPLE_SIDE).sample
            if sample is not None:
                measure(sample)

    base = _best(check)
    per_file = 1e3 / len(files)
    print(f"check without a sample (baseline): {base * per_file:6.2f} ms a file")
    for name, call in (("check with the sample", sampled),
                       ("check, sample and measures", measured)):
        took = _best(call)
        print(f"{name:34s} {took * per_file:6.2f} ms a file  ratio {took / base:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=7)
    parser.add_argument("--sizes", default="320x240,1024x768")
    args = parser.parse_args()
    photos: list[NDArray[np.uint8]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            root = Path(tmp) / size
            write_synthetic_study(root, patients=args.patients, visits=5, seed=1,
                                  size=(width, height), workers=2)
            files = [path.read_bytes() for path in sorted(scan_study(root).images.values())]
            print(f"--- {size}: {len(files)} files, measured at {SAMPLE_SIDE} px at most")
            cost(files)
            photos += [decode_bytes(data, max_pixels=MAX_PIXELS).pixels for data in files]
    print(f"--- calibration: {len(photos)} photographs, every size")
    calibration(photos)


if __name__ == "__main__":
    main()
