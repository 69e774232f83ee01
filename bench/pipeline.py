"""Throughput of `eczema-batch run`'s path against a naive per-image loop, in the same run.

For each configuration it measures, on the same ingested images:
- end-to-end: `start_run` + `run_in_process` (files on disk -> rows in the catalogue);
- forwards alone: the same model calls on already-decoded pixels (the floor for end-to-end);
- naive: decode in full, then reference calls (HF image processors, batch 1, fp32), one image
  at a time.
and prints images/s, end-to-end / forwards (CPU target <= 1.25), naive / end-to-end (GPU target
>= 8x), model FLOPs per image (counted with torch's FlopCounterMode) and achieved FLOP/s; with
--peak-tflops (e.g. 790 for bf16 on an H200) it also prints MFU.

    python -m bench.pipeline                       # tiny models, small photos, CPU
    python -m bench.pipeline --real 2 --size 4000x3000   # real-size random weights, 12 MP photos
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.flop_counter import FlopCounterMode

from bench.numerics import make_real_size_models
from eczema_batch.catalogue.db import dispose_engines, open_catalogue
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging import decode_mask_png, decode_path
from eczema_batch.ingest.service import ingest_study
from eczema_batch.jobs.config import PROMPT_MAX_SIDE, QUERY_MAX_SIDE, RunConfig
from eczema_batch.jobs.local import run_in_process, start_run
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.loading import clear_model_cache, load_embedder, load_segmenter
from eczema_batch.pipeline.reference import reference_embed, reference_segment
from eczema_batch.pipeline.retrieve import select_prompts
from eczema_batch.pipeline.tiny import make_tiny_models
from eczema_batch.synth import write_synthetic_study

K = 2


def study_images(factory_url: str) -> tuple[list[Path], list[Path], list[tuple[int, int]],
                                           list[Path]]:
    """Queries (all images), references with their mask PNGs."""
    from sqlalchemy import select

    from eczema_batch.catalogue.models import Image, Mask, Study

    factory = open_catalogue(factory_url)
    with factory() as session:
        root = Path(session.scalars(select(Study.root)).one())
        rows = session.execute(select(Image.id, Image.path, Image.height, Image.width)
                               .order_by(Image.id)).all()
        refs = session.execute(select(Image.path, Mask.png).join(Mask, Mask.image_id == Image.id)
                               .where(Mask.kind == "manual").order_by(Image.id)).all()
    queries = [root / p for _, p, _, _ in rows]
    sizes = [(h, w) for _, _, h, w in rows]
    masks_dir = Path(tempfile.mkdtemp())
    ref_paths, mask_paths = [], []
    for i, (p, png) in enumerate(refs):
        ref_paths.append(root / p)
        mask_file = masks_dir / f"{i}.png"
        mask_file.write_bytes(png)
        mask_paths.append(mask_file)
    return queries, ref_paths, sizes, mask_paths


def forwards_only(config: RunConfig, queries: list[Path], refs: list[Path], masks: list[Path],
                  sizes: list[tuple[int, int]]) -> tuple[float, float]:
    """Seconds for the model calls alone on decoded pixels, and FLOPs per image."""
    embedder = load_embedder(config.embedder_model, model_dir=config.model_dir,
                             device=config.device, precision=config.precision)
    segmenter = load_segmenter(config.segmenter_model, model_dir=config.model_dir,
                               device=config.device, precision=config.precision)
    q_pixels = [decode_path(p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_side=QUERY_MAX_SIDE).pixels
                for p in queries]
    r_pixels = [decode_path(p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_side=PROMPT_MAX_SIDE).pixels
                for p in refs]
    r_masks = [decode_mask_png(m.read_bytes()) for m in masks]
    bs = config.batch_size

    def once(count_flops: bool) -> float:
        counter = FlopCounterMode(display=False) if count_flops else None
        if counter is not None:
            counter.__enter__()
        r_vec = embedder.embed(r_pixels, batch_size=bs)
        q_vec = embedder.embed(q_pixels, batch_size=bs)
        ids = list(range(len(q_pixels)))
        sets = select_prompts(q_vec, r_vec, query_ids=[i + 10**6 for i in ids],
                              reference_ids=list(range(len(r_pixels))), k=K)
        pairs = [[(r_pixels[j], r_masks[j]) for j in s.ids] for s in sets]
        outs = segmenter.segment(q_pixels, pairs, out_sizes=sizes, batch_size=bs)
        crops = [crop_to_mask(px, o.mask).pixels if o.mask.any() else px
                 for px, o in zip(q_pixels, outs, strict=True)]
        embedder.embed(crops, batch_size=bs)
        if counter is not None:
            counter.__exit__(None, None, None)
            return float(counter.get_total_flops())
        return 0.0

    flops = once(True)
    start = time.perf_counter()
    once(False)
    return time.perf_counter() - start, flops / len(queries)


def naive(config: RunConfig, queries: list[Path], refs: list[Path], masks: list[Path],
          sizes: list[tuple[int, int]]) -> float:
    assert config.model_dir is not None
    seg_path = Path(config.model_dir) / config.segmenter_model
    emb_path = Path(config.model_dir) / config.embedder_model
    start = time.perf_counter()
    r_pixels = [decode_path(p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).pixels for p in refs]
    r_masks = [decode_mask_png(m.read_bytes()) for m in masks]
    r_vec = np.stack([reference_embed(emb_path, px) for px in r_pixels])
    for i, path in enumerate(queries):
        px = decode_path(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).pixels
        vec = reference_embed(emb_path, px)
        [pset] = select_prompts(vec[None], r_vec, query_ids=[-1 - i],
                                reference_ids=list(range(len(refs))), k=K)
        mask = reference_segment(seg_path, px, [(r_pixels[j], r_masks[j]) for j in pset.ids],
                                 sizes[i])
        crop = crop_to_mask(px, mask).pixels if mask.any() else px
        reference_embed(emb_path, crop)
    return time.perf_counter() - start


def bench(label: str, tmp: Path, *, images: int, size: tuple[int, int], model_dir: Path,
          segmenter: str, embedder: str, batch_size: int, device: str, peak: float | None
          ) -> None:
    root = tmp / f"study-{label}"
    visits = 2
    patients = max(2, images // (visits * 2))
    write_synthetic_study(root, patients=patients, visits=visits, seed=1, size=size,
                          reference_fraction=0.3, dicom_fraction=0.0, png_fraction=0.0)
    url = f"sqlite:///{tmp}/{label}.sqlite3"
    factory = open_catalogue(url)
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    config = RunConfig(segmenter_model=segmenter, embedder_model=embedder, prompts=K,
                       batch_size=batch_size, device=device, model_dir=str(model_dir))
    queries, refs, sizes, masks = study_images(url)
    n = len(queries)
    # Warm-up: load the models once, as a worker does, outside the timings.
    load_embedder(embedder, model_dir=model_dir, device=device)
    load_segmenter(segmenter, model_dir=model_dir, device=device)

    t_fwd, flops = forwards_only(config, queries, refs, masks, sizes)
    plan = start_run(factory, config=config, executor="local", queue="local", chunk_size=64)
    start = time.perf_counter()
    run_in_process(factory, plan)
    t_e2e = time.perf_counter() - start
    t_naive = naive(config, queries, refs, masks, sizes)
    dispose_engines()

    print(f"\n[{label}] {n} images {size[0]}x{size[1]}, K={K}, batch {batch_size}, {device}")
    print(f"  end-to-end     {n / t_e2e:8.2f} images/s  ({t_e2e:.2f} s)")
    print(f"  forwards only  {n / t_fwd:8.2f} images/s  ({t_fwd:.2f} s)")
    print(f"  naive loop     {n / t_naive:8.2f} images/s  ({t_naive:.2f} s)")
    print(f"  end-to-end / forwards = {t_e2e / t_fwd:.2f}  (CPU target <= 1.25)")
    print(f"  naive / end-to-end    = {t_naive / t_e2e:.2f}x  (GPU target >= 8x)")
    achieved = flops * n / t_e2e
    print(f"  model FLOPs per image  {flops / 1e9:.2f} GFLOP; achieved {achieved / 1e12:.4f} "
          "TFLOP/s end-to-end" + (f", MFU {achieved / (peak * 1e12):.1%}" if peak else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="images with tiny models")
    parser.add_argument("--real", type=int, default=0,
                        help="images with real-size architectures (random weights)")
    parser.add_argument("--size", default="320x240", help="photo size WxH")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    assert len(size) == 2
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        if args.images:
            make_tiny_models(models)
            bench("tiny", tmp, images=args.images, size=(size[0], size[1]), model_dir=models,
                  segmenter="tiny-seggpt", embedder="tiny-dino", batch_size=args.batch_size,
                  device=args.device, peak=args.peak_tflops)
        if args.real:
            clear_model_cache()
            make_real_size_models(models)
            bench("real-size", tmp, images=args.real, size=(size[0], size[1]), model_dir=models,
                  segmenter="seggpt-vit-large", embedder="dino-vitb16",
                  batch_size=args.batch_size, device=args.device, peak=args.peak_tflops)


if __name__ == "__main__":
    main()
