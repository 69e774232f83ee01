"""The per-process cache of SegGPT prompt pairs: decoded once, exact, never stale, bounded."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eczema_batch.catalogue.measurements import ImageRow
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging import decode_mask_png, decode_path, encode_mask_png
from eczema_batch.measuring.config import PROMPT_MAX_SIDE
from eczema_batch.measuring.prompts import PromptCache
from eczema_batch.pipeline.preprocess import nearest_exact

SIZE = (448, 448)


def _reference(tmp_path: Path, rid: int, *, width: int = 900, height: int = 600
               ) -> tuple[ImageRow, bytes]:
    rng = np.random.default_rng(rid)
    path = tmp_path / f"ref-{rid}.jpg"
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 5: height // 2, width // 3: width - 7] = True
    content = path.read_bytes()
    row = ImageRow(rid, 1, rid, tmp_path, path.name, width, height,
                   hashlib.sha256(content).hexdigest(), len(content))
    return row, encode_mask_png(mask)


def _pairs(cache: PromptCache, refs: list[tuple[ImageRow, bytes]]
           ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return cache.pairs([row for row, _ in refs], {row.id: png for row, png in refs},
                           input_size=SIZE, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, pool=pool)


def test_decoded_once_and_identical_to_a_fresh_decode(tmp_path: Path) -> None:
    refs = [_reference(tmp_path, rid) for rid in (1, 2, 3)]
    cache = PromptCache()
    first = _pairs(cache, refs)
    assert (cache.hits, cache.misses) == (0, 3)
    again = _pairs(cache, refs[:2])
    assert (cache.hits, cache.misses) == (2, 3)
    for row, png in refs:
        pixels, mask = first[row.id]
        fresh = decode_path(row.path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                            max_side=PROMPT_MAX_SIDE).pixels
        assert np.array_equal(pixels, fresh)
        # The segmenter samples the mask to its input size; sampling that again changes nothing.
        assert mask.shape == SIZE
        assert np.array_equal(mask, nearest_exact(decode_mask_png(png), SIZE))
        assert np.array_equal(nearest_exact(mask, SIZE), mask)
    assert again[1][0] is first[1][0]


def test_a_new_mask_for_the_same_image_is_decoded_again(tmp_path: Path) -> None:
    row, png = _reference(tmp_path, 1)
    cache = PromptCache()
    old_mask = _pairs(cache, [(row, png)])[1][1]
    redrawn = np.zeros((row.height, row.width), dtype=bool)
    redrawn[10:50, 10:50] = True
    new_mask = _pairs(cache, [(row, encode_mask_png(redrawn))])[1][1]
    assert cache.misses == 2
    assert not np.array_equal(old_mask, new_mask)
    assert np.array_equal(new_mask, nearest_exact(redrawn, SIZE))


def test_an_unreadable_reference_is_left_out_and_not_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, gone = _reference(tmp_path, 1), _reference(tmp_path, 2)
    gone[0].path.unlink()
    cache = PromptCache()
    with caplog.at_level(logging.WARNING):
        pairs = _pairs(cache, [good, gone])
    assert set(pairs) == {1} and len(cache) == 1
    assert "reference image 2 cannot be read" in caplog.text
    assert str(tmp_path) not in caplog.text  # ids in logs, never paths


def test_least_recently_used_pairs_leave_first_when_over_budget(tmp_path: Path) -> None:
    refs = [_reference(tmp_path, rid) for rid in (1, 2, 3)]
    cache = PromptCache()
    one = _pairs(cache, refs[:1])[1]
    cache = PromptCache(budget_bytes=2 * (one[0].nbytes + one[1].nbytes))
    _pairs(cache, refs[:2])
    _pairs(cache, refs[:1])  # 1 is now the most recently used
    _pairs(cache, refs[2:])  # 3 comes in, 2 goes out
    assert len(cache) == 2
    hits = cache.hits
    _pairs(cache, [refs[0], refs[2]])
    assert cache.hits == hits + 2
    _pairs(cache, [refs[1]])
    assert cache.misses == 4


def test_the_budget_is_each_workers_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from eczema_batch_workers.tasks import worker_overrides

    from eczema_batch.config import Settings
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.measuring.runtime import Runtime

    monkeypatch.setenv("ECZEMA_BATCH_PROMPT_CACHE_MB", "3")
    settings = Settings()
    assert worker_overrides(settings)["prompt_cache_mb"] == 3
    config = RunConfig.from_settings(settings)
    assert Runtime(config).prompts.budget == 3 * 2**20
    # A run planned elsewhere with another budget still uses this worker's.
    planned = RunConfig(**{**config.as_dict(), "prompt_cache_mb": 4096})
    assert RunConfig(**{**planned.as_dict(), **worker_overrides(settings)}).prompt_cache_mb == 3
