"""`eczema-batch evaluate`: cross-validate the whole method the way the paper reports it.

Folds are grouped by patient and stratified by severity (StratifiedGroupKFold), repeated with
different seeds. In every fold the prompts of every image come only from the training fold's
references and never from the image's own patient, and the head (and the baselines) see only
the training fold. Features come from the cache in `features` (computed once per image and
prompt set), so repeats and the ablation cost model forwards only where a prompt set is new.

The data-scaling curve trains the head on a random fraction of each training fold's patients
and tests it on the whole test fold; prompts still come from all of the training fold's
references (reference masks are a separate, small annotation budget: the curve measures how
many severity-labelled patients the head needs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from eczema_batch.catalogue.labels import parse_reference_rule
from eczema_batch.errors import UsageError
from eczema_batch.measuring.config import SEGMENTER_MODES, RunConfig, SegmenterMode
from eczema_batch.measuring.runtime import identify, resolve_targets
from eczema_batch.measuring.skintone import estimate_skin_tones
from eczema_batch.pipeline.classify import predict_proba
from eczema_batch.pipeline.evaluate import (
    BOOTSTRAP_REPLICATES,
    Split,
    logistic_proba,
    majority_proba,
    subsample_groups,
)
from eczema_batch.pipeline.perturb import DEFAULT_PERTURBATIONS
from eczema_batch.pipeline.records import Counts, Keyed, Measurement
from eczema_batch.pipeline.train import (
    MIN_LABELS_PER_CLASS,
    TrainSettings,
    check_class_counts,
    fit_head,
)
from eczema_batch.progress import Progress, StageProgress
from eczema_batch.training.agreement import evaluation_agreement
from eczema_batch.training.data import LabelledImages, References, labelled_images, references
from eczema_batch.training.features import FeatureRequest, FeatureStore, fold_references
from eczema_batch.training.leakage import (
    UsedModel,
    check_scorable,
    exclusion,
    read_used_model,
    scored_splits,
)
from eczema_batch.training.report import (
    MethodPredictions,
    compare_models,
    naive_forwards,
    prediction_rows,
    score_methods,
)
from eczema_batch.training.results import (
    DataSummary,
    EvaluationReport,
    Forwards,
    ModelIdentities,
    ModelIdentity,
    NaiveForwards,
    RunInfo,
    SegmentationQuality,
)
from eczema_batch.training.robustness import measure_robustness
from eczema_batch.training.segmentation import segmentation_quality
from eczema_batch.training.subgroups import SubgroupReport, image_attributes, subgroup_report

DEFAULT_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
#: `--robustness`: held-out images re-measured unless --robustness-images says otherwise
ROBUSTNESS_IMAGES = 200


@dataclass(frozen=True)
class EvaluationSettings:
    folds: int = 5
    repeats: int = 3
    segmenter: SegmenterMode = "seggpt"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seed: int = 0
    bootstrap: int = BOOTSTRAP_REPLICATES
    #: also evaluate the other side of the segmentation ablation (seggpt vs none)
    ablation: bool = True
    train: TrainSettings = field(default_factory=TrainSettings)
    #: which label is an image's truth (catalogue.labels): newest, majority, adjudicator:NAME
    reference_label: str = "newest"
    #: the head's accuracy per skin tone, body site and device (training.subgroups)
    subgroups: bool = True
    #: `--robustness`: re-measure at most this many held-out images under perturbations
    #: (training.robustness); None: not asked
    robustness_images: int | None = None

    def __post_init__(self) -> None:
        if self.segmenter not in SEGMENTER_MODES:
            raise UsageError(f"--segmenter {self.segmenter!r}: use one of "
                             f"{', '.join(SEGMENTER_MODES)}")
        if self.folds < 2 or self.repeats < 1:
            raise UsageError("use at least 2 folds and 1 repeat")
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise UsageError(f"--fractions {self.fractions}: each must be in (0, 1]")
        if self.bootstrap < 1:
            raise UsageError("--bootstrap must be at least 1")
        if self.robustness_images is not None and self.robustness_images < 1:
            raise UsageError("--robustness-images must be at least 1")
        object.__setattr__(self, "reference_label",
                           str(parse_reference_rule(self.reference_label)))

    @property
    def modes(self) -> tuple[SegmenterMode, ...]:
        if not self.ablation:
            return (self.segmenter,)
        return (self.segmenter, "seggpt" if self.segmenter == "none" else "none")

    def as_dict(self) -> dict[str, Any]:
        out = {"folds": self.folds, "repeats": self.repeats, "segmenter": self.segmenter,
               "fractions": list(self.fractions), "seed": self.seed,
               "bootstrap": self.bootstrap, "ablation": list(self.modes),
               "train": self.train.as_dict(), "reference_label": self.reference_label,
               "subgroups": self.subgroups}
        if self.robustness_images is not None:  # absent when not asked: documents unchanged
            out["robustness_images"] = self.robustness_images
        return out


@dataclass
class EvaluationResult:
    report: EvaluationReport
    #: out-of-fold predictions of the head, one row per (segmenter mode, repeat, image)
    predictions: list[dict[str, Any]]
    #: the prompts of every segmented image in every fold
    prompt_audit: list[PromptUse] = field(default_factory=list)


def run_evaluation(
    factory: sessionmaker[Session],
    *,
    config: RunConfig,
    settings: EvaluationSettings,
    study: str | None = None,
    progress: StageProgress | None = None,
    compare: Sequence[RunConfig] = (),
) -> EvaluationResult:
    """Cross-validate `config`; with `compare`, also those configurations (other embedders or
    segmenters) on the same splits under `settings.segmenter`, side by side with `config`.

    No patient whose labels or masks trained any of the models is scored (`training.leakage`).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    others = [replace(c, segmenter_mode=settings.segmenter) for c in compare]
    if others and settings.segmenter == "none" and any(
            c.segmenter_model != config.segmenter_model for c in others):
        raise UsageError("--segmenter none uses no segmenter: compare segmenters with "
                         "--segmenter seggpt (or manual)")
    used = _used_models(config, settings.modes, others)
    with factory() as session, session.begin():
        data = labelled_images(session, study=study, rule=settings.reference_label)
        refs = references(session, study=study)
        targets = {
            mode: resolve_targets(session, replace(config, segmenter_mode=mode), use_head=False)
            for mode in settings.modes
        }
        other_targets = [resolve_targets(session, c, use_head=False) for c in others]
        excluded = exclusion(session, used, data, refs)
    _check_data(data, settings, excluded.patient_ids,
                [m.name for m in used if m.identity is not None])
    splits = scored_splits(data, excluded.patient_ids, folds=settings.folds,
                           repeats=settings.repeats, seed=settings.seed)
    counts = Counts()
    stores = {mode: FeatureStore(factory, replace(config, segmenter_mode=mode), targets[mode],
                                 counts=counts) for mode in settings.modes}
    leaks = 0
    audit: list[PromptUse] = []
    features: dict[SegmenterMode, tuple[list[list[Keyed]], dict[Keyed, np.ndarray]]] = {}
    seg_quality: SegmentationQuality | None = None
    for mode in settings.modes:
        tick = time.perf_counter()
        keys, vectors, mode_audit, mode_leaks = _mode_features(
            stores[mode], mode, data, refs, splits, progress)
        audit.extend(mode_audit)
        leaks += mode_leaks
        features[mode] = (keys, vectors)
        timings[f"features_{mode}"] = time.perf_counter() - tick
    seg_mode = next((m for m in settings.modes if m != "none"), None)
    scored_refs = ~np.isin(refs.patient_ids, sorted(excluded.patient_ids))
    if seg_mode is not None and scored_refs.any():
        tick = time.perf_counter()
        seg_quality = segmentation_quality(stores[seg_mode], refs, scored=scored_refs,
                                           progress=progress)
        timings["segmentation_quality"] = time.perf_counter() - tick

    tick = time.perf_counter()
    results: dict[str, dict[str, MethodPredictions]] = {
        mode: _cross_validate(data, splits, *features[mode], settings,
                              scaling=mode == settings.segmenter, progress=progress)
        for mode in settings.modes
    }
    timings["training"] = time.perf_counter() - tick
    compared = [(results[settings.segmenter],
                 seg_quality if settings.segmenter != "none" else None)]
    for index, (other, other_target) in enumerate(zip(others, other_targets, strict=True)):
        tick = time.perf_counter()
        store = FeatureStore(factory, other, other_target, counts=counts)
        predictions, quality, other_audit, other_leaks = _other_configuration(
            store, settings, data, refs, splits, scored_refs,
            _prefixed(progress, f"configuration {index + 2}"))
        compared.append((predictions, quality))
        audit.extend(other_audit)
        leaks += other_leaks
        timings[f"compare_{index + 2}"] = time.perf_counter() - tick
    robust = None
    if settings.robustness_images is not None:
        tick = time.perf_counter()
        robust = measure_robustness(
            stores[settings.segmenter], data, refs, splits, *features[settings.segmenter],
            mode=settings.segmenter, train=settings.train, perturbations=DEFAULT_PERTURBATIONS,
            images=settings.robustness_images, seed=settings.seed,
            bootstrap=settings.bootstrap, progress=progress)
        timings["robustness"] = time.perf_counter() - tick
    tick = time.perf_counter()
    scores = score_methods(data, results, segmenter=settings.segmenter,
                           fractions=settings.fractions, bootstrap=settings.bootstrap,
                           seed=settings.seed)
    models = _model_identities(config, settings.modes)
    comparison = None
    if others:
        comparison = compare_models(
            data, [predictions for predictions, _ in compared],
            [_model_identities(c, (settings.segmenter,)) for c in (config, *others)],
            segmenter=settings.segmenter, bootstrap=settings.bootstrap, seed=settings.seed,
            segmentation=[quality for _, quality in compared], refs=refs,
            first_replicates=scores.replicates.get(settings.segmenter))
    data_summary = DataSummary.of(data, refs, splits)
    timings["metrics"] = time.perf_counter() - tick
    subgroups = None
    if settings.subgroups:
        tick = time.perf_counter()
        subgroups = _subgroups(factory, config, data, results[settings.segmenter]["head"],
                               settings)
        timings["subgroups"] = time.perf_counter() - tick
    naive = naive_forwards(data, refs, splits, settings.modes, seg_mode is not None)
    for _ in others:  # each compared configuration: the main mode and segmentation quality
        more = naive_forwards(data, refs, splits, (settings.segmenter,),
                              settings.segmenter != "none")
        naive = NaiveForwards(embedder_images=naive.embedder_images + more.embedder_images,
                              segmenter_queries=naive.segmenter_queries + more.segmenter_queries)
    timings["total"] = time.perf_counter() - started
    report = EvaluationReport(
        settings=settings, data=data_summary, results=scores.results,
        comparison=scores.comparison, ablation=scores.ablation, scaling=scores.scaling,
        segmentation=seg_quality,
        models=models, study=study, prompt_leaks=leaks,
        # Timings and forward counts differ between a cold and a warm cache; everything outside
        # `run` is a function of the catalogue, the models and the seed.
        run=RunInfo(forwards=Forwards.from_dict(counts.as_dict()), naive_forwards=naive,
                    seconds={k: round(v, 3) for k, v in timings.items()}),
        leakage=excluded.report, model_comparison=comparison, subgroups=subgroups,
        robustness=robust,
    )
    rows = prediction_rows(data, results)
    with factory() as session:
        agreement = evaluation_agreement(
            session, study=study, classes=data.classes, reference_rule=settings.reference_label,
            predictions=rows, segmenter=settings.segmenter, bootstrap=settings.bootstrap,
            seed=settings.seed)
    report = replace(report, agreement=agreement)
    return EvaluationResult(report=report, predictions=rows, prompt_audit=audit)


def _subgroups(factory: sessionmaker[Session], config: RunConfig, data: LabelledImages,
               head: MethodPredictions, settings: EvaluationSettings) -> SubgroupReport:
    """The head's scores per skin tone, body site and device; skin tones not given by the
    manifest are estimated (and recorded) first."""
    positions, proba = head.pooled()
    image_ids = data.image_ids[positions]
    with factory() as session, session.begin():
        estimate_skin_tones(session, image_ids.tolist(), image_root=config.image_root,
                            max_pixels=config.max_pixels, threads=config.decode_threads)
        attributes = image_attributes(session, np.unique(image_ids).tolist())
    return subgroup_report(
        image_ids=image_ids, patient_ids=data.patient_ids[positions],
        labels=data.labels[positions], proba=proba, attributes=attributes,
        segmenter=settings.segmenter, bootstrap=settings.bootstrap, seed=settings.seed)


def _other_configuration(
    store: FeatureStore,
    settings: EvaluationSettings,
    data: LabelledImages,
    refs: References,
    splits: list[Split],
    scored_refs: np.ndarray,
    progress: StageProgress | None,
) -> tuple[dict[str, MethodPredictions], SegmentationQuality | None, list[PromptUse], int]:
    """A compared configuration on the main configuration's splits, under the main mode only
    (no ablation, no scaling curve): its methods' predictions, its Dice on the scored
    references, its prompt audit and leaks."""
    mode = settings.segmenter
    keys, vectors, audit, leaks = _mode_features(store, mode, data, refs, splits, progress)
    predictions = _cross_validate(data, splits, keys, vectors, settings, scaling=False,
                                  progress=progress)
    quality = (segmentation_quality(store, refs, scored=scored_refs)
               if mode != "none" and scored_refs.any() else None)
    return predictions, quality, audit, leaks


def _used_models(config: RunConfig, modes: tuple[SegmenterMode, ...],
                 others: Sequence[RunConfig]) -> list[UsedModel]:
    """Every embedder, and every segmenter where a mode segments, of every configuration."""
    segments = any(m != "none" for m in modes)
    used: dict[tuple[str, str], UsedModel] = {}
    for c in (config, *others):
        wanted = [("embedder", c.embedder_model)]
        if segments:
            wanted.append(("segmenter", c.segmenter_model))
        for kind, name in wanted:
            if (kind, name) not in used:
                used[(kind, name)] = read_used_model(name, kind=kind,  # type: ignore[arg-type]
                                                     model_dir=c.model_dir)
    return list(used.values())


def _check_data(data: LabelledImages, settings: EvaluationSettings, excluded: frozenset[int],
                derived: Sequence[str]) -> None:
    if len(data) == 0:
        raise UsageError("no labelled images: add a severity column to the manifest and ingest "
                         "again, or label images in review")
    check_class_counts(data.labels, data.classes,
                       minimum=max(MIN_LABELS_PER_CLASS, settings.folds))
    check_scorable(data, excluded, folds=settings.folds, models=derived)


@dataclass(frozen=True)
class PromptUse:
    """Which references prompted an image in one fold (the leakage audit)."""

    segmenter: str
    repeat: int
    fold: int
    image_id: int
    test: bool
    prompt_ids: tuple[int, ...]


def _mode_features(
    store: FeatureStore,
    mode: SegmenterMode,
    data: LabelledImages,
    refs: References,
    splits: list[Split],
    progress: StageProgress | None,
) -> tuple[list[list[Keyed]], dict[Keyed, np.ndarray], list[PromptUse], int]:
    """Per split, the feature key of every labelled image; the vectors; the prompt audit and
    the number of prompts that came from the image's own patient or the test fold (must be 0)."""
    patients = [int(p) for p in data.patient_ids]
    if mode == "none":
        requests = [FeatureRequest(int(i), p) for i, p in zip(data.image_ids, patients,
                                                               strict=True)]
        results = store.measure(requests, progress=_stage(progress, f"{mode}: lesion crops"))
        same = [(m.image_id, m.key) for m in results]
        return [same for _ in splits], _vectors(results), [], 0
    full = store.full_vectors(
        np.concatenate([data.image_ids, refs.image_ids]).tolist(),
        progress=_stage(progress, f"{mode}: whole-image embeddings"),
    )
    manual = store.manual_masks(refs.image_ids.tolist()) if mode == "manual" else {}
    requests = []
    for split in splits:
        by_study = fold_references(split, data, refs, full)
        requests += [FeatureRequest(int(iid), patients[pos], by_study.get(int(study)),
                                    manual.get(int(iid)))
                     for pos, (iid, study) in enumerate(zip(data.image_ids, data.study_ids,
                                                            strict=True))]
    results = store.measure(requests, progress=_stage(progress, f"{mode}: lesion crops"))
    patient_of_ref = dict(zip(refs.image_ids.tolist(), refs.patient_ids.tolist(), strict=True))
    audit: list[PromptUse] = []
    keys: list[list[Keyed]] = []
    leaks = 0
    for index, split in enumerate(splits):
        mine = results[index * len(data) : (index + 1) * len(data)]
        keys.append([(m.image_id, m.key) for m in mine])
        is_test = np.zeros(len(data), dtype=bool)
        is_test[split.test] = True
        test_patients = set(data.patient_ids[split.test].tolist())
        for pos, m in enumerate(mine):
            if m.key.source != "seggpt":
                continue
            audit.append(PromptUse(mode, split.repeat, split.fold, m.image_id,
                                   bool(is_test[pos]), m.prompts.ids))
            forbidden = {patients[pos]} | (test_patients if is_test[pos] else set())
            leaks += sum(patient_of_ref[p] in forbidden for p in m.prompts.ids)
    return keys, _vectors(results), audit, leaks


def _vectors(results: list[Measurement]) -> dict[Keyed, np.ndarray]:
    return {(m.image_id, m.key): m.crop for m in results if m.crop is not None}


def _cross_validate(
    data: LabelledImages,
    splits: list[Split],
    keys: list[list[Keyed]],
    vectors: dict[Keyed, np.ndarray],
    settings: EvaluationSettings,
    *,
    scaling: bool,
    progress: StageProgress | None,
) -> dict[str, MethodPredictions]:
    n_classes = len(data.classes)
    train = settings.train
    out = {name: MethodPredictions() for name in ("head", "majority", "logistic")}
    fractions = sorted({f for f in settings.fractions if f < 1.0}) if scaling else []
    for index, (split, split_keys) in enumerate(zip(splits, keys, strict=True)):
        # One split's matrix at a time: the vectors are shared, the matrices would not be.
        x = np.stack([vectors[k] for k in split_keys])
        y = data.labels
        head = fit_head(x[split.train], y[split.train], n_classes=n_classes, settings=train).head
        out["head"].add(split, predict_proba(head, x[split.test]), len(split.train))
        out["majority"].add(split, majority_proba(y[split.train], len(split.test), n_classes),
                            len(split.train))
        out["logistic"].add(split, logistic_proba(
            x[split.train], y[split.train], x[split.test], n_classes,
            balanced=train.class_weights == "balanced", seed=train.seed), len(split.train))
        for fraction in fractions:
            subset = subsample_groups(
                split.train, data.patient_ids, fraction,
                seed=(settings.seed, split.repeat, split.fold, round(fraction * 1000)))
            sub_head = fit_head(x[subset], y[subset], n_classes=n_classes, settings=train).head
            out.setdefault(f"head@{fraction:g}", MethodPredictions()).add(
                split, predict_proba(sub_head, x[split.test]), len(subset),
                train_patients=len(np.unique(data.patient_ids[subset])))
        if progress is not None:
            progress("training heads", index + 1, len(splits))
    return out


def _stage(progress: StageProgress | None, name: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


def _prefixed(progress: StageProgress | None, prefix: str) -> StageProgress | None:
    if progress is None:
        return None
    return lambda name, done, total: progress(f"{prefix}, {name}", done, total)


def _model_identities(config: RunConfig, modes: tuple[SegmenterMode, ...]) -> ModelIdentities:
    embedder = identify(config.embedder_model, kind="embedder", model_dir=config.model_dir)
    segmenter = None
    if any(m != "none" for m in modes):
        seg = identify(config.segmenter_model, kind="segmenter", model_dir=config.model_dir)
        segmenter = ModelIdentity(name=seg.name, digest=seg.digest)
    return ModelIdentities(embedder=ModelIdentity(name=embedder.name, digest=embedder.digest),
                           prompts=config.prompts, segmenter=segmenter)
