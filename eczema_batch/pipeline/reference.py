"""The plain path: straight transformers calls, batch 1, float32, one image at a time.

Tests and benchmarks hold the batched pipeline (`embed`, `segment`) against this. It uses the PIL
image processors explicitly (`*ImageProcessorPil`: transformers 5 wants torchvision for the default
ones and falls back to these anyway), the eager attention, and the processors' own post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eczema_batch.pipeline.registry import IMAGENET_MEAN, IMAGENET_STD


@lru_cache(maxsize=4)
def _vit(path: str, device: str) -> Any:
    from transformers import ViTModel

    return ViTModel.from_pretrained(
        path, add_pooling_layer=False, attn_implementation="eager", local_files_only=True
    ).eval().to(device)


@lru_cache(maxsize=4)
def _seggpt(path: str, device: str) -> Any:
    from transformers import SegGptForImageSegmentation

    return SegGptForImageSegmentation.from_pretrained(path, local_files_only=True).eval().to(
        device)


def _size_dict(size: Any) -> dict[str, int]:
    height, width = (size, size) if isinstance(size, int) else size
    return {"height": int(height), "width": int(width)}


def reference_embed(model_path: Path | str, image: np.ndarray, device: str = "cpu"
                    ) -> np.ndarray:
    """CLS embedding (D,) of one uint8 (H, W, 3) image via ViTImageProcessorPil (bilinear).

    `device` runs the model there (the naive baseline of bench.pipeline on a GPU)."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    model = _vit(str(model_path), device)
    processor = ViTImageProcessorPil(
        size=_size_dict(model.config.image_size),
        resample=PILImageResampling.BILINEAR,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    inputs = processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        output = model(pixel_values=inputs["pixel_values"].to(device))
    return output.last_hidden_state[0, 0].cpu().numpy().astype(np.float32)


def reference_segment(
    model_path: Path | str,
    query: np.ndarray,
    prompts: Sequence[tuple[np.ndarray, np.ndarray]],
    out_size: tuple[int, int],
    device: str = "cpu",
) -> np.ndarray:
    """bool (height, width) lesion mask of one query from K (image, mask) prompt pairs."""
    from transformers import SegGptImageProcessorPil

    model = _seggpt(str(model_path), device)
    image_size = model.config.image_size
    per_image = (image_size[0] // 2, image_size[1])  # config size is prompt + query stacked
    processor: Any = SegGptImageProcessorPil(size=_size_dict(per_image))
    k = len(prompts)
    inputs = processor(
        images=[query] * k,
        prompt_images=[image for image, _ in prompts],
        prompt_masks=[mask.astype(np.uint8) for _, mask in prompts],
        num_labels=1,
        return_tensors="pt",
    )
    with torch.inference_mode():
        outputs = model(**{k_: v.to(device) for k_, v in inputs.items()},
                        feature_ensemble=k >= 2)
    labels = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[tuple(out_size)] * k, num_labels=1
    )
    # The K maps agree up to the seam row; the original SegGPT engine keeps the first.
    return labels[0].cpu().numpy().astype(bool)
