"""The batched compute path against the plain transformers path, and the array-only steps.

Tolerances (tiny models, CPU, fp32):
- embeddings: cosine >= 0.9999 and max |diff| <= 0.01 per image (measured: cosine >= 0.9999999,
  max |diff| 0.0011 on features of RMS 1). The only source is the resize: ours runs in torch and
  matches PIL's uint8 output within one grey level (preprocess.py); the model math is the same.
- masks: IoU >= 0.99 per query (measured: 1.0, 1.0, 0.9932, 1.0 here; over 30 random queries
  min 0.993 and 29 identical), for K = 1, 2, 3 in one batch, queries of different sizes, output
  sizes larger than the pixels, both attention implementations. The few differing pixels are
  ones the resize's one-grey-level differences push across the palette decision boundary.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.loading import load_embedder, load_segmenter
from eczema_batch.pipeline.preprocess import nearest_exact, resize_like_pil
from eczema_batch.pipeline.reference import reference_embed, reference_segment
from eczema_batch.pipeline.registry import IMAGENET_MEAN, IMAGENET_STD
from eczema_batch.pipeline.retrieve import PromptSet, select_prompts
from eczema_batch.pipeline.segment import (
    Segmenter,
    decomposed_sdpa,
    pred_to_foreground,
    upsample_nearest,
)
from tests._model_fixtures import tiny_model_dir_fixture  # noqa: F401

EMBED_MIN_COSINE = 0.9999
EMBED_MAX_ABS = 0.01
MASK_MIN_IOU = 0.99


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured uint8 RGB image: like skin under a lens, unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        128 + 100 * np.sin(x / (5 + c + seed % 3) + c) * np.cos(y / (7 + c) - c) for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 15, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def ellipse(height: int, width: int, shrink: float = 3.0) -> np.ndarray:
    """A bool mask: a centred ellipse with semi-axes size / shrink."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x - width / 2) / (width / shrink)) ** 2 + (
        (y - height / 2) / (height / shrink)
    ) ** 2 < 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --- embed -------------------------------------------------------------------------------------


def test_batched_embeddings_match_the_reference(tiny_model_dir: Path) -> None:
    embedder = load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu")
    images = [
        photo(40, 60, 1),
        photo(100, 70, 2),
        photo(32, 32, 3),
        photo(300, 200, 4),
        photo(17, 90, 5),
    ]
    vectors = embedder.embed(images, batch_size=3)
    assert vectors.shape == (5, embedder.dim) and vectors.dtype == np.float32
    for vector, image in zip(vectors, images, strict=True):
        expected = reference_embed(tiny_model_dir / "tiny-dino", image)
        cosine = vector @ expected / np.linalg.norm(vector) / np.linalg.norm(expected)
        assert cosine >= EMBED_MIN_COSINE
        assert np.abs(vector - expected).max() <= EMBED_MAX_ABS
    # No resize at the model's own size: the same numbers.
    exact = reference_embed(tiny_model_dir / "tiny-dino", images[2])
    np.testing.assert_allclose(vectors[2], exact, atol=1e-5)
    # The batch does not change the answer.
    np.testing.assert_allclose(embedder.embed(images, batch_size=1), vectors, atol=1e-5)


def test_embedding_nothing_gives_an_empty_matrix(tiny_model_dir: Path) -> None:
    embedder = load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu")
    assert embedder.embed([]).shape == (0, 32)


# --- segment -----------------------------------------------------------------------------------


def _segmentation_case() -> tuple[
    list[np.ndarray], list[list[tuple[np.ndarray, np.ndarray]]], list[tuple[int, int]]
]:
    queries = [photo(40, 50, 10), photo(64, 64, 11), photo(30, 45, 12), photo(50, 70, 13)]
    prompts = [
        [(photo(50, 50, 20), ellipse(50, 50))],
        [(photo(60, 40, 21), ellipse(60, 40, 2.5)), (photo(33, 47, 22), ellipse(66, 94, 4))],
        [
            (photo(20, 20, 23), ellipse(20, 20)),
            (photo(80, 60, 24), ellipse(80, 60, 2)),
            (photo(48, 48, 25), ellipse(48, 48, 5)),
        ],
        [(photo(40, 40, 26), ellipse(40, 40, 2)), (photo(70, 50, 27), ellipse(70, 50, 4))],
    ]
    # Full sizes larger than the decoded pixels (reduced-scale decoding), one at pixel size.
    out_sizes = [(80, 100), (64, 64), (123, 77), (200, 280)]
    return queries, prompts, out_sizes


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_masks_match_the_reference(tiny_model_dir: Path, attention: str) -> None:
    segmenter = load_segmenter(
        "tiny-seggpt",
        model_dir=tiny_model_dir,
        device="cpu",
        attention=attention,  # type: ignore[arg-type]
    )
    queries, prompts, out_sizes = _segmentation_case()
    # batch_size 5: [K=1, K=2] then [K=3] then [K=2]: groups of different K share a forward pass.
    results = segmenter.segment(queries, prompts, out_sizes=out_sizes, batch_size=5)
    for result, query, pairs, size in zip(results, queries, prompts, out_sizes, strict=True):
        expected = reference_segment(tiny_model_dir / "tiny-seggpt", query, pairs, size)
        assert result.mask.shape == size and result.mask.dtype == bool
        assert iou(result.mask, expected) >= MASK_MIN_IOU
        assert result.area_fraction == pytest.approx(result.mask.mean())
        assert 0.05 < result.area_fraction < 0.95  # the tiny model's masks are not trivial


def test_reduced_precision_runs_the_autocast_path(tiny_model_dir: Path) -> None:
    """bf16 autocast on CPU: the code path CUDA takes by default (measured IoU >= 0.986)."""
    segmenter = load_segmenter(
        "tiny-seggpt", model_dir=tiny_model_dir, device="cpu", precision="bf16"
    )
    assert segmenter.identity.config["precision"] == "bf16"
    queries, prompts, out_sizes = _segmentation_case()
    results = segmenter.segment(queries, prompts, out_sizes=out_sizes)
    for result, query, pairs, size in zip(results, queries, prompts, out_sizes, strict=True):
        expected = reference_segment(tiny_model_dir / "tiny-seggpt", query, pairs, size)
        assert iou(result.mask, expected) >= 0.95
    embedder = load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu", precision="bf16")
    image = photo(60, 40, 8)
    vector = embedder.embed([image])[0]
    expected_vector = reference_embed(tiny_model_dir / "tiny-dino", image)
    assert (
        vector @ expected_vector / np.linalg.norm(vector) / np.linalg.norm(expected_vector) > 0.999
    )


def test_folded_relative_positions_equal_the_eager_attention(tiny_model_dir: Path) -> None:
    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    hidden = torch.randn(3, 8, 4, 32, generator=torch.Generator().manual_seed(1))
    for layer in segmenter.model.model.encoder.layers:
        with torch.inference_mode():
            expected = layer.attention(hidden)[0]
            ours = decomposed_sdpa(layer.attention, hidden)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_each_query_keeps_its_own_feature_ensemble(tiny_model_dir: Path) -> None:
    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    queries, prompts, _ = _segmentation_case()
    pair = [1, 3]  # two K=2 queries
    together = segmenter.segment([queries[i] for i in pair], [prompts[i] for i in pair])
    for result, index in zip(together, pair, strict=True):
        alone = segmenter.segment([queries[index]], [prompts[index]])[0]
        np.testing.assert_array_equal(result.mask, alone.mask)


def test_default_output_size_is_the_query_size(tiny_model_dir: Path) -> None:
    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    query = photo(37, 41, 30)
    result = segmenter.segment([query], [[(photo(30, 30, 31), ellipse(30, 30))]])[0]
    assert result.mask.shape == (37, 41)


def test_a_query_without_prompts_is_refused(tiny_model_dir: Path) -> None:
    segmenter: Segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    with pytest.raises(UsageError, match="no prompt pairs"):
        segmenter.segment([photo(20, 20)], [[]])


def test_mask_decision_is_the_processors_palette_argmin() -> None:
    from transformers import SegGptImageProcessorPil

    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 3, 16, 8, generator=generator) * 2
    sizes = [(8, 8), (19, 13), (5, 3)]
    expected = SegGptImageProcessorPil().post_process_semantic_segmentation(
        SimpleNamespace(pred_masks=pred), target_sizes=sizes, num_labels=1
    )
    ours = pred_to_foreground(pred, IMAGENET_MEAN, IMAGENET_STD).numpy()
    for small, size, labels in zip(ours, sizes, expected, strict=True):
        np.testing.assert_array_equal(upsample_nearest(small, size), labels.numpy().astype(bool))


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((16, 16), (448, 448)),
        ((16, 16), (3000, 4000)),
        ((7, 9), (50, 23)),
        ((448, 448), (123, 1001)),
    ],
)
def test_mask_upsampling_is_torch_nearest(src: tuple[int, int], dst: tuple[int, int]) -> None:
    mask = np.random.default_rng(0).random(src) > 0.5
    expected = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=dst, mode="nearest")
    np.testing.assert_array_equal(upsample_nearest(mask, dst), expected[0, 0].numpy() > 0.5)


# --- preprocess ---------------------------------------------------------------------------------


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("height", "width", "size"), [(300, 450, 224), (100, 80, 224), (640, 480, 448), (37, 53, 16)]
)
def test_resize_matches_pil_within_a_grey_level(
    resample: str, height: int, width: int, size: int
) -> None:
    image = photo(height, width, 7)
    pil_filter = Image.Resampling.BILINEAR if resample == "bilinear" else Image.Resampling.BICUBIC
    expected = np.asarray(Image.fromarray(image).resize((size, size), pil_filter), dtype=np.int16)
    uint8 = torch.from_numpy(image).permute(2, 0, 1)[None]
    # float32 is the CUDA path, channels-last uint8 the CPU path
    for pixels in (uint8.float(), uint8.contiguous(memory_format=torch.channels_last)):
        ours = resize_like_pil(pixels, (size, size), resample)  # type: ignore[arg-type]
        difference = np.abs(ours[0].permute(1, 2, 0).numpy().astype(np.int16) - expected)
        assert difference.max() <= (1 if resample == "bilinear" else 2)
        assert (difference > 0).mean() < 0.05  # measured <= 1.5 % (PIL's fixed-point weights)


@pytest.mark.parametrize(
    ("height", "width", "size"), [(300, 450, 16), (100, 80, 448), (37, 53, 16)]
)
def test_prompt_masks_are_resized_like_pil_nearest(height: int, width: int, size: int) -> None:
    mask = np.random.default_rng(0).random((height, width)) > 0.5
    painted = Image.fromarray(mask.astype(np.uint8) * 255)
    expected = np.asarray(painted.resize((size, size), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(nearest_exact(mask, (size, size)), expected)
    as_torch = F.interpolate(
        torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest-exact"
    )
    np.testing.assert_array_equal(nearest_exact(mask, (size, size)), as_torch[0, 0].numpy() > 0)


# --- retrieve -----------------------------------------------------------------------------------


def test_prompts_are_the_nearest_others_of_other_patients() -> None:
    references = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.7, 0.7]], dtype=np.float32)
    queries = np.array([[1, 0], [0.1, 1]], dtype=np.float32)
    result = select_prompts(
        queries,
        references,
        query_ids=[10, 99],
        reference_ids=[10, 11, 12, 13],
        k=2,
    )
    assert result[0].ids == (11, 13)  # never itself (id 10)
    assert result[0].similarities[0] > result[0].similarities[1]
    assert result[1].ids == (12, 13)
    grouped = select_prompts(
        queries,
        references,
        query_ids=[10, 99],
        reference_ids=[10, 11, 12, 13],
        k=2,
        query_groups=["P1", "P2"],
        reference_groups=["P1", "P1", "P2", "P3"],
    )
    assert grouped[0].ids == (13, 12)  # 11 is the same patient
    assert grouped[1].ids == (13, 11)  # 12 is the same patient


def test_prompt_ties_break_by_id_and_short_lists_are_fine() -> None:
    references = np.ones((4, 3), dtype=np.float32)
    query = np.ones((1, 3), dtype=np.float32)
    result = select_prompts(query, references, query_ids=[0], reference_ids=[7, 3, 5, 1], k=3)
    assert result[0].ids == (1, 3, 5)
    assert result[0].similarities == pytest.approx((1.0, 1.0, 1.0))
    few = select_prompts(query, references[:1], query_ids=[0], reference_ids=[7], k=2)
    assert few[0].ids == (7,)
    none = select_prompts(query, references[:1], query_ids=[7], reference_ids=[7], k=2)
    assert none[0] == PromptSet() and len(none[0]) == 0


def test_prompt_inputs_are_checked() -> None:
    vectors = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="both"):
        select_prompts(
            vectors, vectors, query_ids=[1, 2], reference_ids=[3, 4], query_groups=["a", "b"]
        )
    with pytest.raises(ValueError, match="unique"):
        select_prompts(vectors, vectors, query_ids=[1, 2], reference_ids=[3, 3])


# --- crop ---------------------------------------------------------------------------------------


def test_crop_is_the_mask_box_with_the_background_zeroed() -> None:
    image = np.full((10, 12, 3), 200, dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:8] = True
    mask[4, 3] = False
    crop = crop_to_mask(image, mask)
    assert crop.box == (3, 2, 8, 5) and not crop.empty
    assert crop.pixels.shape == (3, 5, 3)
    assert (crop.pixels[2, 0] == 0).all() and (crop.pixels[0, 0] == 200).all()


def test_crop_scales_a_full_size_mask_to_reduced_pixels() -> None:
    image = np.full((50, 60, 3), 100, dtype=np.uint8)  # decoded at 1/4 of 200 x 240
    mask = np.zeros((200, 240), dtype=bool)
    mask[40:120, 80:200] = True
    crop = crop_to_mask(image, mask)
    assert crop.box == (80, 40, 200, 120)  # full-size coordinates
    assert crop.pixels.shape == (20, 30, 3)  # rows 10:30, columns 20:50 of the pixels
    assert (crop.pixels == 100).all()


@pytest.mark.parametrize("scale", [1, 3])
def test_crop_keeps_exactly_the_pixels_whose_centre_is_on_the_mask(scale: int) -> None:
    rng = np.random.default_rng(scale)
    image = rng.integers(1, 255, (40, 52, 3), dtype=np.uint8)
    mask = rng.random((40 * scale, 52 * scale)) < 0.4  # irregular, like SegGPT's output
    mask[:5] = False
    crop = crop_to_mask(image, mask)
    left, top, right, bottom = crop.box
    expected = []
    for y in range(top // scale, -(-bottom // scale)):
        expected.append([image[y, x] if mask[int((y + 0.5) * scale), int((x + 0.5) * scale)]
                         else np.zeros(3, np.uint8)
                         for x in range(left // scale, -(-right // scale))])
    np.testing.assert_array_equal(crop.pixels, np.array(expected, dtype=np.uint8))
    assert crop.pixels.flags["C_CONTIGUOUS"] and crop.pixels.flags["WRITEABLE"]


def test_an_empty_mask_falls_back_to_the_whole_image() -> None:
    image = photo(20, 30)
    crop = crop_to_mask(image, np.zeros((80, 120), dtype=bool))
    assert crop.empty and crop.box == (0, 0, 120, 80)
    np.testing.assert_array_equal(crop.pixels, image)


# --- out of device memory ----------------------------------------------------------------------


def _fits(limit: int, original: Any) -> Any:
    """A batch method that runs out of memory above `limit` items, recording the sizes tried."""
    tried: list[int] = []

    def batch(items: Any, *args: Any) -> Any:
        tried.append(len(items) if not args else sum(len(p) for p in args[0]))
        if tried[-1] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(items, *args)

    batch.tried = tried  # type: ignore[attr-defined]
    return batch


def test_a_batch_too_large_for_the_device_is_split_and_completes(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    embedder = load_embedder("tiny-dino", model_dir=tiny_model_dir, device="cpu")
    queries, prompts, out_sizes = _segmentation_case()
    masks = [r.mask for r in segmenter.segment(queries, prompts, out_sizes=out_sizes,
                                               batch_size=8)]
    vectors = embedder.embed(queries, batch_size=4)

    seg_batch = _fits(3, segmenter._segment_batch)
    monkeypatch.setattr(segmenter, "_segment_batch", seg_batch)
    emb_batch = _fits(1, embedder._embed_batch)
    monkeypatch.setattr(embedder, "_embed_batch", emb_batch)
    split = segmenter.segment(queries, prompts, out_sizes=out_sizes, batch_size=8)
    split_vectors = embedder.embed(queries, batch_size=4)

    # 8 prompt pairs in one pass ran out; halves of 4, then 2 (the K=3 query runs alone).
    assert seg_batch.tried[0] == 8 and max(seg_batch.tried[1:]) <= 3
    assert emb_batch.tried == [4, 2, 1, 1, 1, 1]
    for a, b in zip(masks, split, strict=True):
        assert iou(a, b.mask) >= MASK_MIN_IOU
    np.testing.assert_allclose(split_vectors, vectors, atol=1e-5)
    assert "retrying with 2" in caplog.text


def test_one_item_that_does_not_fit_says_what_to_do(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segmenter = load_segmenter("tiny-seggpt", model_dir=tiny_model_dir, device="cpu")
    queries, prompts, _ = _segmentation_case()
    monkeypatch.setattr(segmenter, "_segment_batch", _fits(0, segmenter._segment_batch))
    with pytest.raises(torch.OutOfMemoryError, match="more memory"):
        segmenter.segment(queries, prompts, batch_size=8)
    # Other errors are not mistaken for memory: they surface as they are.
    monkeypatch.setattr(segmenter, "_segment_batch", lambda *a: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segmenter.segment(queries, prompts, batch_size=8)
