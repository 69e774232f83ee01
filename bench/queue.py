"""Celery workers against the in-process executor, measured in the same run.

Writes a synthetic study (2,000 images of 64x48 by default), catalogues it in a fresh PostgreSQL
schema, makes the tiny models, then measures every image three ways, clearing the results in
between: in this process (`run` without --queue), with one Celery worker and with two, on a
private Redis queue. --repeat rounds of that; the best time of each is reported (the machine is
shared: the best run is the least disturbed one). Each timing runs from planning to the last job
done (the Celery ones include sending the ids and polling the catalogue); starting a worker is not
timed, loading the models is (in every executor: each Celery timing starts fresh workers).
Prints images/s and the ratios (targets: one worker's time per image within 1.10x of in-process;
two workers >= 1.7x one worker's throughput), and, for scale, how much two CPU-bound processes
gain over one on the machine at that moment.

Torch runs one thread per process by default (--threads): with models this small, more threads
only fight over the cores, and two workers on a 2-core machine must not ask for four.

    python -m bench.queue [--images 2000] [--repeat 2] [--chunk-size 64] [--threads 1]
        [--postgres postgresql+psycopg://127.0.0.1:5432/test] [--redis redis://127.0.0.1:6379/14]

(`python bench/queue.py ...` works too: the script keeps its own folder off the import path.)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder leads the import path, and the file is named like the
# standard library's `queue` (which torch and concurrent.futures import): drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_worker(queue: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eczema_batch", "worker", "--queue", queue, "--concurrency",
             "1", "--hostname", f"bench-{log.stem}@%h"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


#: A CPU-bound process of a second or two (pure Python, one core).
SPIN = "x = 0\nfor i in range(15_000_000):\n    x += i\n"


def parallel_headroom() -> float:
    """How much faster two CPU-bound processes go than one, on this machine right now.

    2.0 on two idle cores; less when something else is using them (a shared machine).
    """
    def spin(n: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL)
                 for _ in range(n)]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - start

    one = spin(1)
    return 2 * one / spin(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds of the three timings; the best of each is reported")
    parser.add_argument("--postgres", default=os.environ.get(
        "ECZEMA_BATCH_TEST_POSTGRES_URL", "postgresql+psycopg://127.0.0.1:5432/test"))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="eb-bench-queue-"))
    schema = f"eb_bench_{uuid.uuid4().hex[:8]}"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in args.postgres else "?"
    url = f"{args.postgres}{sep}options=-csearch_path%3D{schema}"
    env = {
        **os.environ,
        "ECZEMA_BATCH_DATABASE_URL": url,
        "ECZEMA_BATCH_BROKER_URL": args.redis,
        "ECZEMA_BATCH_MODEL_DIR": str(work / "models"),
        "ECZEMA_BATCH_SEGMENTER_MODEL": "tiny-seggpt",
        "ECZEMA_BATCH_EMBEDDER_MODEL": "tiny-dino",
        "ECZEMA_BATCH_DEVICE": "cpu",
        "ECZEMA_BATCH_CHUNK_SIZE": str(args.chunk_size),
        "ECZEMA_BATCH_HOME": str(work / "home"),
        "OMP_NUM_THREADS": str(args.threads),
    }
    os.environ.update(env)  # before torch is imported, so that this process uses them too

    import torch
    import transformers
    from eczema_batch_workers.celery_app import job_sender
    from sqlalchemy import create_engine, delete, func, select, text
    from sqlalchemy.orm import Session, sessionmaker

    from eczema_batch.catalogue.db import dispose_engines, get_engine, open_catalogue, upgrade
    from eczema_batch.catalogue.models import Embedding, Job, Mask, Prediction, Run
    from eczema_batch.config import get_settings
    from eczema_batch.ingest.service import ingest_study
    from eczema_batch.jobs import follow
    from eczema_batch.jobs.local import run_in_process
    from eczema_batch.jobs.runs import start_run
    from eczema_batch.jobs.states import JobState
    from eczema_batch.measuring.config import RunConfig
    from eczema_batch.measuring.runtime import get_runtime
    from eczema_batch.pipeline.loading import clear_model_cache
    from eczema_batch.pipeline.tiny import make_tiny_models
    from eczema_batch.synth import write_synthetic_study

    torch.set_num_threads(args.threads)
    # What a worker's parent process imports before forking its pool (workers/celery_app.py).
    transformers.SegGptForImageSegmentation, transformers.ViTModel  # noqa: B018
    get_settings.cache_clear()
    settings = get_settings()

    per_patient = 5 * 4
    patients = math.ceil(args.images / per_patient)
    print(f"writing {patients * per_patient} images of 64x48 ...", flush=True)
    write_synthetic_study(work / "study", patients=patients, visits=5, images_per_visit=4,
                          size=(64, 48), workers=2)
    make_tiny_models(work / "models")
    admin = create_engine(args.postgres)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(get_engine(url))
        factory = open_catalogue(url)
        report = ingest_study(work / "study", factory=factory, max_pixels=10**8, processes=2)
        images = report.catalogued
        with get_engine(url).begin() as conn:  # fresh statistics: no autovacuum mid-timing
            conn.execute(text("ANALYZE"))
        print(f"catalogued {images} images in schema {schema}", flush=True)
        config = RunConfig.from_settings(settings)

        def clear(session_factory: sessionmaker[Session]) -> None:
            with session_factory.begin() as session:
                for model in (Prediction, Embedding, Job, Run):
                    session.execute(delete(model))
                session.execute(delete(Mask).where(Mask.kind == "predicted"))

        def crops() -> int:
            with factory() as session:
                return session.scalar(select(func.count(Embedding.id))
                                      .where(Embedding.region == "crop")) or 0

        def in_process() -> None:
            # Load the models again, as every fresh worker does.
            clear_model_cache()
            get_runtime.cache_clear()
            plan = start_run(factory, config=config, executor="local", queue="local",
                             chunk_size=args.chunk_size)
            run_in_process(factory, plan)

        def on_celery() -> None:
            with job_sender(args.redis) as send:
                plan = start_run(factory, config=config, executor="celery", queue=queue,
                                 chunk_size=args.chunk_size)
                tracked = follow.track(factory, plan)
                follow.dispatch_plan(factory, plan, queue=queue, send=send)
            final = follow.wait_for_jobs(factory, tracked, poll_seconds=0.2)
            assert final.finished and final.jobs.get(JobState.FAILED, 0) == 0, final

        timings: dict[str, list[float]] = {"in process": [], "1 worker": [], "2 workers": []}
        headroom: list[float] = []
        for rep in range(args.repeat):
            for name in timings:
                clear(factory)
                # Fresh workers for every timing: each pays for loading the models in each process.
                count = {"in process": 0, "1 worker": 1, "2 workers": 2}[name]
                workers += [start_worker(queue, env, work / f"worker-{rep}-{name[0]}-{i}.log")
                            for i in range(count)]
                if count == 2:
                    headroom.append(parallel_headroom())
                print(f"round {rep + 1}: {name} ...", flush=True)
                timings[name].append(timed(on_celery if count else in_process))
                assert crops() == images, crops()
                while workers:
                    stop_worker(workers.pop())
    finally:
        for proc in workers:
            stop_worker(proc)
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()
        import redis

        # The queue and the binding keys its workers declared.
        redis.Redis.from_url(args.redis).delete(queue, f"_kombu.binding.{queue}",
                                               f"_kombu.binding_permanent.{queue}")
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{images} images, chunks of {args.chunk_size}, {args.threads} torch thread(s) per "
          f"process, {os.cpu_count()} cores; best of {args.repeat}")
    best = {name: min(times) for name, times in timings.items()}
    for name, seconds in best.items():
        every = ", ".join(f"{t:.1f}" for t in timings[name])
        print(f"  {name:11} {seconds:7.1f} s  {images / seconds:7.1f} images/s  "
              f"{1000 * seconds / images:6.1f} ms/image   (runs: {every} s)")
    one_vs_local = best["1 worker"] / best["in process"]
    two_vs_one = best["1 worker"] / best["2 workers"]
    print(f"  1 worker / in process, time per image: {one_vs_local:.3f}x (target <= 1.10)")
    print(f"  2 workers / 1 worker, throughput:      {two_vs_one:.2f}x (target >= 1.70)")
    print(f"  for scale: 2 busy-loop processes / 1 on this machine just before: "
          f"{', '.join(f'{h:.2f}x' for h in headroom)} (2.00 on idle cores)")

if __name__ == "__main__":
    main()
