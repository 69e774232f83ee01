"""Images and masks to normalised model input, in torch on the device.

The reference path (`reference.py`) prepares inputs with the Hugging Face PIL image processors:
PIL resizes the uint8 image (bilinear for ViT, bicubic for SegGPT), then rescales by 1/255 and
normalises. Here the uint8 pixels go to the device as they are (3 bytes a pixel over the bus) and
are resized there with torch's antialiased interpolation, which uses PIL's filters, one separable
pass at a time in PIL's order: the vertical pass first when the image shrinks vertically and
`2 * width < height + size` (Pillow 13's choice, found by comparing both orders with its output).
On CUDA the passes run in float32 and each is rounded half-up and clipped to uint8 as PIL does;
on CPU they run on uint8 in torch's port of Pillow-SIMD's kernels (channels-last), 2-50x faster.

Tolerance this costs (measured against Pillow 13 on random uint8 images, 8-1800 px to 16-448 px):
bilinear within 1 grey level (float: 0.4 % of values on average, 6.5 % at worst; uint8: 3.3 % at
worst), bicubic within 2 levels on < 1 % of values; the rest is PIL's fixed-point coefficients.
A plain one-pass float resize would be off by up to 10 levels (bicubic overshoot that PIL clips
between passes). On the tiny ViT this gives embeddings within cosine 0.99999 of the reference.

Masks are resized on the host (a gather: only the small mask crosses the bus) like torch's
`nearest-exact`, which is PIL's NEAREST (pixel centres), not torch's legacy `nearest`; this is
exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eczema_batch.pipeline.registry import Resample

#: uint8 white: the colour SegGPT's palette gives the lesion class when num_labels=1
#: (transformers' build_palette(1) == [(0, 0, 0), (255, 255, 255)]).
MASK_FOREGROUND = 255.0


def check_image(image: np.ndarray) -> np.ndarray:
    """`image` as a C-contiguous uint8 (H, W, 3) array, or ValueError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def check_mask(mask: np.ndarray) -> np.ndarray:
    """`mask` as a C-contiguous bool (H, W) array, or ValueError."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or 0 in mask.shape:
        shape = getattr(mask, "shape", None)
        raise ValueError(f"expected an (H, W) mask, got {type(mask).__name__} of shape {shape}")
    return np.ascontiguousarray(mask.astype(bool, copy=False))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: through pinned memory and an asynchronous copy on CUDA.

    Read-only arrays (np.asarray of a PIL image) are shared, not copied: nothing here writes to
    the input tensor, every step makes a new one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # The caching host allocator keeps the pinned block alive until the copy has finished.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _pil_order(height: int, width: int, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The intermediate and final sizes of PIL's two separable passes, in PIL's order."""
    out_height, out_width = size
    vertical_first = height > out_height and 2 * width < height + out_width
    if vertical_first:
        return [(out_height, width), (out_height, out_width)]
    return [(height, out_width), (out_height, out_width)]


def nearest_exact(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D mask like PIL's NEAREST (torch's `nearest-exact`): sample at pixel centres."""

    def source(src: int, dst: int) -> np.ndarray:
        # torch: min(floor((dst_index + 0.5) * (src / dst)), src - 1) in float32
        scale = np.float32(np.float32(src) / np.float32(dst))
        index = np.floor((np.arange(dst, dtype=np.float32) + np.float32(0.5)) * scale)
        return np.minimum(index.astype(np.int64), src - 1)

    return mask[np.ix_(source(mask.shape[0], size[0]), source(mask.shape[1], size[1]))]


def resize_like_pil(
    pixels: torch.Tensor, size: tuple[int, int], resample: Resample
) -> torch.Tensor:
    """Resize (1, C, H, W) pixels the way PIL resizes a uint8 image.

    uint8 input (CPU only) stays uint8; float input holds values in 0..255 and comes back as whole
    numbers in 0..255.
    """
    height, width = pixels.shape[-2:]
    for step in _pil_order(height, width, size):
        if tuple(pixels.shape[-2:]) == step:
            continue  # PIL skips a pass that does not change the size
        pixels = F.interpolate(
            pixels, size=step, mode=resample, antialias=True, align_corners=False
        )
        if pixels.is_floating_point():
            # PIL rounds half up (fixed point + 0.5) and clips to uint8 after every pass.
            pixels = pixels.add_(0.5).floor_().clamp_(0.0, 255.0)
    return pixels


def _normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch / 255.0 - mean_t) / std_t


def preprocess_images(
    images: Sequence[np.ndarray],
    *,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resample: Resample,
    device: torch.device,
) -> torch.Tensor:
    """uint8 (H, W, 3) images of any sizes -> normalised float32 (N, 3, *size) on `device`."""
    resized = []
    for image in images:
        pixels = to_device(check_image(image), device).permute(2, 0, 1).unsqueeze(0)
        if device.type == "cpu":
            # (H, W, 3) memory is already channels-last: the layout torch's uint8 kernels want.
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        else:
            pixels = pixels.to(torch.float32)  # CUDA has no uint8 antialiased resize
        resized.append(resize_like_pil(pixels, size, resample).to(torch.float32))
    return _normalise(torch.cat(resized).contiguous(), mean, std)


def preprocess_masks(
    masks: Sequence[np.ndarray],
    *,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """bool (H, W) masks -> SegGPT prompt masks: palette RGB (lesion white), normalised.

    Matches SegGptImageProcessor(num_labels=1): 2-D 0/1 map -> palette colours -> NEAREST resize.
    """
    resized = []
    for mask in masks:
        # Picked on the host: only the small mask crosses the bus, and numpy's gather beats
        # torch's nearest on a uint8 photo-sized mask by far.
        small = nearest_exact(check_mask(mask), size)
        values = to_device(small.view(np.uint8), device)[None, None].to(torch.float32)
        resized.append(values * MASK_FOREGROUND)
    # num_labels=1 paints the lesion (255, 255, 255): the same value in all three channels.
    return _normalise(torch.cat(resized).expand(-1, 3, -1, -1), mean, std)
