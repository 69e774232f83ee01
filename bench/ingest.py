"""Ingest throughput against a raw baseline measured in the same run.

Baseline: read + SHA-256 + full decode of the same files (images, and the manual mask files)
in one process, no catalogue. Then
`ingest_study` into a fresh SQLite file and (when reachable) a fresh PostgreSQL schema. Prints
files/s and the ratio ingest time / baseline time, in `--rounds` rounds (each with its own
baseline), and the median ratio (targets: <= 1.15 on SQLite, <= 1.3 on PostgreSQL).

    python -m bench.ingest [--images 5000] [--size 320x240] [--rounds 3]
        [--postgres postgresql+psycopg://127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from PIL import Image
from sqlalchemy import create_engine, text

from eczema_batch.catalogue.db import dispose_engines, open_catalogue
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging import decode_bytes
from eczema_batch.ingest.scan import scan_study
from eczema_batch.ingest.service import ingest_study
from eczema_batch.synth import write_synthetic_study


def baseline(root: Path) -> tuple[float, int]:
    """Read + hash + full decode of every image, and read + decode of every mask file."""
    scan = scan_study(root)
    files = sorted(scan.images.values())
    masks = sorted(scan.mask_files.values())
    start = time.perf_counter()
    for path in files:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        decode_bytes(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    for path in masks:
        with Image.open(path) as mask:
            mask.load()
    return time.perf_counter() - start, len(files)


def timed_ingest(root: Path, url: str) -> tuple[float, int]:
    factory = open_catalogue(url, auto_migrate=True)  # a scratch schema of its own
    start = time.perf_counter()
    report = ingest_study(root, factory=factory, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    elapsed = time.perf_counter() - start
    dispose_engines()
    return elapsed, report.catalogued


def postgres_schema(url: str) -> tuple[str, str] | None:
    try:
        engine = create_engine(url)
        schema = f"eb_bench_{uuid.uuid4().hex[:8]}"
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        engine.dispose()
    except Exception as exc:
        print(f"postgresql: skipped ({str(exc).splitlines()[0]})")
        return None
    sep = "&" if "?" in url else "?"
    return schema, f"{url}{sep}options=-csearch_path%3D{schema}"


def drop_schema(url: str, schema: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--postgres", default="postgresql+psycopg://127.0.0.1:5432/test")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--rounds", type=int, default=3,
                        help="baseline and ingests timed this many times, in turn")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "study"
        visits = 5
        patients = math.ceil(args.images / (visits * 2))
        summary = write_synthetic_study(root, patients=patients, visits=visits, seed=0,
                                        size=(width, height), workers=2)
        print(f"study: {summary.images} images ({summary.dicom} DICOM), {width}x{height}")
        ratios: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for round_ in range(1, args.rounds + 1):
            # Each round times the baseline again right before the ingests it is compared with:
            # the machine's speed drifts between rounds, the ratio less so.
            base, n = baseline(root)
            print(f"round {round_}: baseline (read+sha256+decode, 1 process): "
                  f"{n / base:8.1f} files/s  {base:6.2f} s")
            took, catalogued = timed_ingest(root, f"sqlite:///{tmp}/catalogue{round_}.sqlite3")
            assert catalogued == n, (catalogued, n)
            ratios["sqlite"].append(took / base)
            print(f"  ingest sqlite:     {n / took:8.1f} files/s  {took:6.2f} s  "
                  f"ratio {took / base:.2f}")
            made = postgres_schema(args.postgres)
            if made is None:
                continue
            schema, url = made
            try:
                took, catalogued = timed_ingest(root, url)
            finally:
                drop_schema(args.postgres, schema)
            assert catalogued == n, (catalogued, n)
            ratios["postgresql"].append(took / base)
            print(f"  ingest postgresql: {n / took:8.1f} files/s  {took:6.2f} s  "
                  f"ratio {took / base:.2f}")
        for name, target in (("sqlite", 1.15), ("postgresql", 1.3)):
            if ratios[name]:
                print(f"ingest {name}: median ratio {statistics.median(ratios[name]):.2f} over "
                      f"{len(ratios[name])} rounds (target <= {target})")

if __name__ == "__main__":
    main()
