"""Throughput of `eczema-batch run`'s path against a naive per-image loop, in the same run.

For each configuration it measures, on the same ingested images:
- end-to-end: `start_run` + `run_in_process` (files on disk -> rows in the catalogue), once per
  batch size and decode-thread count asked for, each on a fresh copy of the ingested catalogue;
- forwards alone: the same model calls on already-decoded pixels (the floor for end-to-end);
- naive: decode in full, then reference calls (HF image processors, batch 1, fp32, on the same
  device), one image at a time, on the first --naive-images queries (its rate is per image,
  so a subset suffices);
and prints images/s, end-to-end / forwards (CPU target <= 1.25), naive / end-to-end (GPU target
>= 8x), model FLOPs per image (counted with torch's FlopCounterMode) and achieved FLOP/s; with
--peak-tflops (e.g. 790 for bf16 on an H200) it also prints MFU. Where the end-to-end time goes
is split by stage (main thread: waiting for decodes, model calls, mask upsampling, crops, the
catalogue write; decode threads: decoding and PNG encoding), with the GPU's sampled utilisation.

    python -m bench.pipeline                       # tiny models, small photos, CPU
    python -m bench.pipeline --real 2 --size 4000x3000   # real-size random weights, 12 MP photos
    python -m bench.pipeline --images 0 --real 512 --size 4000x3000 --device cuda \\
        --batch-size 8,16,32 --decode-threads 8,16 --peak-tflops 700 --results out.jsonl

--memory-fraction F caps this process's share of the GPU's memory, so that a batch too large for
the card runs out of memory and is split (the out-of-memory check of scripts/gpu-check).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.numerics import make_real_size_models
from eczema_batch.catalogue.db import dispose_engines, open_catalogue
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS, Settings
from eczema_batch.imaging import decode_mask_png, decode_path
from eczema_batch.ingest.service import ingest_study
from eczema_batch.jobs import chunk as chunk_module
from eczema_batch.jobs.local import run_in_process
from eczema_batch.jobs.runs import start_run
from eczema_batch.measuring import pixels as pixels_module
from eczema_batch.measuring import prompts as prompts_module
from eczema_batch.measuring.config import PROMPT_MAX_SIDE, QUERY_MAX_SIDE, RunConfig
from eczema_batch.pipeline import measure as measure_module
from eczema_batch.pipeline import segment as segment_module
from eczema_batch.pipeline.crop import crop_to_mask
from eczema_batch.pipeline.device import resolve_device
from eczema_batch.pipeline.embed import Embedder
from eczema_batch.pipeline.loading import clear_model_cache, load_embedder, load_segmenter
from eczema_batch.pipeline.reference import reference_embed, reference_segment
from eczema_batch.pipeline.retrieve import select_prompts
from eczema_batch.pipeline.segment import Segmenter
from eczema_batch.pipeline.tiny import make_tiny_models
from eczema_batch.synth import write_synthetic_study

K = 2
#: queries whose model FLOPs are counted (FlopCounterMode is slow; FLOPs per image do not vary)
FLOP_SAMPLE = 8


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forwards_only(config: RunConfig, queries: list[Path], refs: list[Path], masks: list[Path],
                  sizes: list[tuple[int, int]]) -> tuple[float, float]:
    """Seconds for the model calls alone on decoded pixels, and FLOPs per image."""
    embedder = load_embedder(config.embedder_model, model_dir=config.model_dir,
                             device=config.device, precision=config.precision)
    segmenter = load_segmenter(config.segmenter_model, model_dir=config.model_dir,
                               device=config.device, precision=config.precision)
    with ThreadPoolExecutor(config.decode_threads) as pool:
        q_pixels = list(pool.map(lambda p: decode_path(
            p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_side=QUERY_MAX_SIDE).pixels, queries))
        r_pixels = list(pool.map(lambda p: decode_path(
            p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_side=PROMPT_MAX_SIDE).pixels, refs))
    r_masks = [decode_mask_png(m.read_bytes()) for m in masks]
    bs = config.batch_size

    def once(count: int) -> None:
        pixels = q_pixels[:count]
        r_vec = embedder.embed(r_pixels, batch_size=bs)
        q_vec = embedder.embed(pixels, batch_size=bs)
        ids = list(range(len(pixels)))
        sets = select_prompts(q_vec, r_vec, query_ids=[i + 10**6 for i in ids],
                              reference_ids=list(range(len(r_pixels))), k=K)
        pairs = [[(r_pixels[j], r_masks[j]) for j in s.ids] for s in sets]
        outs = segmenter.segment(pixels, pairs, out_sizes=sizes[:count], batch_size=bs)
        crops = [crop_to_mask(px, o.mask).pixels if o.mask.any() else px
                 for px, o in zip(pixels, outs, strict=True)]
        embedder.embed(crops, batch_size=bs)
        _sync(config.device)

    sample = min(FLOP_SAMPLE, len(q_pixels))
    counter = FlopCounterMode(display=False)
    with counter:
        once(sample)
    flops = float(counter.get_total_flops())
    # The reference embeddings are counted once per call: take them out of the per-image figure.
    with FlopCounterMode(display=False) as refs_only:
        embedder.embed(r_pixels, batch_size=bs)
    flops -= float(refs_only.get_total_flops())
    start = time.perf_counter()
    once(len(q_pixels))
    return time.perf_counter() - start, flops / sample


def naive(config: RunConfig, queries: list[Path], refs: list[Path], masks: list[Path],
          sizes: list[tuple[int, int]]) -> tuple[float, float]:
    """Seconds per reference (decode and embed) and per query of the naive loop.

    The per-query work does not depend on which references prompt it (always K pairs), so the
    queries pick among the first FLOP_SAMPLE references; the whole study's naive time is then
    references x per-reference + queries x per-query.
    """
    assert config.model_dir is not None
    seg_path = Path(config.model_dir) / config.segmenter_model
    emb_path = Path(config.model_dir) / config.embedder_model
    device = str(resolve_device(config.device))
    refs, masks = refs[:FLOP_SAMPLE], masks[:FLOP_SAMPLE]
    start = time.perf_counter()
    r_pixels = [decode_path(p, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).pixels for p in refs]
    r_masks = [decode_mask_png(m.read_bytes()) for m in masks]
    r_vec = np.stack([reference_embed(emb_path, px, device) for px in r_pixels])
    per_ref = (time.perf_counter() - start) / len(refs)
    start = time.perf_counter()
    for i, path in enumerate(queries):
        px = decode_path(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS).pixels
        vec = reference_embed(emb_path, px, device)
        [pset] = select_prompts(vec[None], r_vec, query_ids=[-1 - i],
                                reference_ids=list(range(len(refs))), k=K)
        mask = reference_segment(seg_path, px, [(r_pixels[j], r_masks[j]) for j in pset.ids],
                                 sizes[i], device)
        crop = crop_to_mask(px, mask).pixels if mask.any() else px
        reference_embed(emb_path, crop, device)
    _sync(device)
    return per_ref, (time.perf_counter() - start) / len(queries)


class Stopwatch:
    """Wall time spent in named functions, split into the main thread and the other threads."""

    def __init__(self) -> None:
        self.main: dict[str, float] = defaultdict(float)
        self.threads: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                where = self.main if threading.current_thread() is threading.main_thread() \
                    else self.threads
                with self._lock:
                    where[name] += took
        return timed

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Time the stages of jobs.chunk without changing what they do."""
        targets: list[tuple[Any, str, str]] = [
            (pixels_module, "load_pixels", "decode"),
            (prompts_module, "load_pixels", "decode"),
            (chunk_module, "encode_mask_png", "PNG encode"),
            (measure_module, "crop_to_mask", "crop"),
            (segment_module, "upsample_nearest", "mask upsample"),
            (Segmenter, "_segment_batch", "SegGPT batches"),
            (Embedder, "_embed_batch", "DINO batches"),
            (pixels_module.StudyPixels, "get", "wait for decode"),
            (chunk_module._Chunk, "write", "catalogue write"),
        ]
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
        try:
            for (owner, attr, name), (_, _, original) in zip(targets, saved, strict=True):
                setattr(owner, attr, self.wrap(name, original))
            yield
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)


class Utilisation:
    """The GPU's utilisation sampled every 100 ms (NVML through torch), while in the block."""

    def __init__(self, device: str) -> None:
        self.samples: list[int] = []
        self._on = device.startswith("cuda")
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append(int(torch.cuda.utilization()))
            except Exception:  # no NVML: no samples
                return

    def __enter__(self) -> Utilisation:
        if self._on:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._on:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def prepare(label: str, tmp: Path, *, images: int, size: tuple[int, int]) -> tuple[Path, float]:
    """Write and ingest the study once; returns the catalogue file and seconds it took."""
    start = time.perf_counter()
    root = tmp / f"study-{label}"
    visits = 2
    patients = max(2, images // (visits * 2))
    workers = max(1, min(16, (torch.get_num_threads() or 1)))
    write_synthetic_study(root, patients=patients, visits=visits, seed=1, size=size,
                          reference_fraction=0.3, dicom_fraction=0.0, png_fraction=0.0,
                          workers=workers)
    db = tmp / f"{label}.sqlite3"
    factory = open_catalogue(f"sqlite:///{db}")
    ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    dispose_engines()
    return db, time.perf_counter() - start


def end_to_end(db: Path, config: RunConfig, tmp: Path) -> dict[str, Any]:
    """One `run` on a fresh copy of the ingested catalogue, timed and split by stage."""
    copy = tmp / f"run-b{config.batch_size}-t{config.decode_threads}.sqlite3"
    shutil.copyfile(db, copy)
    factory = open_catalogue(f"sqlite:///{copy}")
    plan = start_run(factory, config=config, executor="local", queue="local", chunk_size=64)
    watch = Stopwatch()
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with watch.patched(), Utilisation(config.device) as gpu:
        start = time.perf_counter()
        summary = run_in_process(factory, plan)
        seconds = time.perf_counter() - start
    dispose_engines()
    copy.unlink()
    measured = summary.measured.get("measure", 0)
    return {"seconds": seconds, "measured": measured, "failed_jobs": len(summary.failed_jobs),
            "failed_images": len(summary.failed_images), "main": dict(watch.main),
            "threads": dict(watch.threads), "gpu_util": gpu.mean,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def bench(label: str, tmp: Path, *, images: int, size: tuple[int, int], model_dir: Path,
          segmenter: str, embedder: str, batch_sizes: list[int], decode_threads: list[int],
          device: str, precision: str, peak: float | None, naive_images: int,
          forwards: bool, results: Path | None) -> None:
    db, prepared = prepare(label, tmp, images=images, size=size)
    base = RunConfig(segmenter_model=segmenter, embedder_model=embedder, prompts=K,
                     batch_size=batch_sizes[0], device=device, precision=precision,
                     model_dir=str(model_dir), decode_threads=decode_threads[0])
    queries, refs, sizes, masks = study_images(f"sqlite:///{db}")
    dispose_engines()
    n = len(queries)
    print(f"\n[{label}] {n} images {size[0]}x{size[1]} ({len(refs)} references), K={K}, "
          f"{device}, precision {precision}; study written and ingested in {prepared:.1f} s")
    # Warm-up: load the models once, as a worker does, outside the timings.
    load_embedder(embedder, model_dir=model_dir, device=device, precision=precision)
    load_segmenter(segmenter, model_dir=model_dir, device=device, precision=precision)

    t_fwd = flops = None
    if forwards:
        t_fwd, flops = forwards_only(base, queries, refs, masks, sizes)
        print(f"  forwards only  {n / t_fwd:8.2f} images/s  ({t_fwd:.2f} s, batch "
              f"{base.batch_size}); model FLOPs per image {flops / 1e9:.1f} GFLOP")
    t_naive = None
    if naive_images:
        per_ref, per_query = naive(base, queries[:naive_images], refs, masks,
                                   sizes[:naive_images])
        t_naive = (len(refs) * per_ref + n * per_query) / n
        print(f"  naive loop     {1 / t_naive:8.2f} images/s  ({per_query:.3f} s per query on "
              f"{min(naive_images, n)}, {per_ref:.3f} s per reference on "
              f"{min(FLOP_SAMPLE, len(refs))}; {len(refs)} references and {n} queries)")
    for threads in decode_threads:
        for batch in batch_sizes:
            config = RunConfig(**{**base.as_dict(), "batch_size": batch,
                                  "decode_threads": threads})
            got = end_to_end(db, config, tmp)
            rate = n / got["seconds"]
            line = (f"  end-to-end     {rate:8.2f} images/s  ({got['seconds']:.2f} s, batch "
                    f"{batch}, {threads} decode threads; {got['measured']}/{n} measured")
            if got["failed_jobs"] or got["failed_images"]:
                line += f", {got['failed_jobs']} jobs and {got['failed_images']} images failed"
            print(line + ")")
            record: dict[str, Any] = {"label": label, "device": device, "precision": precision,
                                      "images": n, "size": f"{size[0]}x{size[1]}",
                                      "batch_size": batch, "decode_threads": threads,
                                      "images_per_s": rate, **got}
            if t_fwd is not None and flops is not None:
                achieved = flops * n / got["seconds"]
                record.update(forwards_images_per_s=n / t_fwd, gflop_per_image=flops / 1e9,
                              e2e_over_forwards=got["seconds"] / t_fwd,
                              achieved_tflops=achieved / 1e12,
                              mfu=achieved / (peak * 1e12) if peak else None)
                print(f"    end-to-end / forwards = {got['seconds'] / t_fwd:.2f}  (CPU target "
                      f"<= 1.25); achieved {achieved / 1e12:.2f} TFLOP/s"
                      + (f", MFU {achieved / (peak * 1e12):.1%} of {peak:g}" if peak else ""))
            if t_naive is not None:
                record.update(naive_images_per_s=1 / t_naive,
                              speedup_over_naive=t_naive * n / got["seconds"])
                print(f"    naive / end-to-end    = {t_naive * n / got['seconds']:.2f}x  "
                      "(GPU target >= 8x)")
            main = got["main"]
            inside = sum(main.get(k, 0.0) for k in ("wait for decode", "SegGPT batches",
                                                     "DINO batches", "mask upsample", "crop",
                                                     "catalogue write"))
            split = ", ".join(f"{k} {v:.2f}"
                              for k, v in sorted(main.items(), key=lambda kv: -kv[1]))
            print(f"    main thread (s): {split}, the rest {got['seconds'] - inside:.2f}")
            print("    decode threads (thread-s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(got["threads"].items())))
            if got["gpu_util"] is not None:
                print(f"    GPU utilisation (NVML, sampled) {got['gpu_util']:.0f}%")
            if got["peak_gib"] is not None:
                print(f"    peak GPU memory allocated {got['peak_gib']:.1f} GiB")
            if results is not None:
                with results.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="images with tiny models")
    parser.add_argument("--real", type=int, default=0,
                        help="images with real-size architectures (random weights)")
    parser.add_argument("--size", default="320x240", help="photo size WxH")
    parser.add_argument("--batch-size", type=_ints, default=[8],
                        help="prompt pairs / images per forward pass; several: 8,16,32")
    parser.add_argument("--decode-threads", type=_ints, default=[Settings().decode_threads],
                        help="threads decoding images; several: 8,16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--naive-images", type=int, default=32,
                        help="queries the naive loop runs on (0: skip it)")
    parser.add_argument("--no-forwards", action="store_true", help="skip the forwards-only run")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder to keep the real-size random-weight models in (made if "
                             "missing), so several runs share them")
    parser.add_argument("--memory-fraction", type=float, default=None,
                        help="cap this process's share of the GPU memory (CUDA only)")
    parser.add_argument("--results", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    assert len(size) == 2
    if args.memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    common: dict[str, Any] = {
        "size": (size[0], size[1]), "batch_sizes": args.batch_size,
        "decode_threads": args.decode_threads, "device": args.device,
        "precision": args.precision, "peak": args.peak_tflops, "naive_images": args.naive_images,
        "forwards": not args.no_forwards, "results": args.results,
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.images:
            models = tmp / "models"
            make_tiny_models(models)
            bench("tiny", tmp, images=args.images, model_dir=models, segmenter="tiny-seggpt",
                  embedder="tiny-dino", **common)
        if args.real:
            clear_model_cache()
            models = args.model_dir or tmp / "real-models"
            if not (models / "seggpt-vit-large").exists():
                make_real_size_models(models)
            bench("real-size", tmp, images=args.real, model_dir=models,
                  segmenter="seggpt-vit-large", embedder="dino-vitb16", **common)


if __name__ == "__main__":
    main()
