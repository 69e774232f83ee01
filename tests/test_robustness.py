"""`evaluate --robustness`: the perturbations on hand-built images."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from eczema_batch.pipeline.perturb import (
    DEFAULT_PERTURBATIONS,
    KINDS,
    Perturbation,
    PerturbedPixels,
    image_rng,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _textured(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Mid-range values (no clipping at x1.4) with fine detail: a checkerboard plus noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(size)
    board = ((rows + cols) % 2 * 60 + 60).astype(np.float64)
    image = board[..., None] + rng.uniform(0, 40, (*size, 3))
    image[..., 0] += 20  # a skin-like cast: red above blue
    return image.round().astype(np.uint8)


def _high_frequency(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean())


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- the perturbations --------------------------------------------------------------------------


def test_blur_lowers_high_frequency_energy_more_as_sigma_grows() -> None:
    image = _textured()
    energies = [_high_frequency(Perturbation("blur", s).apply(image, _rng()))
                for s in (0.0, 0.005, 0.01, 0.02)]
    assert energies[0] == _high_frequency(image)
    assert energies[0] > energies[1] > energies[2] > energies[3]
    assert energies[3] < 0.2 * energies[0]


@pytest.mark.parametrize("gain", [0.6, 1.4])
def test_brightness_scales_the_mean(gain: float) -> None:
    image = _textured()
    out = Perturbation("brightness", gain).apply(image, _rng())
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.mean() == pytest.approx(gain * image.mean(), abs=0.5)


def test_noise_has_its_sigma_and_is_seeded() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    noise = Perturbation("noise", 15.0)
    out = noise.apply(image, image_rng(0, 7, noise))
    assert (out.astype(np.float64) - 128).std() == pytest.approx(15.0, rel=0.05)
    assert np.array_equal(out, noise.apply(image, image_rng(0, 7, noise)))
    assert not np.array_equal(out, noise.apply(image, image_rng(1, 7, noise)))
    assert not np.array_equal(out, noise.apply(image, image_rng(0, 8, noise)))


def test_jpeg_recompression_changes_pixels_more_at_lower_quality() -> None:
    image = _textured()
    errors = [np.abs(Perturbation("jpeg", q).apply(image, _rng()).astype(np.int64)
                     - image).mean() for q in (50, 20, 10)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_white_balance_changes_the_red_to_blue_ratio() -> None:
    image = _textured()

    def ratio(a: np.ndarray) -> float:
        return float(a[..., 0].astype(np.float64).mean() / a[..., 2].astype(np.float64).mean())

    warm = Perturbation("white_balance", 0.2).apply(image, _rng())
    cool = Perturbation("white_balance", -0.2).apply(image, _rng())
    assert ratio(warm) == pytest.approx(ratio(image) * 1.2 / 0.8, rel=0.01)
    assert ratio(cool) == pytest.approx(ratio(image) * 0.8 / 1.2, rel=0.01)
    assert np.array_equal(warm[..., 1], image[..., 1])  # green, the von Kries anchor


def test_zero_strength_is_the_identity_and_inputs_are_left_alone() -> None:
    image = _textured()
    kept = image.copy()
    for p in (Perturbation("blur", 0), Perturbation("brightness", 1.0),
              Perturbation("noise", 0), Perturbation("white_balance", 0)):
        assert p.neutral
        assert np.array_equal(p.apply(image, _rng()), image)
    for p in DEFAULT_PERTURBATIONS:
        assert not p.neutral
        assert not np.array_equal(p.apply(image, image_rng(0, 1, p)), image), p.name
    assert np.array_equal(image, kept)


def test_the_default_set_names_every_kind_at_two_strengths_or_more() -> None:
    names = [p.name for p in DEFAULT_PERTURBATIONS]
    assert len(set(names)) == len(names)
    for kind in KINDS:
        assert sum(p.kind == kind for p in DEFAULT_PERTURBATIONS) >= 2
    assert "jpeg q10" in names and "blur sigma 1% of side" in names
    with pytest.raises(ValueError):
        Perturbation("jpeg", 0)
    with pytest.raises(ValueError):
        Perturbation("contrast", 1.0)  # type: ignore[arg-type]


class _Source:
    """Pixels of two images and one prompt pair, counting what was asked."""

    def __init__(self) -> None:
        self.images = {1: _textured(1), 2: _textured(2)}
        self.pair = object()

    def prefetch(self, image_ids: object) -> None:
        pass

    def get(self, image_id: int) -> np.ndarray:
        return self.images[image_id]

    def pairs(self, reference_ids: list[int], input_size: tuple[int, int]) -> dict[int, object]:
        return dict.fromkeys(reference_ids, self.pair)


def test_perturbed_pixels_change_the_query_not_the_prompts() -> None:
    source = _Source()
    noise = Perturbation("noise", 10.0)
    pixels = PerturbedPixels(source, noise, seed=3)  # type: ignore[arg-type]
    got = pixels.get(1)
    assert not np.array_equal(got, source.images[1])
    assert np.array_equal(got, PerturbedPixels(source, noise, seed=3).get(1))  # type: ignore[arg-type]
    assert pixels.pairs([5], (8, 8))[5] is source.pair
    plain = PerturbedPixels(source, None, seed=3)  # type: ignore[arg-type]
    assert plain.get(2) is source.images[2]
