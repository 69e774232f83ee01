"""Benchmark: does the tool measure? A synthetic study with known truth, tiny models adapted to it.

Stages, each a real `eczema-batch` command on a scratch SQLite catalogue (wall time of each):

1. `synth --truth`: a study of about 200 photographs with the true lesion mask of every image,
   each patient's trend and skin type (truth outside the study folder), then `ingest`;
2. `models make-tiny`, then `models adapt-embedder` (self-supervised DINO on every image, no
   labels) and `models tune-segmenter` (SegGPT on the manual masks, a share of patients held
   out), each with its defaults;
3. `run` with the adapted embedder and the tuned segmenter, `train` with the default settings,
   `run` again (the head's predictions), `report` (each patient's trend status);
4. `evaluate` with the default settings, the frozen and the adapted embedder side by side; and
   again under `--segmenter none`, where no patient's masks trained a model in use, so every
   patient is scored (more power for the embedders' paired difference).

Figures: the head's weighted F1 against the majority class with the patient-bootstrap interval
of the difference; the frozen against the adapted embedder (paired interval of the difference);
Dice and IoU against the true masks of every predicted mask (the run's and those `evaluate` made
with each fold's prompts) on the patients held out from tuning the segmenter, for the tuned and
the base segmenter (`bench.tune_segmenter.held_out_scores`); the share of
patients with at least 3 visits whose reported trend status matches the truth; the subgroup
section of the whole-image evaluation (per skin tone, body site, device) and how the estimated
skin tones (ITA) rank the images against the Fitzpatrick type the study painted.

Targets (issue 13): head - majority >= 0.30 with its interval above 0; adapted - frozen with its
interval above 0; Dice >= 0.75 on held-out patients; trend status right for >= 80% of them.

    python -m bench.accuracy            # prints the figures
    python -m bench.accuracy --json     # one JSON document on stdout

The models are tiny (a 2-layer ViT at 32 px, a 3-layer SegGPT at 16 px): the figures show that the
machinery learns from a study, not what the real models reach on real photographs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.tune_segmenter import held_out_scores
from eczema_batch.imaging.skintone import ita_category
from eczema_batch.pipeline.maskscore import OverlapSummary

VISITS = 5
IMAGES_PER_VISIT = 1
SEED = 0
EMBEDDER, SEGMENTER = "tiny-dino", "tiny-seggpt"
ADAPTED, TUNED = "dino-study", "seggpt-study"
ROMAN = ("I", "II", "III", "IV", "V", "VI")
#: the trend statuses a truth trend can be read as
TRENDS = ("improving", "stable", "worsening")


class Bench:
    def __init__(self, workdir: Path, quiet: bool) -> None:
        self.workdir = workdir
        self.quiet = quiet
        self.seconds: dict[str, float] = {}
        url = f"sqlite:///{(workdir / 'catalogue.sqlite3').resolve()}"
        self.env = {
            **os.environ,
            "ECZEMA_BATCH_DATABASE_URL": url,
            "ECZEMA_BATCH_HOME": str(workdir / "home"),
            "ECZEMA_BATCH_MODEL_DIR": str(workdir / "models"),
            "ECZEMA_BATCH_EMBEDDER_MODEL": ADAPTED,
            "ECZEMA_BATCH_SEGMENTER_MODEL": TUNED,
            "COLUMNS": "120",
        }
        self.env.pop("ECZEMA_BATCH_CONFIG", None)

    def cli(self, stage: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Run `eczema-batch ARGS`, time it under `stage` and return its stdout."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "eczema_batch", *args], env={**self.env, **(env or {})},
            stdout=subprocess.PIPE, stderr=None if not self.quiet else subprocess.PIPE,
            text=True,
        )
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"`eczema-batch {' '.join(args)}` failed ({done.returncode}):\n"
                             f"{done.stderr or ''}")
        return done.stdout


def truth_table(truth: Path) -> list[dict[str, str]]:
    with (truth / "truth.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def overlap(summary: OverlapSummary) -> dict[str, Any]:
    empty = summary.images == 0
    return {"images": summary.images, "dice": None if empty else summary.dice,
            "iou": None if empty else summary.iou}


def trend_agreement(report: dict[str, Any], truth: list[dict[str, str]]) -> dict[str, Any]:
    """Share of patients with >= 3 visits whose reported status is their true trend."""
    visits: dict[str, set[str]] = defaultdict(set)
    trend: dict[str, str] = {}
    for row in truth:
        visits[row["patient"]].add(row["visit_date"])
        trend[row["patient"]] = row["trend"]
    status = {p["patient"]: p["status"] for p in report["patients"]}
    eligible = sorted(p for p, v in visits.items() if len(v) >= 3)
    right = [p for p in eligible if status.get(p) == trend[p]]
    confusion: dict[str, dict[str, int]] = {t: defaultdict(int) for t in TRENDS}
    for p in eligible:
        confusion[trend[p]][status.get(p, "missing")] += 1
    return {"patients": len(eligible), "right": len(right),
            "share": len(right) / len(eligible) if eligible else None,
            "confusion": {t: dict(c) for t, c in confusion.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="about this many photographs")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty: give a new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(workdir, quiet=args.json)
    study, truth = workdir / "study", workdir / "truth"
    patients = max(4, args.images // (VISITS * IMAGES_PER_VISIT))
    try:
        bench.cli("synth", "synth", str(study), "--truth", str(truth), "--patients",
                  str(patients), "--visits", str(VISITS), "--images-per-visit",
                  str(IMAGES_PER_VISIT), "--seed", str(SEED))
        bench.cli("ingest", "ingest", str(study))
        bench.cli("make-tiny", "models", "make-tiny", str(workdir / "models"))
        bench.cli("adapt-embedder", "models", "adapt-embedder", "--name", ADAPTED,
                  "--from", EMBEDDER)
        bench.cli("tune-segmenter", "models", "tune-segmenter", "--name", TUNED,
                  "--from", SEGMENTER)
        identity = json.loads(
            (workdir / "models" / TUNED / "eczema-batch-model.json").read_text())
        held_out = {(study_name, subject) for study_name, subject in identity["holdout"]}
        bench.cli("run", "run")
        # the base segmenter on the same images, for the Dice it is compared with
        bench.cli("run (base segmenter)", "run", env={"ECZEMA_BATCH_SEGMENTER_MODEL": SEGMENTER})
        bench.cli("train", "train")
        bench.cli("predict", "run")  # the trained head scores every image
        report = json.loads(bench.cli("report", "report", "--json", "--limit", "0"))
        evaluation_file = workdir / "evaluate.json"
        bench.cli("evaluate", "evaluate", "--embedder-model", EMBEDDER, "--embedder-model",
                  ADAPTED, "--output", str(evaluation_file))
        evaluation = json.loads(evaluation_file.read_text())
        # The embedders again on every patient: without a segmenter no patient's masks trained
        # a model in use, so all of them are scored (more power for the paired difference).
        whole_file = workdir / "evaluate-whole-images.json"
        bench.cli("evaluate (whole images)", "evaluate", "--segmenter", "none", "--no-ablation",
                  "--fractions", "1.0", "--embedder-model", EMBEDDER, "--embedder-model",
                  ADAPTED, "--output", str(whole_file))
        whole = json.loads(whole_file.read_text())
        truth_rows = truth_table(truth)
        database_url = bench.env["ECZEMA_BATCH_DATABASE_URL"]
        figures = {
            "study": {"images": len(truth_rows), "patients": patients, "visits": VISITS,
                      "held_out_patients": sorted(subject for _, subject in held_out)},
            "evaluate": summarise(evaluation),
            "evaluate_whole_images": summarise(whole),
            "masks": {name: overlap(held_out_scores(database_url, workdir, model, held_out))
                      for name, model in (("tuned", TUNED), ("base", SEGMENTER))},
            "trend": trend_agreement(report, truth_rows),
            "subgroups": subgroups(whole, workdir / "catalogue.sqlite3", truth_rows),
            "seconds": {stage: round(s, 1) for stage, s in bench.seconds.items()},
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_figures(figures)


def subgroups(doc: dict[str, Any], catalogue: Path, truth: list[dict[str, str]]
              ) -> dict[str, Any]:
    """The evaluation's subgroup section, and how its estimated skin tones (ITA) rank the images
    against the Fitzpatrick type the study painted (Spearman; -1: deeper type, lower ITA)."""
    painted = {row["path"]: ROMAN.index(row["tone"]) + 1 for row in truth}
    with sqlite3.connect(catalogue) as db:
        estimated = db.execute("SELECT path, skin_ita FROM images WHERE skin_ita IS NOT NULL"
                               ).fetchall()
    pairs = np.array([(painted[path], ita) for path, ita in estimated if path in painted])
    ranks = [np.argsort(np.argsort(pairs[:, k])) for k in (0, 1)] if len(pairs) > 2 else []
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for fitzpatrick, ita in pairs:
        by_type[ROMAN[int(fitzpatrick) - 1]][ita_category(float(ita))] += 1
    section = doc["subgroups"]
    return {"embedder": doc["models"]["embedder"]["name"], "segmenter": section["segmenter"],
            "rows": section["rows"], "tone_sources": section["tone_sources"],
            "ita_vs_painted": {
                "images": len(pairs),
                "spearman": float(np.corrcoef(*ranks)[0, 1]) if ranks else None,
                "categories_by_type": {t: dict(c) for t, c in sorted(by_type.items())}}}


def print_subgroups(section: dict[str, Any]) -> None:
    ita = section["ita_vs_painted"]
    print(f"subgroups (embedder {section['embedder']}, segmenter {section['segmenter']}, "
          f"head weighted F1 and score bias with 95% patient-bootstrap intervals):")
    for row in section["rows"]:
        f1, bias = row["weighted_f1"], row["score_bias"]
        print(f"  {row['grouping']:9} {row['group']:20} {row['patients']:3} patients "
              f"{row['images']:4} images  F1 {_value(f1)}  bias {_value(bias, signed=True)}"
              + ("  (few patients)" if row["few_patients"] else ""))
    spearman = "-" if ita["spearman"] is None else f"{ita['spearman']:+.2f}"
    print(f"  estimated ITA vs painted Fitzpatrick type: Spearman {spearman} over "
          f"{ita['images']} images; ITA categories by type: "
          f"{json.dumps(ita['categories_by_type'])}")


def _value(score: dict[str, Any], *, signed: bool = False) -> str:
    if score["value"] is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    ci = score["ci95"]
    interval = "" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
    return fmt.format(score["value"]) + interval


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures of `evaluate`'s JSON document this bench prints."""
    mode = doc["settings"]["segmenter"]
    results = doc["results"][mode]
    out: dict[str, Any] = {
        "segmenter_mode": mode,
        "scored_patients": doc["data"]["patients"],
        "head": results["head"]["summary"]["weighted_f1"],
        "majority": results["majority"]["summary"]["weighted_f1"],
        "head_minus_majority": doc["comparison"][mode]["head_minus_majority"],
    }
    comparison = doc.get("model_comparison")
    if comparison:
        names = [c["models"]["embedder"]["name"] for c in comparison["configurations"]]
        out["embedders"] = {
            name: {"head": c["methods"]["head"]} for name, c in
            zip(names, comparison["configurations"], strict=True)}
        out["embedder_differences"] = [
            {"of": names[d["of"]], "minus": names[d["minus"]],
             "head": d["methods"]["head"]} for d in comparison["differences"]]
    leakage = doc.get("leakage")
    if leakage:
        out["not_scored_patients"] = len(leakage.get("excluded", []))
        out["scored_patients"] = leakage.get("scored_patients", out["scored_patients"])
    return out


def print_evaluation(ev: dict[str, Any]) -> None:
    diff = ev["head_minus_majority"]
    print(f"evaluate ({ev['segmenter_mode']}, {ev['scored_patients']} patients scored):")
    print(f"  weighted F1 head {ev['head']['mean']:.3f}±{ev['head']['std']:.3f}, majority "
          f"{ev['majority']['mean']:.3f}±{ev['majority']['std']:.3f}; head - majority "
          f"{diff['weighted_f1']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]")
    if ev.get("not_scored_patients"):
        print(f"  {ev['not_scored_patients']} patients not scored: their masks tuned the "
              "segmenter (the leakage rule)")
    for name, scores in ev.get("embedders", {}).items():
        head = scores["head"]
        print(f"  embedder {name}: head weighted F1 {head['weighted_f1']['mean']:.3f}±"
              f"{head['weighted_f1']['std']:.3f}, pooled {head['pooled']:.3f}")
    for d in ev.get("embedder_differences", []):
        head = d["head"]
        print(f"  {d['of']} - {d['minus']}: head weighted F1 {head['weighted_f1']:+.3f} "
              f"[{head['ci95'][0]:+.3f}, {head['ci95'][1]:+.3f}] (paired patient bootstrap)")


def print_figures(figures: dict[str, Any]) -> None:
    study = figures["study"]
    print(f"synthetic study: {study['images']} images, {study['patients']} patients x "
          f"{study['visits']} visits; {len(study['held_out_patients'])} patients held out "
          "from tuning the segmenter")
    print_evaluation(figures["evaluate"])
    print_evaluation(figures["evaluate_whole_images"])
    for name, scores in figures["masks"].items():
        if scores["dice"] is None:
            print(f"  masks ({name} segmenter): none predicted on held-out patients")
            continue
        print(f"  masks ({name} segmenter) vs truth on held-out patients: Dice "
              f"{scores['dice']:.3f}, IoU {scores['iou']:.3f} ({scores['images']} images)")
    trend = figures["trend"]
    print(f"  trend status right for {trend['right']} of {trend['patients']} patients with >= 3 "
          f"visits ({100 * (trend['share'] or 0):.0f}%); truth -> reported: "
          f"{json.dumps(trend['confusion'])}")
    print_subgroups(figures["subgroups"])
    print("wall time (s): " + ", ".join(f"{k} {v}" for k, v in figures["seconds"].items()))


if __name__ == "__main__":
    main()
