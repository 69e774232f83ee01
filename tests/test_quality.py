"""The image-quality measures on hand-built pictures, and the thresholds that judge them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from eczema_batch.config import Settings, get_settings
from eczema_batch.imaging import check_bytes
from eczema_batch.imaging.camera import MAX_DEVICE, camera_name
from eczema_batch.imaging.quality import (
    METHOD,
    SAMPLE_SIDE,
    QualityThresholds,
    flag_reasons,
    measure,
    quality_record,
    thresholds_from,
)

#: Two skin tones (sRGB): what a close-up of a forearm is made of.
SKIN = ((205, 150, 128), (175, 122, 100))


def skin_checkerboard(size: int = 256, square: int = 8) -> NDArray[np.uint8]:
    """Sharp edges everywhere, in skin colours."""
    yy, xx = np.indices((size, size))
    pick = ((yy // square + xx // square) % 2).astype(bool)
    return np.where(pick[..., None], np.uint8(SKIN[0]), np.uint8(SKIN[1])).astype(np.uint8)


def blurred(rgb: NDArray[np.uint8], radius: float) -> NDArray[np.uint8]:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def scaled(rgb: NDArray[np.uint8], gains: tuple[float, float, float], offset: float = 0.0
           ) -> NDArray[np.uint8]:
    out = rgb.astype(np.float32) * np.asarray(gains, dtype=np.float32) + offset
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def reasons(rgb: NDArray[np.uint8]) -> list[str]:
    return flag_reasons(measure(rgb), QualityThresholds())


def test_a_sharp_skin_picture_passes() -> None:
    assert reasons(skin_checkerboard()) == []


def test_a_blurred_copy_is_flagged_as_blurred() -> None:
    sharp, soft = measure(skin_checkerboard()), measure(blurred(skin_checkerboard(), 4))
    assert soft.sharpness < QualityThresholds().min_sharpness < sharp.sharpness
    [reason] = flag_reasons(soft, QualityThresholds())
    assert reason.startswith("blurred (Laplacian variance ") and reason.endswith(" < 3)")


def test_a_dark_picture_is_underexposed_and_a_bright_one_overexposed() -> None:
    dark = measure(scaled(skin_checkerboard(), (0.12, 0.12, 0.12)))
    assert dark.luminance < 0.15
    assert f"underexposed (mean luminance {dark.luminance:.2f} < 0.15)" in flag_reasons(
        dark, QualityThresholds())
    bright = reasons(scaled(skin_checkerboard(), (1.0, 1.0, 1.0), offset=120))
    assert any(r.startswith("overexposed (mean luminance ") for r in bright)
    assert any(r.startswith("highlights clipped (") for r in bright)


def test_black_pixels_count_as_clipped_shadows() -> None:
    rgb = skin_checkerboard()
    rgb[: rgb.shape[0] // 2] = 0  # half the frame black: a flash that did not fire on that side
    measures = measure(rgb)
    # the measures read evenly spread strips of rows, a quarter of the picture
    assert measures.dark_share == pytest.approx(0.5, abs=0.05)
    assert f"shadows clipped ({measures.dark_share:.0%} of pixels black > 25%)" in flag_reasons(
        measures, QualityThresholds())


@pytest.mark.parametrize(("gains", "name"), [
    # each gain turns both skin tones of the picture to that hue (a median between two tones
    # at the blue-magenta border could be named either)
    ((0.7, 0.9, 1.4), "blue"), ((0.75, 1.2, 0.8), "green"), ((1.15, 0.7, 1.3), "magenta"),
])
def test_a_strong_white_balance_error_is_a_colour_cast(
    gains: tuple[float, float, float], name: str
) -> None:
    [reason] = reasons(scaled(skin_checkerboard(), gains))
    assert reason.startswith(f"{name} colour cast (median a* ")


def test_skin_under_warm_light_and_a_blue_drape_at_the_edge_pass() -> None:
    # A warm light cannot be told from redder skin, and a drape is not the light's colour.
    assert reasons(scaled(skin_checkerboard(), (1.1, 1.0, 0.85))) == []
    draped = skin_checkerboard()
    draped[:, :24] = (70, 110, 160)  # a tenth of the frame
    assert reasons(draped) == []


def test_the_record_keeps_measures_and_thresholds_and_the_flag_says_why() -> None:
    doc, flag = quality_record(measure(blurred(skin_checkerboard(), 4)), QualityThresholds())
    assert doc["method"] == METHOD and doc["side"] == SAMPLE_SIDE
    assert doc["thresholds"] == QualityThresholds().as_dict()
    assert set(doc) >= {"sharpness", "luminance", "dark_share", "bright_share", "cast"}
    assert flag is not None and flag.startswith("blurred")
    assert quality_record(measure(skin_checkerboard()), QualityThresholds())[1] is None


def test_settings_defaults_are_the_dataclass_defaults_and_the_environment_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert thresholds_from(Settings()) == QualityThresholds()
    monkeypatch.setenv("ECZEMA_BATCH_QUALITY_MIN_SHARPNESS", "5000")
    monkeypatch.setenv("ECZEMA_BATCH_QUALITY_MAX_CAST", "50")
    get_settings.cache_clear()
    try:
        thresholds = thresholds_from(get_settings())
    finally:
        get_settings.cache_clear()
    assert (thresholds.min_sharpness, thresholds.max_cast) == (5000.0, 50.0)
    assert flag_reasons(measure(skin_checkerboard()), thresholds)[0].startswith("blurred")


def _jpeg(rgb: NDArray[np.uint8], exif: Image.Exif | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=92, exif=exif or Image.Exif())
    return out.getvalue()


def test_check_bytes_keeps_a_sample_of_at_most_512_px_and_the_exif_camera() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Canon\x00 "
    exif[0x0110] = "Canon EOS R5"
    big = np.asarray(Image.fromarray(skin_checkerboard(256)).resize((1600, 1200)))
    info = check_bytes(_jpeg(big, exif), max_pixels=10**8, sample_side=SAMPLE_SIDE)
    assert (info.width, info.height, info.device) == (1600, 1200, "Canon EOS R5")
    assert info.sample is not None and max(info.sample.shape[:2]) == SAMPLE_SIDE
    plain = check_bytes(_jpeg(skin_checkerboard()), max_pixels=10**8)
    assert plain.device is None and plain.sample is None


def test_camera_names_are_cleaned_and_capped() -> None:
    assert camera_name("Apple", "iPhone 15 Pro") == "Apple iPhone 15 Pro"
    assert camera_name("NIKON CORPORATION", "NIKON D750") == "NIKON D750"
    assert camera_name("  FotoFinder\x1b[2J ", None) == "FotoFinder [2J"
    assert camera_name(b"", "  ") is None and camera_name(None, None) is None
    assert len(camera_name("M" * 100, "X" * 100) or "") == MAX_DEVICE


def test_a_png_gets_a_sample_too() -> None:
    out = io.BytesIO()
    Image.fromarray(skin_checkerboard(600)).save(out, format="PNG")
    info = check_bytes(out.getvalue(), max_pixels=10**8, sample_side=SAMPLE_SIDE)
    assert info.sample is not None and info.sample.shape == (SAMPLE_SIDE, SAMPLE_SIDE, 3)
    assert reasons(np.asarray(info.sample)) == []
