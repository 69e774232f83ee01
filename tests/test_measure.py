"""`pipeline.measure`, the one composition of the method, with tiny models and no database.

The store and the pixel source are dictionaries here: the method reads and writes nothing itself,
so what it does with stored results, shared keys and unreadable images is visible directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

from eczema_batch.errors import RejectedFileError
from eczema_batch.imaging import encode_mask_png
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.embed import Embedder
from eczema_batch.pipeline.loading import load_embedder, load_segmenter
from eczema_batch.pipeline.measure import measure
from eczema_batch.pipeline.preprocess import nearest_exact
from eczema_batch.pipeline.records import (
    FLAG_NO_REFERENCES,
    Counts,
    Keyed,
    MaskKey,
    Measurement,
    Method,
    Query,
    References,
    StoredMask,
)
from eczema_batch.pipeline.segment import PromptPair, Segmenter
from tests._model_fixtures import tiny_model_dir_fixture  # noqa: F401

SIZE = (48, 64)  # (height, width)
SEGMENTER_ID = 7


class Models:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.loaded: list[str] = []

    @property
    def embedder(self) -> Embedder:
        self.loaded.append("embedder")
        return load_embedder("tiny-dino", model_dir=self.model_dir, device="cpu")

    @property
    def segmenter(self) -> Segmenter:
        self.loaded.append("segmenter")
        return load_segmenter("tiny-seggpt", model_dir=self.model_dir, device="cpu")


class DictStore:
    """What the catalogue would hold, filled by `keep` as a caller's save would."""

    def __init__(self) -> None:
        self.full: dict[int, np.ndarray] = {}
        self.crops: dict[Keyed, np.ndarray] = {}
        self.stored_masks: dict[Keyed, StoredMask] = {}

    def full_vectors(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
        return {i: self.full[i] for i in image_ids if i in self.full}

    def crop_vectors(self, keys: Sequence[Keyed]) -> dict[Keyed, np.ndarray]:
        return {k: self.crops[k] for k in keys if k in self.crops}

    def masks(self, keys: Sequence[Keyed]) -> dict[Keyed, StoredMask]:
        return {k: self.stored_masks[k] for k in keys if k in self.stored_masks}

    def keep(self, results: list[Measurement], new_full: dict[int, np.ndarray]) -> None:
        self.full.update(new_full)
        for m in results:
            k = (m.image_id, m.key)
            if m.new_mask is not None:
                self.stored_masks[k] = StoredMask(len(self.stored_masks) + 1,
                                                  encode_mask_png(m.new_mask.mask))
            if m.new_crop and m.crop is not None:
                self.crops[k] = m.crop


class DictPixels:
    def __init__(self, images: dict[int, np.ndarray], masks: dict[int, np.ndarray],
                 unreadable: Iterable[int] = ()) -> None:
        self.images, self.masks, self.unreadable = images, masks, set(unreadable)
        self.decoded: list[int] = []

    def prefetch(self, image_ids: Iterable[int]) -> None:
        pass

    def get(self, image_id: int) -> np.ndarray:
        if image_id in self.unreadable:
            raise RejectedFileError("the image file is gone from the study folder")
        self.decoded.append(image_id)
        return self.images[image_id]

    def pairs(self, reference_ids: Sequence[int], input_size: tuple[int, int]
              ) -> dict[int, PromptPair]:
        return {r: (self.images[r], nearest_exact(self.masks[r], input_size))
                for r in reference_ids if r not in self.unreadable}


@pytest.fixture
def world() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    images = {i: rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for i in range(1, 9)}
    masks = {}
    for i in (1, 2, 3):  # the references
        mask = np.zeros(SIZE, dtype=bool)
        mask[8 + i : 30 + i, 10:40] = True
        masks[i] = mask
    return images, masks


def _references(store: DictStore, models: Models, images: dict[int, np.ndarray]) -> References:
    ids = [1, 2, 3]
    vectors = models.embedder.embed([images[i] for i in ids])
    store.full.update(zip(ids, vectors, strict=True))
    return References(np.array(ids), vectors, np.array([101, 102, 103]))


def _method(mode: str = "seggpt", **extra: object) -> Method:
    return Method(mode=mode, segmenter_id=SEGMENTER_ID, k=2, batch_size=4,  # type: ignore[arg-type]
                  **extra)  # type: ignore[arg-type]


def test_the_method_composes_its_steps_and_reuses_what_is_stored(
    tiny_model_dir: Path, world: tuple[dict[int, np.ndarray], dict[int, np.ndarray]]
) -> None:
    images, masks = world
    models, store = Models(tiny_model_dir), DictStore()
    refs = _references(store, models, images)
    queries = [Query(i, 200 + i, SIZE, refs) for i in (4, 5, 6)]
    counts = Counts()
    results, new_full = measure(queries, _method(), models, store, DictPixels(images, masks),
                                counts=counts)
    assert set(new_full) == {4, 5, 6}
    embedder, segmenter = models.embedder, models.segmenter
    for q, m in zip(queries, results, strict=True):
        assert m.error is None and len(m.prompts) == 2
        assert m.key == MaskKey.seggpt(SEGMENTER_ID, m.prompts.ids)
        # The same steps by hand give the same crop embedding.
        pairs = [(images[p], masks[p]) for p in m.prompts.ids]
        mask = segmenter.segment([images[q.image_id]], [pairs], out_sizes=[SIZE])[0].mask
        assert m.new_mask is not None and np.array_equal(m.new_mask.mask, mask)
        crop = images[q.image_id] if not mask.any() else crop_to_mask(images[q.image_id],
                                                                       mask).pixels
        assert m.crop is not None
        np.testing.assert_allclose(m.crop, embedder.embed([crop])[0], rtol=1e-5, atol=1e-6)
    assert counts.segmenter_queries == 3 and counts.embedder_images == 6

    store.keep(results, new_full)
    models.loaded.clear()
    pixels = DictPixels(images, masks)
    again, new_full = measure(queries, _method(), models, store, pixels)
    assert models.loaded == [] and pixels.decoded == [] and new_full == {}
    assert [m.key for m in again] == [m.key for m in results]
    assert all(not m.new_crop and m.new_mask is None for m in again)


def test_queries_sharing_an_image_and_key_share_one_computation(
    tiny_model_dir: Path, world: tuple[dict[int, np.ndarray], dict[int, np.ndarray]]
) -> None:
    images, masks = world
    models, store = Models(tiny_model_dir), DictStore()
    refs = _references(store, models, images)
    counts = Counts()
    # Image 4 in two folds with the same references, and in a third with only one of them.
    queries = [Query(4, 204, SIZE, refs), Query(4, 204, SIZE, refs),
               Query(4, 204, SIZE, refs.where(np.array([True, False, False])))]
    results, _ = measure(queries, _method(), models, store, DictPixels(images, masks),
                         counts=counts)
    assert results[0].key == results[1].key != results[2].key
    assert results[2].prompts.ids == (1,)
    assert counts.segmenter_queries == 2
    assert results[0].new_crop and not results[1].new_crop and results[1].new_mask is None
    np.testing.assert_array_equal(results[0].crop, results[1].crop)


def test_an_unreadable_image_fails_alone_and_own_patients_are_left_out_when_asked(
    tiny_model_dir: Path, world: tuple[dict[int, np.ndarray], dict[int, np.ndarray]]
) -> None:
    images, masks = world
    models, store = Models(tiny_model_dir), DictStore()
    refs = _references(store, models, images)
    # Image 5 belongs to the patient of reference 1.
    queries = [Query(4, 204, SIZE, refs), Query(5, 101, SIZE, refs)]
    results, _ = measure(queries, _method(exclude_own_patient=True), models, store,
                         DictPixels(images, masks, unreadable=[4]))
    assert results[0].error is not None and "gone" in results[0].error
    assert results[1].error is None and 1 not in results[1].prompts.ids


def test_modes_none_and_manual_and_a_study_without_references(
    tiny_model_dir: Path, world: tuple[dict[int, np.ndarray], dict[int, np.ndarray]]
) -> None:
    images, masks = world
    models, store = Models(tiny_model_dir), DictStore()
    refs = _references(store, models, images)
    none, new_full = measure([Query(4, 204, SIZE, refs)], _method("none"), models, store,
                             DictPixels(images, masks))
    assert none[0].key == MaskKey("none") and new_full == {}  # no retrieval, no segmentation
    assert "segmenter" not in models.loaded
    manual = StoredMask(11, encode_mask_png(masks[2]))
    both, _ = measure([Query(2, 102, SIZE, refs, manual), Query(4, 204, SIZE, refs)],
                      _method("manual"), models, store, DictPixels(images, masks))
    assert both[0].key == MaskKey("manual") and both[0].mask_id == 11
    assert both[1].key.source == "seggpt"
    lonely, _ = measure([Query(6, 206, SIZE, None)], _method(), models, store,
                        DictPixels(images, masks))
    assert lonely[0].key == MaskKey.seggpt(SEGMENTER_ID, ())
    assert lonely[0].new_mask is not None and lonely[0].new_mask.flag == FLAG_NO_REFERENCES
    assert lonely[0].crop is not None
    np.testing.assert_allclose(lonely[0].crop, models.embedder.embed([images[6]])[0],
                               rtol=1e-5, atol=1e-6)
