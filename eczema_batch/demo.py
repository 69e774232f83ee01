"""`eczema-batch demo`: the whole tool on a synthetic study, in one folder, on the embedded default.

    DIR/demo-study/          the synthetic study (photos, DICOM, manual masks, manifest.csv)
    DIR/catalogue.sqlite3    its SQLite catalogue (the default one when ECZEMA_BATCH_HOME=DIR)
    DIR/models/              tiny random-weight models, when the real weights are not found
    DIR/report/index.html    the HTML report

Steps: write the study, ingest it, run the pipeline (embed, retrieve prompts, segment, crop,
embed), train a severity head on the manifest's labels, run again to predict, build the report.
The real models (SegGPT ViT-L, DINO ViT-B/16) are used when their weights are found. Otherwise
tiny models of the same classes are made and first trained on the demo's own synthetic study
(`models adapt-embedder`, `models tune-segmenter`): random weights would measure nothing, trained
ones show that the tool learns and measures what was painted, which says nothing about real
photographs (`--untrained` keeps them random). Every step is idempotent: running the demo again
in the same folder reuses what is there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.db import open_catalogue
from eczema_batch.config import Settings
from eczema_batch.errors import EczemaBatchError, ModelNotFoundError
from eczema_batch.imaging.quality import thresholds_from
from eczema_batch.measuring.config import RunConfig
from eczema_batch.report.cohort import (
    CohortReport,
    build_report,
    review_thresholds,
    trend_rules,
)
from eczema_batch.report.html import HtmlReport, write_html_report

STUDY_NAME = "demo-study"
TINY_SEGMENTER, TINY_EMBEDDER = "tiny-seggpt", "tiny-dino"
#: the tiny models once trained on the demo study (derived models in DIR/models)
DEMO_SEGMENTER, DEMO_EMBEDDER = "demo-seggpt", "demo-dino"
#: SegGPT ViT-L with K=2 prompts on a 2-core CPU (DESIGN.md): ~26 s per image
CPU_SECONDS_PER_IMAGE = 26

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoSize:
    patients: int = 8
    visits: int = 3
    images_per_visit: int = 2
    seed: int = 0


@dataclass
class DemoResult:
    folder: Path
    study_folder: Path
    database_url: str
    #: "real", "tiny" (trained on the demo study) or "tiny-untrained" (random weights)
    models: str
    #: why the tiny models were used (the weights that were not found), or where the real ones are
    models_note: str
    segmenter: str
    embedder: str
    images: int = 0
    #: the head that predicts, and whether an active one was reused rather than trained
    head_id: int | None = None
    head_reused: bool = False
    #: why no head could be trained (the report then shows no predictions)
    head_problem: str | None = None
    report: CohortReport | None = None
    html: HtmlReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _step(result: DemoResult, name: str, say: Say, text: str) -> Iterator[None]:
    say(text)
    start = time.perf_counter()
    yield
    result.seconds[name] = round(time.perf_counter() - start, 1)


def choose_models(settings: Settings, folder: Path, *, tiny: bool) -> tuple[str, str, str, str,
                                                                            Path | None]:
    """(kind, note, segmenter, embedder, model_dir): the real models if found, else tiny ones."""
    from eczema_batch.pipeline.loading import find_weights
    from eczema_batch.pipeline.registry import get_spec

    missing = []
    if not tiny:
        for name in (settings.segmenter_model, settings.embedder_model):
            try:
                find_weights(get_spec(name), model_dir=settings.model_dir)
            except (ModelNotFoundError, EczemaBatchError):
                missing.append(f"no weights found for {name}")
        if not missing:
            return ("real", f"weights found for {settings.segmenter_model} and "
                    f"{settings.embedder_model}", settings.segmenter_model,
                    settings.embedder_model, settings.model_dir)
    from eczema_batch.pipeline.tiny import make_tiny_models

    model_dir = folder / "models"
    if not all((model_dir / n / "config.json").is_file() for n in (TINY_SEGMENTER, TINY_EMBEDDER)):
        make_tiny_models(model_dir)
    note = "--tiny was given" if tiny else "; ".join(missing)
    return "tiny", note, TINY_SEGMENTER, TINY_EMBEDDER, model_dir


def _train_tiny_models(factory: sessionmaker[Session], config: RunConfig, result: DemoResult,
                       say: Say) -> RunConfig:
    """Adapt the tiny embedder and tune the tiny segmenter on the demo study (once: a folder
    that has them reuses them); the configuration that uses them."""
    from dataclasses import replace

    from eczema_batch.training.adapt_embedder import adapt_study_embedder
    from eczema_batch.training.tune_segmenter import tune_study_segmenter

    assert config.model_path is not None
    folder = config.model_path
    with _step(result, "adapt", say, f"adapting {TINY_EMBEDDER} to the demo study's images "
               "(self-supervised DINO, no labels)"):
        if (folder / DEMO_EMBEDDER).is_dir():
            say("  (already adapted: reusing it)")
        else:
            from eczema_batch.pipeline.adapt import defaults_for

            adapt_study_embedder(
                factory, config=config, name=DEMO_EMBEDDER, base=TINY_EMBEDDER, study=STUDY_NAME,
                settings_of=lambda size, tiny: defaults_for(image_size=size, tiny=tiny))
    with _step(result, "tune", say, f"tuning {TINY_SEGMENTER} on the demo study's manual masks "
               "(a fifth of the patients held out)"):
        if (folder / DEMO_SEGMENTER).is_dir():
            say("  (already tuned: reusing it)")
        else:
            tune_study_segmenter(factory, config=config, name=DEMO_SEGMENTER,
                                 base=TINY_SEGMENTER, study=STUDY_NAME)
    result.segmenter, result.embedder = DEMO_SEGMENTER, DEMO_EMBEDDER
    return replace(config, segmenter_model=DEMO_SEGMENTER, embedder_model=DEMO_EMBEDDER)


def _measure(factory: sessionmaker[Session], config: RunConfig, settings: Settings) -> int:
    from eczema_batch.jobs.local import run_in_process
    from eczema_batch.jobs.runs import start_run

    plan = start_run(factory, config=config, executor="local", queue="local",
                     chunk_size=settings.chunk_size, study=STUDY_NAME)
    summary = run_in_process(factory, plan)
    if summary.failed_jobs:
        first = next(iter(summary.failed_jobs.values()))
        raise EczemaBatchError(f"the pipeline failed on the demo study: {first}")
    return summary.measured.get("measure", 0)


def _train(factory: sessionmaker[Session], config: RunConfig, result: DemoResult) -> bool:
    """Train a head unless one is active for these features; False (with the reason) if not."""
    from eczema_batch.measuring.runtime import resolve_targets

    with factory() as session, session.begin():
        if (head_id := resolve_targets(session, config).head_id) is not None:
            result.head_id, result.head_reused = head_id, True
            return True
    try:
        from eczema_batch.pipeline.train import TrainSettings, default_schedule
        from eczema_batch.training.train import train_head
    except ImportError as exc:  # training not in this build
        result.head_problem = f"training is not available ({exc})"
        return False
    try:
        epochs, lr = default_schedule(tiny=result.models != "real")
        result.head_id = train_head(factory, config=config,
                                    settings=TrainSettings(seed=0, epochs=epochs, lr=lr),
                                    study=STUDY_NAME, name="demo head").head.id
    except EczemaBatchError as exc:
        result.head_problem = str(exc)
        return False
    return True


def run_demo(
    folder: Path,
    *,
    settings: Settings,
    size: DemoSize = DemoSize(),
    tiny: bool = False,
    untrained: bool = False,
    say: Say = lambda _text: None,
) -> DemoResult:
    """Run every step in `folder`; `say` hears what is happening, step by step.

    With the tiny models (`tiny`, or the real weights not found) they are first trained on the
    demo study unless `untrained`."""
    from eczema_batch.ingest.service import ingest_study
    from eczema_batch.synth import write_synthetic_study

    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    study_folder = folder / STUDY_NAME
    url = f"sqlite:///{folder / 'catalogue.sqlite3'}"
    kind, note, segmenter, embedder, model_dir = choose_models(settings, folder, tiny=tiny)
    result = DemoResult(folder=folder, study_folder=study_folder, database_url=url, models=kind,
                        models_note=note, segmenter=segmenter, embedder=embedder)
    if kind == "tiny" and untrained:
        result.models = "tiny-untrained"
        say(f"models: TINY random-weight {segmenter} + {embedder} ({note}): the workflow runs, "
            "the numbers mean nothing")
    elif kind == "tiny":
        say(f"models: TINY {segmenter} + {embedder} ({note}), trained on the demo study first")
    else:
        say(f"models: REAL {segmenter} + {embedder}")
    with _step(result, "synth", say, f"writing a synthetic study to {study_folder}"):
        if study_folder.is_dir() and any(study_folder.iterdir()):
            say("  (already written: reusing it)")
        else:
            write_synthetic_study(study_folder, patients=size.patients, visits=size.visits,
                                  images_per_visit=size.images_per_visit, seed=size.seed)
    factory = open_catalogue(url)
    with _step(result, "ingest", say, "cataloguing it"):
        ingest = ingest_study(study_folder, factory=factory, study_name=STUDY_NAME,
                              max_pixels=settings.max_image_pixels,
                              processes=settings.ingest_workers or 1,
                              batch_files=settings.ingest_batch_files,
                              quality=thresholds_from(settings))
        result.images = ingest.catalogued + ingest.already_catalogued
    config = RunConfig.from_settings(settings, segmenter_model=segmenter, embedder_model=embedder,
                                     model_dir=str(model_dir) if model_dir else None)
    if result.models == "tiny":
        config = _train_tiny_models(factory, config, result, say)
    if kind == "real":
        from eczema_batch.pipeline.device import resolve_device

        if resolve_device(settings.device).type == "cpu":
            minutes = result.images * CPU_SECONDS_PER_IMAGE / 60
            say(f"  real SegGPT on a CPU: about {minutes:.0f} minutes for {result.images} images "
                "(--tiny shows the workflow in a minute)")
    with _step(result, "run", say, f"segmenting and embedding with {config.segmenter_model} + "
               f"{config.embedder_model}"):
        _measure(factory, config, settings)
    with _step(result, "train", say, "training the severity head on the manifest's labels"):
        trained = _train(factory, config, result)
    if trained:
        with _step(result, "predict", say, "predicting severity"):
            _measure(factory, config, settings)
    with _step(result, "report", say, "building the report"):
        with factory() as session:
            result.report = build_report(session, rules=trend_rules(settings),
                                         thresholds=review_thresholds(settings),
                                         study=STUDY_NAME)
            result.html = write_html_report(session, result.report, folder / "report",
                                            max_pixels=settings.max_image_pixels,
                                            threads=settings.decode_threads)
    return result
