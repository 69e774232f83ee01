"""Benchmark: `models tune-segmenter` with its defaults on ~200 synthetic images, tiny models.

Writes a synthetic study with its truth, ingests it, makes the tiny models, tunes tiny-seggpt
with no option beyond --name/--from, then runs `eczema-batch run` once with the base and once
with the tuned segmenter and compares the catalogue's predicted masks with the TRUE masks of
every image of the held-out patients (those the tuned model's identity lists), Dice and IoU.

    python -m bench.tune_segmenter                    # 200 images, SQLite in a temporary folder
    python -m bench.tune_segmenter --workdir /tmp/tune --threads 1
    python -m bench.tune_segmenter --image-size 16 --epochs 150   # the old 16 px default

The tiny SegGPT is made at 16x16 pixels per image and tuned at 32 by default (--image-size): a
lesion smaller than a model pixel cannot be found, which caps the mean Dice (the script prints
that ceiling, the true masks sampled down and back up as the Segmenter does, at 16 px and at the
tuned size: 0.80 and 0.89 on the held-out patients of the default study).

Measured (two loaded shared cores), run Dice vs the true masks of the 4 held-out patients:
base 0.15; 16 px / 150 epochs 0.49 (601 s); 32 px / 60 epochs 0.53 (267 s); 32 px / 150 epochs,
the default, 0.73 (722 s, 26.6 pairs/s). README, "Tuning the segmenter on the study's masks".
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
from pathlib import Path

import numpy as np
from sqlalchemy import select

from eczema_batch.catalogue.db import dispose_engines, open_catalogue
from eczema_batch.catalogue.models import Image, Mask, Model, Patient, Study, Visit
from eczema_batch.config import DEFAULT_MAX_IMAGE_PIXELS
from eczema_batch.imaging import decode_mask_png
from eczema_batch.ingest.service import ingest_study
from eczema_batch.pipeline.derived import read_identity
from eczema_batch.pipeline.maskscore import OverlapSummary, summarise
from eczema_batch.pipeline.preprocess import nearest_exact
from eczema_batch.pipeline.segment import upsample_nearest
from eczema_batch.pipeline.tiny import make_tiny_models
from eczema_batch.synth import write_synthetic_study

VISITS = 4
IMAGES_PER_VISIT = 2
TUNED = "seggpt-tuned"


def prepare(workdir: Path, images: int, database_url: str) -> None:
    patients = max(3, images // (VISITS * IMAGES_PER_VISIT))
    write_synthetic_study(workdir / "study", patients=patients, visits=VISITS, seed=0,
                          images_per_visit=IMAGES_PER_VISIT, truth=workdir / "truth")
    factory = open_catalogue(database_url, auto_migrate=True)
    report = ingest_study(workdir / "study", factory=factory,
                          max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    print(f"study: {report.catalogued} images of {patients} patients", file=sys.stderr)
    dispose_engines()
    make_tiny_models(workdir / "models")


def cli(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "eczema_batch", *args], env=env, check=True)
    return time.perf_counter() - started


def held_out_scores(database_url: str, workdir: Path, segmenter: str,
                    patients: set[tuple[str, str]]) -> OverlapSummary:
    """Predicted masks of `segmenter` vs the true masks, every image of `patients`."""
    factory = open_catalogue(database_url)
    stmt = (
        select(Image.path, Study.name, Patient.subject_code, Mask.png)
        .join(Visit, Image.visit_id == Visit.id).join(Patient, Visit.patient_id == Patient.id)
        .join(Study, Image.study_id == Study.id)
        .join(Mask, Mask.image_id == Image.id).join(Model, Mask.model_id == Model.id)
        .where(Mask.kind == "predicted", Model.name == segmenter)
    )
    pairs = []
    with factory() as session:
        for path, study, subject, png in session.execute(stmt):
            if (study, subject) not in patients:
                continue
            truth = decode_mask_png(
                (workdir / "truth" / f"{Path(path).with_suffix('')}.mask.png").read_bytes())
            pairs.append((decode_mask_png(png), truth))
    dispose_engines()
    return summarise(pairs)


def ceiling(workdir: Path, paths: list[Path], size: int = 16) -> float:
    values = []
    for path in paths:
        truth = decode_mask_png(path.read_bytes())
        small = upsample_nearest(nearest_exact(truth, (size, size)), truth.shape)
        values.append(summarise([(small, truth)]).dice)
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--threads", type=int, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--image-size", type=int,
                        help="tune-segmenter --image-size (default: the command's own)")
    parser.add_argument("--epochs", type=int,
                        help="tune-segmenter --epochs (default: the command's own)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(workdir / 'catalogue.sqlite3').resolve()}"
    env = {**os.environ, "ECZEMA_BATCH_DATABASE_URL": url,
           "ECZEMA_BATCH_HOME": str(workdir / "home"),
           "ECZEMA_BATCH_MODEL_DIR": str(workdir / "models"),
           "ECZEMA_BATCH_EMBEDDER_MODEL": "tiny-dino"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        if not (workdir / "study").exists():
            prepare(workdir, args.images, url)
        size = ["--image-size", str(args.image_size)] if args.image_size else []
        size += ["--epochs", str(args.epochs)] if args.epochs else []
        tune_s = cli(env, "models", "tune-segmenter", "--name", TUNED, "--from", "tiny-seggpt",
                     "--replace", *size)
        identity = read_identity(workdir / "models" / TUNED)
        assert identity is not None
        held = {(p.study, p.subject) for p in identity.holdout}
        results = {}
        for segmenter in ("tiny-seggpt", TUNED):
            run_s = cli({**env, "ECZEMA_BATCH_SEGMENTER_MODEL": segmenter}, "run")
            score = held_out_scores(url, workdir, segmenter, held)
            results[segmenter] = {**score.as_dict(), "run_seconds": round(run_s, 1)}
            results[segmenter].pop("per_image_dice")
        held_truths = [p for p in (workdir / "truth").rglob("*.mask.png")
                       if (identity.holdout[0].study, p.relative_to(workdir / "truth").parts[0])
                       in held]
        print(json.dumps({
            "tune_seconds": round(tune_s, 1), "held_out_patients": sorted(held),
            "image_size": identity.settings.get("image_size", 16),
            "tuning_seconds": round(identity.extra["seconds"], 1),
            "pairs_per_second": round(identity.extra["pairs_per_second"], 1),
            "tune_identity_held_out": identity.extra["held_out"],
            "ceiling_dice_16px": ceiling(workdir, held_truths),
            "ceiling_dice_tuned_size": ceiling(workdir, held_truths,
                                               int(identity.settings.get("image_size", 16))),
            "true_masks_on_held_out_patients": results,
        }, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
