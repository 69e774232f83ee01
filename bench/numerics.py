"""Reduced precision against fp32 on the real-size architectures: mask IoU and embedding cosine.

The same images go through the segmenter and the embedder twice, once in fp32 and once under
bf16 (or fp16) autocast, on the same device; the targets are mask IoU >= 0.99 and embedding
cosine >= 0.999 for every image. Without --model-dir the models are the real architectures
(SegGPT ViT-L, DINO ViT-B/16) with random weights, built from their configs and saved to disk so
the real loading code runs. Only eczema_batch.pipeline is used (no catalogue): this runs on a GPU
machine that has torch and transformers but none of the database packages.

    python -m bench.numerics --device cuda --images 32             # on a GPU
    python -m bench.numerics --device cpu --images 2 --size 640x480  # slow, but the same check
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import tempfile
import time

import numpy as np
import torch

from eczema_batch.pipeline.loading import load_embedder, load_segmenter

IOU_TARGET, COSINE_TARGET = 0.99, 0.999


def make_real_size_models(folder: Path) -> None:
    """Random-weight models of the real architectures, saved under the real names (bench only)."""
    from transformers import SegGptConfig, SegGptForImageSegmentation, ViTConfig, ViTModel

    torch.manual_seed(0)
    SegGptForImageSegmentation(SegGptConfig()).save_pretrained(folder / "seggpt-vit-large")
    dino = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, image_size=224, patch_size=16)
    ViTModel(dino, add_pooling_layer=False).save_pretrained(folder / "dino-vitb16")


def photos(count: int, width: int, height: int, seed: int) -> tuple[list[np.ndarray],
                                                                    list[np.ndarray]]:
    """Skin-toned images with a reddish patch, and the patch as a mask."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(count):
        base = np.array([210, 170, 150]) + rng.normal(0, 8, (height, width, 3))
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
        base[mask] = base[mask] * 0.7 + np.array([190, 60, 60]) * 0.3
        images.append(np.clip(base, 0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run(model_dir: Path, *, device: str, precision: str, images: int, size: tuple[int, int],
        batch_size: int) -> bool:
    queries, _ = photos(images, *size, seed=1)
    refs, ref_masks = photos(2, *size, seed=2)
    prompts = [list(zip(refs, ref_masks, strict=True))] * len(queries)
    outputs: dict[str, tuple[list[np.ndarray], np.ndarray, float]] = {}
    for name in ("fp32", precision):
        segmenter = load_segmenter("seggpt-vit-large", model_dir=model_dir, device=device,
                                   precision=name)
        embedder = load_embedder("dino-vitb16", model_dir=model_dir, device=device,
                                 precision=name)
        segmenter.segment(queries[:1], prompts[:1], batch_size=batch_size)  # warm-up
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        masks = [r.mask for r in segmenter.segment(queries, prompts, batch_size=batch_size)]
        vectors = embedder.embed(queries, batch_size=batch_size)
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize()
        outputs[name] = (masks, vectors, time.perf_counter() - start)
    (m32, v32, t32), (mlow, vlow, tlow) = outputs["fp32"], outputs[precision]
    ious = [iou(a, b) for a, b in zip(m32, mlow, strict=True)]
    cos = (v32 * vlow).sum(1) / np.linalg.norm(v32, axis=1) / np.linalg.norm(vlow, axis=1)
    area = float(np.mean([m.mean() for m in m32]))
    # With random weights SegGPT's masks are nearly empty, so a few pixels on the threshold
    # move the IoU a lot: the share of pixels that differ says how many there are.
    differ = max(float(np.mean(a != b)) for a, b in zip(m32, mlow, strict=True))
    print(f"{images} images {size[0]}x{size[1]}, K=2, {segmenter.device}, {precision} vs fp32")
    print(f"  mask IoU          min {min(ious):.4f}  mean {np.mean(ious):.4f}  "
          f"(target >= {IOU_TARGET}; fp32 masks cover {area:.1%} of the image, "
          f"at most {differ:.4%} of pixels differ)")
    print(f"  embedding cosine  min {cos.min():.6f}  mean {cos.mean():.6f}  "
          f"(target >= {COSINE_TARGET})")
    print(f"  time (segment + embed)  fp32 {t32:.2f} s, {precision} {tlow:.2f} s "
          f"({t32 / tlow:.2f}x)")
    ok = min(ious) >= IOU_TARGET and float(cos.min()) >= COSINE_TARGET
    print("  targets met" if ok else "  TARGETS MISSED")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="1024x768", help="photo size WxH")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder with seggpt-vit-large and dino-vitb16 (default: random "
                             "weights of the same architectures)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp)
            make_real_size_models(model_dir)
        ok = run(model_dir, device=args.device, precision=args.precision, images=args.images,
                 size=(width, height), batch_size=args.batch_size)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
