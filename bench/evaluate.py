"""Benchmark: `eczema-batch evaluate --folds 5 --repeats 3` on 500 synthetic images, tiny models.

Prints the wall time of a cold evaluation (empty feature cache) and of the same command again
(warm), the model forwards each made, and the forwards a per-fold recomputation would need
(every repeat x fold x segmenter mode embedding, segmenting and cropping its images afresh).
Target: the cache cuts forwards by at least 3x.

    python -m bench.evaluate                         # 500 images, SQLite in a temporary folder
    python -m bench.evaluate --threads 1 -- --lr 1e-2 --epochs 300   # extra evaluate options

With --workdir an existing folder is reused as it is: its cache may already be warm.

The tiny models have random weights: their F1 and Dice say the plumbing works, not that the
method does. Their forwards are cheap, so the wall time here is mostly training heads and
bootstrapping; with SegGPT-L a segmenter query costs ~12 s on this CPU (DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eczema_batch.catalogue.db import dispose_engines, open_catalogue
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.tiny import make_tiny_models
from eczema_batch.synth import write_synthetic_study
from eczema_batch.training.results import EvaluationReport

VISITS = 5
IMAGES_PER_VISIT = 2


def prepare(workdir: Path, images: int, database_url: str) -> None:
    patients = max(1, images // (VISITS * IMAGES_PER_VISIT))
    study = workdir / "study"
    write_synthetic_study(study, patients=patients, visits=VISITS, seed=0,
                          images_per_visit=IMAGES_PER_VISIT)
    factory = open_catalogue(database_url, auto_migrate=True)  # a scratch catalogue
    report = ingest_study(study, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    print(f"study: {report.catalogued} images of {patients} patients", file=sys.stderr)
    dispose_engines()
    make_tiny_models(workdir / "models")


@dataclass(frozen=True)
class Timed:
    report: EvaluationReport
    #: the whole command, process start-up and model loading included
    wall_seconds: float


def evaluate(workdir: Path, env: dict[str, str], name: str, extra: list[str]) -> Timed:
    out = workdir / f"{name}.json"
    command = [
        sys.executable, "-m", "eczema_batch", "evaluate", "--folds", "5", "--repeats", "3",
        "--segmenter-model", "tiny-seggpt", "--embedder-model", "tiny-dino",
        "--model-dir", str(workdir / "models"), "--output", str(out), *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return Timed(EvaluationReport.from_dict(json.loads(out.read_text())), wall)


def print_figures(cold: Timed, warm: Timed, extra: list[str]) -> None:
    report = cold.report
    naive, data = report.run.naive_forwards, report.data
    print(f"evaluate --folds 5 --repeats 3 {' '.join(extra)}".rstrip())
    print(f"  {data.images} images, {data.patients} patients, "
          f"{data.references} references, {data.splits} splits, "
          f"segmenter modes {', '.join(report.results)}")
    print(f"  {'run':<6}{'wall s':>9}{'embedder':>10}{'segmenter':>11}")
    for label, timed in (("cold", cold), ("warm", warm)):
        f = timed.report.run.forwards
        print(f"  {label:<6}{timed.wall_seconds:>9.1f}{f.embedder_images:>10}"
              f"{f.segmenter_queries:>11}")
    print(f"  {'naive':<6}{'':>9}{naive.embedder_images:>10}{naive.segmenter_queries:>11}")
    f = report.run.forwards
    for model, done, needed in (("embedder", f.embedder_images, naive.embedder_images),
                                ("segmenter", f.segmenter_queries, naive.segmenter_queries)):
        print(f"  cache cuts {model} forwards {needed / max(done, 1):.1f}x "
              "(cold run vs per-fold recomputation)")
    total = naive.embedder_images + naive.segmenter_queries
    done = f.embedder_images + f.segmenter_queries
    print(f"  all forwards: {total} naive vs {done} cached = {total / max(done, 1):.1f}x")
    print(f"  cold phases (s): {dict(report.run.seconds)}")
    for mode, methods in report.results.items():
        f1 = {name: m.summary.weighted_f1 for name, m in methods.items()}
        scores = ", ".join(f"{n} {s.mean:.3f}±{s.std:.3f}" for n, s in f1.items())
        print(f"  weighted F1 ({mode}): {scores}")
    seg = report.segmentation
    if seg is not None:
        print(f"  SegGPT vs manual masks: Dice {seg.dice.mean:.3f}, "
              f"IoU {seg.iou.mean:.3f} ({seg.images} references)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--database-url", help="default: SQLite in the work folder")
    parser.add_argument("--threads", type=int, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("extra", nargs="*", help="more `evaluate` options, after --")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{(workdir / 'catalogue.sqlite3').resolve()}"
    env = {**os.environ, "ECZEMA_BATCH_DATABASE_URL": url,
           "ECZEMA_BATCH_HOME": str(workdir / "home")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        if not (workdir / "study").exists():
            os.environ.update(ECZEMA_BATCH_DATABASE_URL=url)
            prepare(workdir, args.images, url)
        cold = evaluate(workdir, env, "cold", args.extra)
        warm = evaluate(workdir, env, "warm", args.extra)
        print_figures(cold, warm, args.extra)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
