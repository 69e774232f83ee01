"""Step 3 of the method: segment each query image with SegGPT, prompted by K reference pairs.

What transformers 5.24 does for one query with K prompts (and what this module reproduces):

- `SegGptImageProcessor(num_labels=1)` paints each 0/1 prompt mask with the palette
  `build_palette(1) == [(0, 0, 0), (255, 255, 255)]` (lesion white), resizes it NEAREST and the
  images BICUBIC to the per-image size (448 for the real model: its `config.image_size` is
  `[896, 448]` because prompt and query are stacked vertically), then normalises both with
  ImageNet statistics.
- The K prompts go on the batch axis and the query is repeated K times. With
  `feature_ensemble=True` (used when K >= 2) every encoder layer replaces the query half of the
  attention output by its mean over the *whole batch* (separately for the image and mask streams
  before `merge_index`, over both streams at the merge layer, over the merged batch after it).
  Two different queries therefore cannot share one HF forward pass. Here the encoder loop is
  re-run with the same modules and a per-query mean, so many queries (sum of their K) share a batch.
- `post_process_semantic_segmentation(outputs, target_sizes, num_labels=1)` takes the lower half
  of `pred_masks`, un-normalises it to 0..255 RGB (clipped), resizes it with torch's legacy
  `nearest` to the target size, and picks the nearer palette colour. With two colours that is
  "lesion when the channel mean is above 127.5" (ties go to background). It returns K maps; under
  feature_ensemble they agree except the first pixel row of the lower half (the decoder's 3x3
  convolution sees the differing prompt row above it), and like the original SegGPT engine
  (`run_one_image`: `y[0]`) we keep the first.

Attention: transformers' SegGptAttention is eager only (`_supports_sdpa` is False: from_pretrained
with attn_implementation="sdpa" raises). Its decomposed relative-position bias is folded into the
query and key (q' = [q * scale, q.Rh, q.Rw], k' = [k, onehot(row), onehot(col)]) so that
`scaled_dot_product_attention` computes exactly softmax(q.k * scale + rel_h + rel_w) v without a
materialised bias, which lets CUDA use its flash / memory-efficient kernels. `attention="eager"`
calls transformers' own module instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.device import autocast, halved_batch
from eczema_batch.pipeline.preprocess import (
    check_image,
    preprocess_images,
    preprocess_masks,
    to_device,
)
from eczema_batch.pipeline.registry import ModelSpec

if TYPE_CHECKING:
    from eczema_batch.pipeline.loading import ModelIdentity

logger = logging.getLogger(__name__)

Attention = Literal["sdpa", "eager"]
PromptPair = tuple[np.ndarray, np.ndarray]
#: (layer index, grid height, grid width, dtype) -> (rows table, columns table)
RelPosCache = dict[tuple[int, int, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]

#: prompt pairs (sum of K over the queries) per forward pass. SegGPT-L sees 1,568 tokens per pair
#: (2 x 28 x 28) and runs its first layers on twice the batch (image and mask streams).
DEFAULT_SEGMENT_BATCH = 16

#: palette-distance decision of post_process_semantic_segmentation(num_labels=1), as a fraction
#: of full intensity: lesion where the mean of the clipped RGB prediction is above 127.5 / 255.
DEFAULT_THRESHOLD = 0.5

#: SDPA kernels want the head dimension in multiples of 8.
_HEAD_DIM_ALIGN = 8


@dataclass(frozen=True)
class SegmentResult:
    """A lesion mask at the query's full size and the fraction of the image it covers."""

    mask: np.ndarray
    area_fraction: float


def seggpt_input_size(config: Any) -> tuple[int, int]:
    """Per-image (height, width) of a SegGPT config: its image_size is prompt + query stacked."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return height // 2, width


class Segmenter:
    """SegGPT with K (image, mask) prompt pairs per query, batched across queries."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        spec: ModelSpec,
        identity: ModelIdentity,
        device: torch.device,
        dtype: torch.dtype,
        attention: Attention = "sdpa",
    ) -> None:
        self.model = model
        self.spec = spec
        self.identity = identity
        self.device = device
        self.dtype = dtype
        self.attention: Attention = attention
        self.input_size = seggpt_input_size(model.config)
        # Relative-position tables per (layer, grid, dtype): fixed for frozen weights, and
        # transformers' get_rel_pos indexes with a CPU tensor (a host sync per call on CUDA).
        self._rel_pos_cache: RelPosCache = {}

    def segment(
        self,
        queries: Sequence[np.ndarray],
        prompts: Sequence[Sequence[PromptPair]],
        *,
        out_sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        batch_size: int = DEFAULT_SEGMENT_BATCH,
    ) -> list[SegmentResult]:
        """Segment each query with its K >= 1 prompt pairs (uint8 image, bool mask).

        `out_sizes` gives each query's full (height, width) when its pixels were decoded at a
        reduced scale; by default the mask has the query pixels' size. `batch_size` bounds the
        prompt pairs per forward pass (a query with more pairs runs alone).
        """
        if len(prompts) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(prompts)} prompt lists")
        if out_sizes is not None and len(out_sizes) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(out_sizes)} out_sizes")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        for index, pairs in enumerate(prompts):
            if not pairs:
                raise UsageError(f"query {index} has no prompt pairs: SegGPT needs at least one")
        sizes = [
            tuple(out_sizes[i]) if out_sizes is not None else check_image(q).shape[:2]
            for i, q in enumerate(queries)
        ]
        results: list[SegmentResult] = []
        group_sizes = [len(p) for p in prompts]
        done = 0
        while done < len(queries):
            # The batches are planned again from here after a batch ran out of device memory.
            batch = _next_batch(group_sizes, done, batch_size)
            try:
                small = self._segment_batch(
                    [queries[i] for i in batch], [prompts[i] for i in batch], threshold
                )
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                # One query's K pairs are one forward pass: it cannot be split.
                in_batch = sum(group_sizes[i] for i in batch) if len(batch) > 1 else 1
                batch_size = halved_batch(exc, self.device, in_batch, "segmentation")
                continue
            for mask, index in zip(small, batch, strict=True):
                height, width = sizes[index]
                full = upsample_nearest(mask, (int(height), int(width)))
                results.append(SegmentResult(mask=full, area_fraction=upsampled_area(
                    mask, (int(height), int(width)))))
            done += len(batch)
        return results

    @torch.inference_mode()
    def _segment_batch(
        self,
        queries: Sequence[np.ndarray],
        prompts: Sequence[Sequence[PromptPair]],
        threshold: float,
    ) -> np.ndarray:
        """(G, h, w) bool masks at the model's resolution for G queries."""
        group_sizes = [len(pairs) for pairs in prompts]
        common: dict[str, Any] = {
            "size": self.input_size,
            "mean": self.spec.mean,
            "std": self.spec.std,
            "device": self.device,
        }
        query_px = preprocess_images(queries, resample=self.spec.resample, **common)
        # The query repeated once per prompt pair (index built on the host: no device sync).
        repeat = np.repeat(np.arange(len(group_sizes)), group_sizes)
        query_px = query_px.index_select(0, to_device(repeat, self.device))
        prompt_px = preprocess_images(
            [image for pairs in prompts for image, _ in pairs],
            resample=self.spec.resample,
            **common,
        )
        prompt_masks = preprocess_masks([mask for pairs in prompts for _, mask in pairs], **common)
        with autocast(self.device, self.dtype):
            pred = seggpt_forward(
                self.model,
                query_px,
                prompt_px,
                prompt_masks,
                group_sizes,
                self.attention,
                rel_pos_cache=self._rel_pos_cache,
            )
        foreground = pred_to_foreground(pred, self.spec.mean, self.spec.std, threshold)
        first = to_device(np.cumsum([0, *group_sizes[:-1]]), self.device)
        # One device -> host transfer per batch.
        return foreground.index_select(0, first).cpu().numpy()


def _next_batch(group_sizes: Sequence[int], start: int, batch_size: int) -> list[int]:
    """Consecutive query indices from `start` whose prompt counts add up to at most
    `batch_size` (at least one query, however many prompts it has)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch, total = [start], group_sizes[start]
    for index in range(start + 1, len(group_sizes)):
        if total + group_sizes[index] > batch_size:
            break
        batch.append(index)
        total += group_sizes[index]
    return batch


def pred_to_foreground(
    pred_masks: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float = DEFAULT_THRESHOLD,
) -> torch.Tensor:
    """SegGPT pred_masks (B, 3, 2h, w) -> bool (B, h, w) lesion maps (see the module docstring)."""
    lower = pred_masks[:, :, pred_masks.shape[2] // 2 :, :].to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=lower.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=lower.device).view(1, 3, 1, 1)
    rgb = torch.clip((lower * std_t + mean_t) * 255.0, 0.0, 255.0)
    # Nearer to white than to black <=> channel sum above 3 * 127.5 (ties: background).
    return rgb.sum(dim=1) > 3.0 * 255.0 * threshold


def upsample_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask like torch's legacy `nearest` (what the HF post-processing uses)."""
    rows = _nearest_source(mask.shape[0], size[0])
    cols = _nearest_source(mask.shape[1], size[1])
    # The source indices never decrease, so repeating each row / column by how often it is
    # picked gives mask[np.ix_(rows, cols)] (6x faster at 12 MP).
    row_counts = np.bincount(rows, minlength=mask.shape[0])
    col_counts = np.bincount(cols, minlength=mask.shape[1])
    return np.repeat(np.repeat(mask, row_counts, axis=0), col_counts, axis=1)


def upsampled_area(mask: np.ndarray, size: tuple[int, int]) -> float:
    """`upsample_nearest(mask, size).mean()` from the small mask (a full-size pass costs ~4 ms
    at 12 MP): each source pixel counts as often as its row and column are picked."""
    rows = np.bincount(_nearest_source(mask.shape[0], size[0]), minlength=mask.shape[0])
    cols = np.bincount(_nearest_source(mask.shape[1], size[1]), minlength=mask.shape[1])
    return float(rows @ mask.astype(np.float64) @ cols) / (size[0] * size[1])


def _nearest_source(src: int, dst: int) -> np.ndarray:
    if src == dst:
        return np.arange(dst)
    # torch: min(floor(float(dst_index) * (float(src) / dst)), src - 1), in float32 arithmetic.
    scale = np.float32(np.float32(src) / np.float32(dst))
    index = np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, src - 1)


def seggpt_forward(
    model: Any,
    query_px: torch.Tensor,
    prompt_px: torch.Tensor,
    prompt_masks: torch.Tensor,
    group_sizes: Sequence[int],
    attention: Attention = "sdpa",
    *,
    rel_pos_cache: RelPosCache | None = None,
) -> torch.Tensor:
    """SegGptForImageSegmentation's forward with a per-query feature ensemble.

    The batch holds consecutive groups of `group_sizes[g]` pairs that share one query; groups of
    two or more are ensembled (feature_ensemble=True), single pairs are not (as in transformers).
    Returns pred_masks (B, 3, 2h, w).
    """
    if model.training:
        raise RuntimeError("SegGPT must be in eval mode (drop path would be active)")
    config = model.config
    seggpt = model.model
    # Prompt image above query; prompt mask above a copy of itself whose lower half is masked.
    pixel_values = torch.cat((prompt_px, query_px), dim=2)
    mask_values = torch.cat((prompt_masks, prompt_masks), dim=2)
    num_patches = seggpt.embeddings.patch_embeddings.num_patches
    masked = torch.zeros(num_patches, dtype=torch.bool, device=pixel_values.device)
    masked[num_patches // 2 :] = True
    hidden = seggpt.embeddings(
        pixel_values, mask_values, bool_masked_pos=masked.unsqueeze(0), embedding_type=None
    )
    ids = _EnsembleIds(group_sizes, device=pixel_values.device)
    merge_index = config.merge_index
    keep = set(config.intermediate_hidden_state_indices)
    cache: RelPosCache = {} if rel_pos_cache is None else rel_pos_cache
    intermediate = []
    for index, layer in enumerate(seggpt.encoder.layers[: max(keep) + 1]):
        if index < merge_index:
            groups = ids.separate_streams  # ensemble_cond 2: image and mask streams apart
        elif index == merge_index:
            groups = ids.joint_streams  # ensemble_cond 1 while the batch is still doubled
        else:
            groups = ids.merged
        if attention == "sdpa":
            attn = _sdpa_attention(layer.attention, layer.layernorm_before(hidden), index, cache)
        else:
            attn = layer.attention(layer.layernorm_before(hidden))[0]
        hidden = _layer_forward(layer, hidden, attn, groups)
        if index == merge_index:
            half = hidden.shape[0] // 2
            hidden = (hidden[:half] + hidden[half:]) * 0.5
        if index in keep:
            intermediate.append(seggpt.encoder.layernorm(hidden))
    return model.decoder(torch.cat(intermediate, dim=-1))


Groups = tuple[torch.Tensor, int]  # (id per batch item, number of ids)


class _EnsembleIds:
    """Which batch items average their query half, for the three phases of the encoder.

    Items of a group with K >= 2 share an id; every other item gets an id of its own, so the
    group mean leaves it unchanged (transformers skips the ensemble when K == 1). Built on the
    host so that no phase needs a device sync; None when no group is ensembled.
    """

    def __init__(self, group_sizes: Sequence[int], *, device: torch.device) -> None:
        sizes = np.asarray(group_sizes, dtype=np.int64)
        batch, count = int(sizes.sum()), len(sizes)
        groups = np.repeat(np.arange(count), sizes)
        ensembled = np.repeat(sizes >= 2, sizes)
        self.separate_streams: Groups | None = None
        self.joint_streams: Groups | None = None
        self.merged: Groups | None = None
        if not ensembled.any():
            return
        items = np.arange(batch)
        # Id ranges: [0, G) groups, [G, G + 2B) single items, [G + 2B, 2G + 2B) mask-stream groups.
        image = np.where(ensembled, groups, count + items)
        mask_single = count + batch + items
        size = 2 * count + 2 * batch

        def place(ids: np.ndarray) -> Groups:
            return to_device(ids, device), size

        self.merged = place(image)
        self.joint_streams = place(
            np.concatenate([image, np.where(ensembled, groups, mask_single)])
        )
        mask_groups = count + 2 * batch + groups
        self.separate_streams = place(
            np.concatenate([image, np.where(ensembled, mask_groups, mask_single)])
        )


def _group_mean(values: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Replace each item by the mean over the items that share its id (computed in float32)."""
    ids, size = groups
    flat = values.reshape(values.shape[0], -1).to(torch.float32)
    sums = torch.zeros(size, flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, ids, flat)
    counts = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=flat.dtype))
    means = sums[ids] / counts[ids].unsqueeze(1)
    return means.reshape(values.shape).to(values.dtype)


def _layer_forward(
    layer: Any, hidden: torch.Tensor, attn: torch.Tensor, groups: Groups | None
) -> torch.Tensor:
    """The rest of SegGptLayer.forward after attention, with the ensemble kept to each group."""
    if groups is not None:
        prompt_half, query_half = attn.split(attn.shape[1] // 2, dim=1)
        attn = torch.cat([prompt_half, _group_mean(query_half, groups)], dim=1)
    hidden = layer.drop_path(attn) + hidden
    return hidden + layer.drop_path(layer.mlp(layer.layernorm_after(hidden)))


def _sdpa_attention(
    attention: Any, hidden: torch.Tensor, index: int, cache: RelPosCache
) -> torch.Tensor:
    height, width = hidden.shape[1:3]
    tables = None
    if attention.use_relative_position_embeddings:
        key = (index, height, width, hidden.dtype)
        if key not in cache:
            rows = attention.get_rel_pos(height, height, attention.rel_pos_h)
            cols = attention.get_rel_pos(width, width, attention.rel_pos_w)
            cache[key] = (rows, cols)
        tables = cache[key]
    return decomposed_sdpa(attention, hidden, tables)


def decomposed_sdpa(
    attention: Any,
    hidden: torch.Tensor,
    rel_pos_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SegGptAttention.forward through scaled_dot_product_attention (see the module docstring).

    `rel_pos_tables` are the layer's get_rel_pos(height) and get_rel_pos(width) when cached.
    """
    batch, height, width, _ = hidden.shape
    heads = attention.num_attention_heads
    tokens = height * width
    qkv = attention.qkv(hidden).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (B, heads, N, d)
    head_dim = query.shape[-1]
    if attention.use_relative_position_embeddings:
        if rel_pos_tables is None:
            rel_pos_tables = (
                attention.get_rel_pos(height, height, attention.rel_pos_h),
                attention.get_rel_pos(width, width, attention.rel_pos_w),
            )
        rel_h_table = rel_pos_tables[0].to(query.dtype)
        rel_w_table = rel_pos_tables[1].to(query.dtype)
        grid = query.reshape(batch, heads, height, width, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rel_h_table).reshape(
            batch, heads, tokens, height
        )
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rel_w_table).reshape(
            batch, heads, tokens, width
        )
        eye_h = torch.eye(height, dtype=query.dtype, device=query.device)
        eye_w = torch.eye(width, dtype=query.dtype, device=query.device)
        # Key token n = (row, col) row-major: one-hot of its row and of its column.
        key_rows = eye_h.repeat_interleave(width, dim=0).expand(batch, heads, tokens, height)
        key_cols = eye_w.repeat(height, 1).expand(batch, heads, tokens, width)
        query = torch.cat([query * attention.scale, rel_h, rel_w], dim=-1)
        key = torch.cat([key, key_rows, key_cols], dim=-1)
        scale = 1.0
    else:
        scale = attention.scale
    padded = -(-query.shape[-1] // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN
    query = F.pad(query, (0, padded - query.shape[-1]))
    key = F.pad(key, (0, padded - key.shape[-1]))
    value = F.pad(value, (0, padded - head_dim))
    out = F.scaled_dot_product_attention(query, key, value, scale=scale)[..., :head_dim]
    out = out.permute(0, 2, 1, 3).reshape(batch, height, width, heads * head_dim)
    return attention.proj(out)
