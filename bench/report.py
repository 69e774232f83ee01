"""Benchmark: the cohort report and the visit-level export on a large catalogue.

Builds a catalogue of PATIENTS x VISITS x IMAGES (10,000 x 10 x 3 = 300,000 predictions, each with
its predicted mask and crop embedding, 1% of images reviewed, 2% of masks flagged) by bulk insert,
on SQLite and on PostgreSQL, then measures in the same run:

- `report`: building the cohort report (every patient's trend and the cohort summary), and
  one patient's report;
- `export --level visit`: CSV rows/s, next to a plain SQL dump of the same visit aggregates by the
  database's own client (`sqlite3 -csv` / psql `COPY (...) TO STDOUT`), using the SQL the export
  runs, so the ratio is what eczema-batch adds on top of the database.

Targets: cohort report <= 2 s; export within 2x of the plain dump.

    python -m bench.report                          # both backends, full size
    python -m bench.report --scale 0.1 --backend sqlite
    python -m bench.report --postgres-url postgresql+psycopg://127.0.0.1:5432/test
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/report.py` puts bench/ first on sys.path, where bench/queue.py would shadow the
# standard library's queue module (psycopg imports it).
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import datetime as dt
import io
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from eczema_batch.catalogue.db import dispose_engines, get_engine, open_catalogue, upgrade
from eczema_batch.imaging import encode_mask_png
from eczema_batch.report.cohort import build_report
from eczema_batch.report.export import export_table
from eczema_batch.report.queries import (
    PG_WORK_MEM,
    ReviewThresholds,
    choose_head,
    visit_scores_select,
)
from eczema_batch.report.trends import TrendRules

PATIENTS, VISITS, IMAGES = 10_000, 10, 3
SITES = ("left-arm", "right-arm", "trunk", "left-leg", "right-leg", "face")
FLAG = "SegGPT found no lesion: the whole image was used"
TABLE_COLUMNS = {
    "studies": ("id", "name", "root"),
    "models": ("id", "kind", "name", "digest", "config"),
    "heads": ("id", "name", "classes", "embedder_model_id", "segmenter_model_id",
              "segmenter_mode", "settings", "metrics", "training_image_ids", "weights", "digest",
              "active"),
    "patients": ("id", "study_id", "subject_code", "code_source"),
    "visits": ("id", "patient_id", "label", "visit_date", "date_source"),
    "images": ("id", "study_id", "visit_id", "sha256", "path", "format", "size_bytes", "width",
               "height", "frames", "body_site", "decode_status"),
    "masks": ("id", "image_id", "kind", "variant", "model_id", "prompt_ids",
              "prompt_similarities", "prompt_similarity", "width", "height", "area_fraction",
              "png", "flag"),
    "embeddings": ("id", "image_id", "model_id", "region", "variant", "mask_id", "dim", "vector"),
    "predictions": ("id", "image_id", "head_id", "embedding_id", "severity", "probabilities"),
    "labels": ("id", "image_id", "severity", "source", "rater", "note"),
}


def generate(patients: int, seed: int = 0) -> dict[str, list[tuple[Any, ...]]]:
    """Rows per table: each patient improves, stays or worsens, with noisy probabilities."""
    rng = np.random.default_rng(seed)
    png = encode_mask_png(np.zeros((240, 320), dtype=bool))
    rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLE_COLUMNS}
    rows["studies"].append((1, "bench", "/nonexistent"))
    rows["models"] += [(1, "embedder", "dino-vitb16", "e" * 64, "{}"),
                       (2, "segmenter", "seggpt-vit-large", "s" * 64, "{}")]
    rows["heads"].append((1, "bench-head", '["clear", "mild", "moderate", "severe"]', 1, 2,
                          "seggpt", "{}", "{}", "[]", b"w", "h" * 64, True))
    n_visits = patients * VISITS
    n_images = n_visits * IMAGES
    start = dt.date(2024, 1, 15)
    slopes = rng.choice([-0.25, 0.0, 0.2], size=patients)
    base = rng.uniform(0.5, 3.0, size=patients)
    jitter = rng.integers(-3, 4, size=n_visits)
    noise = rng.normal(0, 0.5, size=n_images)
    flagged = rng.random(n_images) < 0.02
    reviewed = rng.random(n_images) < 0.01
    sims = np.round(rng.uniform(0.3, 0.95, size=(n_images, 2)), 4)
    sims.sort(axis=1)
    site_idx = rng.integers(0, len(SITES), size=n_images)
    classes = np.arange(4)
    for p in range(patients):
        pid = p + 1
        rows["patients"].append((pid, 1, f"B{pid:06d}", "manifest"))
        for v in range(VISITS):
            vid = p * VISITS + v + 1
            day = start + dt.timedelta(days=28 * v + int(jitter[vid - 1]))
            rows["visits"].append((vid, pid, day.isoformat(), day, "manifest"))
            for i in range(IMAGES):
                iid = (vid - 1) * IMAGES + i + 1
                centre = float(np.clip(base[p] + slopes[p] * v + noise[iid - 1], 0, 3))
                logits = -((classes - centre) ** 2)
                probs = np.exp(logits) / np.exp(logits).sum()
                probs = np.round(probs, 4)
                severity = int(np.argmax(probs))
                rows["images"].append((iid, 1, vid, f"{iid:064x}", f"B{pid:06d}/{v}/{i}.jpg",
                                       "jpeg", 100_000, 320, 240, 1, SITES[site_idx[iid - 1]],
                                       "ok"))
                rows["masks"].append((iid, iid, "predicted", "seggpt:2:k2", 2, "[1, 2]",
                                      json.dumps(sims[iid - 1, ::-1].tolist()),
                                      float(sims[iid - 1].mean()), 320, 240, 0.2,
                                      png, FLAG if flagged[iid - 1] else None))
                rows["embeddings"].append((iid, iid, 1, "crop", "seggpt:2:k2", iid, 2, b"\0" * 8))
                rows["predictions"].append((iid, iid, 1, iid, severity,
                                            json.dumps(probs.tolist())))
                if reviewed[iid - 1]:
                    rows["labels"].append((len(rows["labels"]) + 1, iid, min(severity + 1, 3),
                                           "review", "bench-rater", None))
    return rows


def load_sqlite(path: Path, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    with conn:
        for table, columns in TABLE_COLUMNS.items():
            marks = ", ".join("?" * len(columns))
            conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                             rows[table])
    conn.execute("ANALYZE")
    conn.close()


def load_postgres(url: str, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    engine = create_engine(url)
    with engine.begin() as sa_conn:
        raw: Any = sa_conn.connection.driver_connection
        with raw.cursor() as cursor:
            for table, columns in TABLE_COLUMNS.items():
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows[table]:
                        copy.write_row(row)
                cursor.execute(  # the sequences must follow the ids written by hand
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 1) FROM {table}))")
        sa_conn.execute(text("ANALYZE"))
    engine.dispose()


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall-clock seconds of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def cpu_timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best CPU seconds of this process and its children (a shared machine's load aside)."""
    best = float("inf")
    for _ in range(repeat):
        before = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        fn()
        after = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        children = (after[1].ru_utime + after[1].ru_stime) - (before[1].ru_utime
                                                              + before[1].ru_stime)
        best = min(best, after[0] - before[0] + children)
    return best


def plain_sql(url: str) -> str:
    """The export's visit aggregate as literal SQL, for the database's own client."""
    factory = open_catalogue(url)
    with factory() as session:
        head = choose_head(session)
        stmt = visit_scores_select(session, head=head, thresholds=ReviewThresholds())
        dialect = session.get_bind().dialect
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def plain_dump(url: str, out: Path) -> int:
    parsed = make_url(url)
    sql = plain_sql(url).replace("\n", " ")
    with out.open("wb") as handle:
        if parsed.get_backend_name() == "sqlite":
            subprocess.run(["sqlite3", "-csv", "-header", str(parsed.database), sql],
                           stdout=handle, check=True)
        else:
            libpq = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            # The same settings the export's transaction gets (report.queries._stream): sort
            # memory, and no JIT, so the ratio compares like with like.
            subprocess.run(["psql", "-X", "-q", libpq, "-c", f"SET work_mem = '{PG_WORK_MEM}'",
                            "-c", "SET jit = off",
                            "-c", f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER)"],
                           stdout=handle, check=True)
    with out.open("rb") as handle:
        return sum(1 for _ in handle) - 1


def measure(url: str, workdir: Path) -> dict[str, Any]:
    rules, thresholds = TrendRules(), ReviewThresholds()
    factory = open_catalogue(url)
    result: dict[str, Any] = {}

    def report() -> Any:
        with factory() as session:
            return build_report(session, rules=rules, thresholds=thresholds)

    result["report_s"], cohort = timed(report, repeat=3)
    result["patients"] = cohort.summary.patients
    # One patient's report (`report --patient P`): its images only, never the whole cohort's.
    middle = cohort.patients[len(cohort.patients) // 2].key.patient

    def one_patient() -> Any:
        with factory() as session:
            return build_report(session, rules=rules, thresholds=thresholds, patient=middle)

    result["patient_report_s"], _ = timed(one_patient, repeat=3)

    def export() -> int:
        with factory() as session, (workdir / "export.csv").open("w", newline="") as out:
            return export_table(session, out, level="visit", rules=rules,
                                thresholds=thresholds).rows

    result["export_s"], rows = timed(export, repeat=3)
    result["export_rows"] = rows
    result["dump_s"], dumped = timed(lambda: plain_dump(url, workdir / "dump.csv"), repeat=3)
    result["dump_rows"] = dumped
    result["export_rows_per_s"] = rows / result["export_s"]
    result["dump_rows_per_s"] = dumped / result["dump_s"]
    result["export_over_dump"] = result["export_s"] / result["dump_s"]
    if make_url(url).get_backend_name() == "sqlite":
        # Both sides run the SQL in a process we can account (no server): CPU seconds compare
        # fairly even while other work shares the machine.
        result["report_cpu_s"] = cpu_timed(report, repeat=3)
        result["export_cpu_s"] = cpu_timed(export, repeat=3)
        result["dump_cpu_s"] = cpu_timed(lambda: plain_dump(url, workdir / "dump.csv"), repeat=3)
        result["export_over_dump_cpu"] = result["export_cpu_s"] / result["dump_cpu_s"]
    return result


def postgres_schema(base: str) -> Iterator[str]:
    schema = f"bench_report_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run_backend(name: str, rows: dict[str, list[tuple[Any, ...]]], args: argparse.Namespace,
                workdir: Path) -> dict[str, Any]:
    if name == "sqlite":
        path = workdir / "catalogue.sqlite3"
        url = f"sqlite:///{path}"
        upgrade(get_engine(url))
        dispose_engines()
        load_s, _ = timed(lambda: load_sqlite(path, rows))
        return {"backend": name, "load_s": load_s, **measure(url, workdir)}
    schemas = postgres_schema(args.postgres_url)
    url = next(schemas)
    try:
        upgrade(get_engine(url))
        load_s, _ = timed(lambda: load_postgres(url, rows))
        return {"backend": name, "load_s": load_s, **measure(url, workdir)}
    finally:
        next(schemas, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the 10,000 patients (visits and images stay 10 and 3)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "ECZEMA_BATCH_TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if shutil.which("sqlite3") is None or shutil.which("psql") is None:
        print("note: the plain dump needs the sqlite3 and psql clients", file=sys.stderr)
    patients = max(1, round(PATIENTS * args.scale))
    gen_s, rows = timed(lambda: generate(patients))
    print(f"generated {patients} patients x {VISITS} visits x {IMAGES} images "
          f"({len(rows['predictions'])} predictions) in {gen_s:.1f} s", file=sys.stderr)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for name in backends:
        with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
            results.append(run_backend(name, rows, args, Path(tmp)))
        dispose_engines()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    out = io.StringIO()
    out.write(f"{'backend':<11}{'load s':>8}{'report s':>10}{'export s':>10}{'rows/s':>10}"
              f"{'dump s':>9}{'rows/s':>10}{'export/dump':>13}\n")
    for r in results:
        out.write(f"{r['backend']:<11}{r['load_s']:>8.1f}{r['report_s']:>10.2f}"
                  f"{r['export_s']:>10.2f}{r['export_rows_per_s']:>10.0f}{r['dump_s']:>9.2f}"
                  f"{r['dump_rows_per_s']:>10.0f}{r['export_over_dump']:>13.2f}\n")
    for r in results:
        if "export_over_dump_cpu" in r:
            out.write(f"{r['backend']} CPU seconds: report {r['report_cpu_s']:.2f}, export "
                      f"{r['export_cpu_s']:.2f}, dump {r['dump_cpu_s']:.2f}, export/dump "
                      f"{r['export_over_dump_cpu']:.2f}\n")
    for r in results:
        out.write(f"{r['backend']}: one patient's report {r['patient_report_s'] * 1000:.0f} ms\n")
    out.write(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              "targets: report <= 2 s, export/dump <= 2.0 (best of 3 runs each)\n")
    print(out.getvalue(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
