"""The evaluation report's typed parts: what `evaluate` returns and `evaluate --output` writes.

`EvaluationReport.as_dict()` is the JSON document `evaluate --output` writes: its keys and
nesting are a public format (users' scripts read it), so every part spells its own keys.
`EvaluationReport.from_dict` reads such a document back. `training.report` computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from eczema_batch.pipeline.evaluate import mean_std
from eczema_batch.training.leakage import LeakageReport

if TYPE_CHECKING:
    from eczema_batch.pipeline.evaluate import Split
    from eczema_batch.training.agreement import AgreementReport
    from eczema_batch.training.data import LabelledImages, References
    from eczema_batch.training.evaluate import EvaluationSettings
    from eczema_batch.training.robustness import RobustnessReport
    from eczema_batch.training.subgroups import SubgroupReport

BASELINES = ("majority", "logistic")
#: the scalar metrics, in the order the report lists them (the fields of `Metrics`)
METRICS = ("weighted_f1", "accuracy", "macro_f1", "qwk", "rps", "ece")

Doc = Mapping[str, Any]


# --- the report's parts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample std of the defined values; None for both where none is defined."""

    mean: float | None
    std: float | None
    #: how many values were defined
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        stat = mean_std(values)
        return cls(mean=stat["mean"], std=stat["std"], n=int(stat["n"] or 0))

    @classmethod
    def from_dict(cls, doc: Doc) -> Stat:
        return cls(mean=doc["mean"], std=doc["std"], n=doc["n"])

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class OverlapStat(Stat):
    """A mask-overlap score over reference images: mean +/- std and the median."""

    median: float

    @classmethod
    def from_dict(cls, doc: Doc) -> OverlapStat:
        return cls(mean=doc["mean"], std=doc["std"], n=doc["n"], median=doc["median"])

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "median": self.median}


@dataclass(frozen=True)
class Interval:
    """A percentile interval of bootstrap replicates; a [low, high] list in JSON."""

    low: float
    high: float

    @classmethod
    def of(cls, bounds: Sequence[float]) -> Interval:
        low, high = bounds
        return cls(low=low, high=high)

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _defined(values: Mapping[str, float | None], key: str) -> float:
    value = values[key]
    if value is None:  # only QWK can be undefined; the others always have a value
        raise ValueError(f"metric {key} is undefined")
    return value


@dataclass(frozen=True)
class Metrics:
    """The headline numbers of one set of predictions (`pipeline.evaluate.scalar_metrics`)."""

    weighted_f1: float
    accuracy: float
    macro_f1: float
    #: None where undefined (one class only)
    qwk: float | None
    rps: float
    ece: float

    @classmethod
    def from_dict(cls, doc: Mapping[str, float | None]) -> Metrics:
        return cls(weighted_f1=_defined(doc, "weighted_f1"), accuracy=_defined(doc, "accuracy"),
                   macro_f1=_defined(doc, "macro_f1"), qwk=doc["qwk"], rps=_defined(doc, "rps"),
                   ece=_defined(doc, "ece"))

    def as_dict(self) -> dict[str, Any]:
        return {"weighted_f1": self.weighted_f1, "accuracy": self.accuracy,
                "macro_f1": self.macro_f1, "qwk": self.qwk, "rps": self.rps, "ece": self.ece}


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall, F1 and support of one severity class."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int

    @classmethod
    def from_dict(cls, doc: Doc) -> ClassMetrics:
        return cls(name=doc["class"], precision=doc["precision"], recall=doc["recall"],
                   f1=doc["f1"], support=doc["support"])

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.name, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "support": self.support}


@dataclass(frozen=True)
class CalibrationBin:
    """One top-label confidence bin (low, high]; confidence and accuracy None when empty."""

    low: float
    high: float
    count: int
    confidence: float | None
    accuracy: float | None

    @classmethod
    def from_dict(cls, doc: Doc) -> CalibrationBin:
        return cls(low=doc["low"], high=doc["high"], count=doc["count"],
                   confidence=doc["confidence"], accuracy=doc["accuracy"])

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "count": self.count,
                "confidence": self.confidence, "accuracy": self.accuracy}


@dataclass(frozen=True)
class FoldRow:
    """One method's metrics on one (repeat, fold) test fold."""

    repeat: int
    fold: int
    n_train: int
    n_test: int
    metrics: Metrics

    @classmethod
    def from_dict(cls, doc: Doc) -> FoldRow:
        return cls(repeat=doc["repeat"], fold=doc["fold"], n_train=doc["n_train"],
                   n_test=doc["n_test"], metrics=Metrics.from_dict(doc))

    def as_dict(self) -> dict[str, Any]:
        # The metrics sit beside the fold's coordinates in JSON, not under a key of their own.
        return {"repeat": self.repeat, "fold": self.fold, "n_train": self.n_train,
                "n_test": self.n_test, **self.metrics.as_dict()}


@dataclass(frozen=True)
class MethodSummary:
    """Every scalar metric as mean +/- std over all (repeat, fold) test folds."""

    weighted_f1: Stat
    accuracy: Stat
    macro_f1: Stat
    qwk: Stat
    rps: Stat
    ece: Stat

    @classmethod
    def over(cls, rows: Sequence[FoldRow]) -> MethodSummary:
        return cls(**{m: Stat.of([getattr(r.metrics, m) for r in rows]) for m in METRICS})

    @classmethod
    def from_dict(cls, doc: Doc) -> MethodSummary:
        return cls(**{m: Stat.from_dict(doc[m]) for m in METRICS})

    def as_dict(self) -> dict[str, Any]:
        return {m: getattr(self, m).as_dict() for m in METRICS}


@dataclass(frozen=True)
class PooledReport:
    """One method on all out-of-fold predictions of all repeats together."""

    metrics: Metrics
    per_class: tuple[ClassMetrics, ...]
    #: rows truth, columns prediction
    confusion: tuple[tuple[int, ...], ...]
    calibration: tuple[CalibrationBin, ...]
    #: from the patient bootstrap
    weighted_f1_ci95: Interval
    predictions: int

    @classmethod
    def from_dict(cls, doc: Doc) -> PooledReport:
        return cls(
            metrics=Metrics.from_dict(doc),
            per_class=tuple(ClassMetrics.from_dict(c) for c in doc["per_class"]),
            confusion=tuple(tuple(row) for row in doc["confusion"]),
            calibration=tuple(CalibrationBin.from_dict(b) for b in doc["calibration"]),
            weighted_f1_ci95=Interval.of(doc["weighted_f1_ci95"]),
            predictions=doc["predictions"],
        )

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics.as_dict(),
                "per_class": [c.as_dict() for c in self.per_class],
                "confusion": [list(row) for row in self.confusion],
                "calibration": [b.as_dict() for b in self.calibration],
                "weighted_f1_ci95": self.weighted_f1_ci95.as_list(),
                "predictions": self.predictions}


@dataclass(frozen=True)
class MethodReport:
    """One method (the head or a baseline) under one segmenter mode."""

    summary: MethodSummary
    pooled: PooledReport
    folds: tuple[FoldRow, ...]

    @classmethod
    def from_dict(cls, doc: Doc) -> MethodReport:
        return cls(summary=MethodSummary.from_dict(doc["summary"]),
                   pooled=PooledReport.from_dict(doc["pooled"]),
                   folds=tuple(FoldRow.from_dict(r) for r in doc["folds"]))

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary.as_dict(), "pooled": self.pooled.as_dict(),
                "folds": [r.as_dict() for r in self.folds]}


@dataclass(frozen=True)
class Comparison:
    """The head's pooled weighted F1 minus a baseline's, with a paired bootstrap interval."""

    weighted_f1: float
    ci95: Interval

    @classmethod
    def from_dict(cls, doc: Doc) -> Comparison:
        return cls(weighted_f1=doc["weighted_f1"], ci95=Interval.of(doc["ci95"]))

    def as_dict(self) -> dict[str, Any]:
        return {"weighted_f1": self.weighted_f1, "ci95": self.ci95.as_list()}


@dataclass(frozen=True)
class AblationRow:
    """The head under one segmenter mode: the segmentation ablation's line."""

    segmenter: str
    weighted_f1: Stat
    weighted_f1_ci95: Interval
    qwk: Stat

    @classmethod
    def from_dict(cls, doc: Doc) -> AblationRow:
        return cls(segmenter=doc["segmenter"], weighted_f1=Stat.from_dict(doc["weighted_f1"]),
                   weighted_f1_ci95=Interval.of(doc["weighted_f1_ci95"]),
                   qwk=Stat.from_dict(doc["qwk"]))

    def as_dict(self) -> dict[str, Any]:
        return {"segmenter": self.segmenter, "weighted_f1": self.weighted_f1.as_dict(),
                "weighted_f1_ci95": self.weighted_f1_ci95.as_list(), "qwk": self.qwk.as_dict()}


@dataclass(frozen=True)
class ScalingPoint:
    """The head trained on a fraction of each training fold's patients."""

    fraction: float
    #: mean over folds of the patients and images the head was trained on
    train_patients: float | None
    train_images: float | None
    weighted_f1: Stat
    accuracy: Stat
    qwk: Stat

    @classmethod
    def from_dict(cls, doc: Doc) -> ScalingPoint:
        return cls(fraction=doc["fraction"], train_patients=doc["train_patients"],
                   train_images=doc["train_images"],
                   weighted_f1=Stat.from_dict(doc["weighted_f1"]),
                   accuracy=Stat.from_dict(doc["accuracy"]), qwk=Stat.from_dict(doc["qwk"]))

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "train_patients": self.train_patients,
                "train_images": self.train_images, "weighted_f1": self.weighted_f1.as_dict(),
                "accuracy": self.accuracy.as_dict(), "qwk": self.qwk.as_dict()}


@dataclass(frozen=True)
class DataSummary:
    """What was evaluated."""

    images: int
    patients: int
    references: int
    classes: tuple[str, ...]
    class_counts: tuple[int, ...]
    splits: int

    @classmethod
    def of(cls, data: LabelledImages, refs: References, splits: Sequence[Split]) -> DataSummary:
        return cls(
            images=len(data), patients=len(np.unique(data.patient_ids)),
            references=len(refs.image_ids), classes=tuple(data.classes),
            class_counts=tuple(np.bincount(data.labels, minlength=len(data.classes)).tolist()),
            splits=len(splits),
        )

    @classmethod
    def from_dict(cls, doc: Doc) -> DataSummary:
        return cls(images=doc["images"], patients=doc["patients"], references=doc["references"],
                   classes=tuple(doc["classes"]), class_counts=tuple(doc["class_counts"]),
                   splits=doc["splits"])

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "patients": self.patients,
                "references": self.references, "classes": list(self.classes),
                "class_counts": list(self.class_counts), "splits": self.splits}


@dataclass(frozen=True)
class MaskScore:
    """SegGPT's mask of one reference image against its manual mask."""

    image_id: int
    prompts: tuple[int, ...]
    dice: float
    iou: float

    @classmethod
    def from_dict(cls, doc: Doc) -> MaskScore:
        return cls(image_id=doc["image_id"], prompts=tuple(doc["prompts"]), dice=doc["dice"],
                   iou=doc["iou"])

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "prompts": list(self.prompts), "dice": self.dice,
                "iou": self.iou}


@dataclass(frozen=True)
class SegmentationQuality:
    """SegGPT against the manual masks, prompts leave-one-patient-out."""

    images: int
    #: references that had no other patient's reference to prompt them
    no_prompts: int
    dice: OverlapStat
    iou: OverlapStat
    per_image: tuple[MaskScore, ...]

    @classmethod
    def from_dict(cls, doc: Doc) -> SegmentationQuality:
        return cls(images=doc["images"], no_prompts=doc["no_prompts"],
                   dice=OverlapStat.from_dict(doc["dice"]), iou=OverlapStat.from_dict(doc["iou"]),
                   per_image=tuple(MaskScore.from_dict(p) for p in doc["per_image"]))

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "no_prompts": self.no_prompts,
                "dice": self.dice.as_dict(), "iou": self.iou.as_dict(),
                "per_image": [p.as_dict() for p in self.per_image]}


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    #: the weights' digest: which weights gave these numbers
    digest: str

    @classmethod
    def from_dict(cls, doc: Doc) -> ModelIdentity:
        return cls(name=doc["name"], digest=doc["digest"])

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest}


@dataclass(frozen=True)
class ModelIdentities:
    """The models behind the numbers; no segmenter when only `none` was evaluated."""

    embedder: ModelIdentity
    prompts: int
    segmenter: ModelIdentity | None = None

    @classmethod
    def from_dict(cls, doc: Doc) -> ModelIdentities:
        seg = doc.get("segmenter")
        return cls(embedder=ModelIdentity.from_dict(doc["embedder"]), prompts=doc["prompts"],
                   segmenter=None if seg is None else ModelIdentity.from_dict(seg))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"embedder": self.embedder.as_dict(), "prompts": self.prompts}
        if self.segmenter is not None:  # the key is absent, not null, without a segmenter
            out["segmenter"] = self.segmenter.as_dict()
        return out


@dataclass(frozen=True)
class MethodF1:
    """One method's weighted F1 under one configuration: over folds, and pooled with its
    patient-bootstrap interval."""

    weighted_f1: Stat
    pooled: float
    pooled_ci95: Interval

    @classmethod
    def from_dict(cls, doc: Doc) -> MethodF1:
        return cls(weighted_f1=Stat.from_dict(doc["weighted_f1"]), pooled=doc["pooled"],
                   pooled_ci95=Interval.of(doc["pooled_ci95"]))

    def as_dict(self) -> dict[str, Any]:
        return {"weighted_f1": self.weighted_f1.as_dict(), "pooled": self.pooled,
                "pooled_ci95": self.pooled_ci95.as_list()}


@dataclass(frozen=True)
class ConfigurationScore:
    """One compared configuration (its models) and its head's and probe's weighted F1."""

    models: ModelIdentities
    #: "head", "logistic" -> its weighted F1
    methods: Mapping[str, MethodF1]
    #: Dice and IoU against the manual masks of the scored references (leave-one-patient-out
    #: prompts); None under --segmenter none or without references
    dice: OverlapStat | None = None
    iou: OverlapStat | None = None

    @classmethod
    def from_dict(cls, doc: Doc) -> ConfigurationScore:
        dice, iou = doc["dice"], doc["iou"]
        return cls(models=ModelIdentities.from_dict(doc["models"]),
                   methods={k: MethodF1.from_dict(v) for k, v in doc["methods"].items()},
                   dice=None if dice is None else OverlapStat.from_dict(dice),
                   iou=None if iou is None else OverlapStat.from_dict(iou))

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models.as_dict(),
                "methods": {k: v.as_dict() for k, v in self.methods.items()},
                "dice": None if self.dice is None else self.dice.as_dict(),
                "iou": None if self.iou is None else self.iou.as_dict()}


@dataclass(frozen=True)
class MeanDifference:
    """A difference of means over the same items, with a paired patient-bootstrap interval."""

    difference: float
    ci95: Interval

    @classmethod
    def from_dict(cls, doc: Doc) -> MeanDifference:
        return cls(difference=doc["difference"], ci95=Interval.of(doc["ci95"]))

    def as_dict(self) -> dict[str, Any]:
        return {"difference": self.difference, "ci95": self.ci95.as_list()}


@dataclass(frozen=True)
class ModelDifference:
    """Configuration `of` minus configuration `minus` (the first), per method, paired."""

    of: int
    minus: int
    methods: Mapping[str, Comparison]
    #: mean Dice of `of` minus `minus` over the same references, paired patient bootstrap
    dice: MeanDifference | None = None

    @classmethod
    def from_dict(cls, doc: Doc) -> ModelDifference:
        dice = doc["dice"]
        return cls(of=doc["of"], minus=doc["minus"],
                   methods={k: Comparison.from_dict(v) for k, v in doc["methods"].items()},
                   dice=None if dice is None else MeanDifference.from_dict(dice))

    def as_dict(self) -> dict[str, Any]:
        return {"of": self.of, "minus": self.minus,
                "methods": {k: v.as_dict() for k, v in self.methods.items()},
                "dice": None if self.dice is None else self.dice.as_dict()}


@dataclass(frozen=True)
class ModelComparison:
    """Several embedders or segmenters on the same folds, seeds and patients.

    Every configuration is cross-validated on the same splits under `segmenter` mode; the
    differences are pooled weighted F1 of a later configuration minus the first's, with a 95%
    interval from the same patient-bootstrap resamples for both (paired).
    """

    segmenter: str
    configurations: tuple[ConfigurationScore, ...]
    differences: tuple[ModelDifference, ...]

    @classmethod
    def from_dict(cls, doc: Doc) -> ModelComparison:
        return cls(segmenter=doc["segmenter"],
                   configurations=tuple(ConfigurationScore.from_dict(c)
                                        for c in doc["configurations"]),
                   differences=tuple(ModelDifference.from_dict(d) for d in doc["differences"]))

    def as_dict(self) -> dict[str, Any]:
        return {"segmenter": self.segmenter,
                "configurations": [c.as_dict() for c in self.configurations],
                "differences": [d.as_dict() for d in self.differences]}


@dataclass(frozen=True)
class Forwards:
    """Images through each model in this run: what the feature cache saved shows here."""

    embedder_images: int
    segmenter_queries: int
    segmenter_prompt_pairs: int

    @classmethod
    def from_dict(cls, doc: Doc) -> Forwards:
        # Also the feature store's counters (their as_dict()): the report keeps a frozen copy.
        return cls(embedder_images=doc["embedder_images"],
                   segmenter_queries=doc["segmenter_queries"],
                   segmenter_prompt_pairs=doc["segmenter_prompt_pairs"])

    def as_dict(self) -> dict[str, Any]:
        return {"embedder_images": self.embedder_images,
                "segmenter_queries": self.segmenter_queries,
                "segmenter_prompt_pairs": self.segmenter_prompt_pairs}


@dataclass(frozen=True)
class NaiveForwards:
    """Model forwards a per-fold recomputation of every feature would need."""

    embedder_images: int
    segmenter_queries: int

    @classmethod
    def from_dict(cls, doc: Doc) -> NaiveForwards:
        return cls(embedder_images=doc["embedder_images"],
                   segmenter_queries=doc["segmenter_queries"])

    def as_dict(self) -> dict[str, Any]:
        return {"embedder_images": self.embedder_images,
                "segmenter_queries": self.segmenter_queries}


@dataclass(frozen=True)
class RunInfo:
    """What this run cost; unlike the rest of the report it differs between a cold and a warm
    feature cache."""

    forwards: Forwards
    naive_forwards: NaiveForwards
    #: wall seconds per phase, rounded to ms; "total" for the whole evaluation
    seconds: Mapping[str, float]

    @property
    def total_seconds(self) -> float:
        return self.seconds["total"]

    @classmethod
    def from_dict(cls, doc: Doc) -> RunInfo:
        return cls(forwards=Forwards.from_dict(doc["forwards"]),
                   naive_forwards=NaiveForwards.from_dict(doc["naive_forwards"]),
                   seconds=dict(doc["seconds"]))

    def as_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards.as_dict(),
                "naive_forwards": self.naive_forwards.as_dict(), "seconds": dict(self.seconds)}


@dataclass(frozen=True)
class MethodScores:
    """Every method under every segmenter mode, scored (the costly part of the report)."""

    #: segmenter mode -> method ("head", "majority", "logistic") -> its report
    results: Mapping[str, Mapping[str, MethodReport]]
    #: segmenter mode -> "head_minus_<baseline>" -> the paired difference
    comparison: Mapping[str, Mapping[str, Comparison]]
    ablation: tuple[AblationRow, ...]
    #: empty unless the scaling curve was computed
    scaling: tuple[ScalingPoint, ...]
    #: segmenter mode -> method -> its weighted-F1 bootstrap replicates (for paired differences
    #: with other configurations; not part of the report)
    replicates: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationReport:
    """The result of `eczema-batch evaluate`; `as_dict()` is its JSON document."""

    settings: EvaluationSettings
    data: DataSummary
    results: Mapping[str, Mapping[str, MethodReport]]
    comparison: Mapping[str, Mapping[str, Comparison]]
    ablation: tuple[AblationRow, ...]
    scaling: tuple[ScalingPoint, ...]
    #: None without a segmenter mode or without manual masks
    segmentation: SegmentationQuality | None
    models: ModelIdentities
    study: str | None
    #: prompts from the image's own patient or the test fold: must be 0
    prompt_leaks: int
    run: RunInfo
    #: who was left out of scoring and why; None (absent in JSON) when no model was derived
    leakage: LeakageReport | None = None
    #: several embedders or segmenters side by side; None (absent in JSON) with one of each
    model_comparison: ModelComparison | None = None
    #: raters vs raters and the model vs each rater; None unless some image has two raters
    agreement: AgreementReport | None = None
    #: the head per skin tone, body site and device; None when not asked for
    subgroups: SubgroupReport | None = None
    #: `--robustness`: held-out predictions under perturbed pixels; None (absent) unless asked
    robustness: RobustnessReport | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "settings": self.settings.as_dict(),
            "data": self.data.as_dict(),
            "results": {mode: {name: m.as_dict() for name, m in methods.items()}
                        for mode, methods in self.results.items()},
            "comparison": {mode: {name: c.as_dict() for name, c in comp.items()}
                           for mode, comp in self.comparison.items()},
            "ablation": [a.as_dict() for a in self.ablation],
            "scaling": [p.as_dict() for p in self.scaling],
            "segmentation": None if self.segmentation is None else self.segmentation.as_dict(),
            "models": self.models.as_dict(),
            "study": self.study,
            "prompt_leaks": self.prompt_leaks,
        }
        # Absent, not null, when not used: the document of a plain evaluation is unchanged.
        if self.leakage is not None:
            out["leakage"] = self.leakage.as_dict()
        if self.model_comparison is not None:
            out["model_comparison"] = self.model_comparison.as_dict()
        if self.agreement is not None:
            out["agreement"] = self.agreement.as_dict()
        if self.subgroups is not None:
            out["subgroups"] = self.subgroups.as_dict()
        if self.robustness is not None:
            out["robustness"] = self.robustness.as_dict()
        out["run"] = self.run.as_dict()
        return out

    @classmethod
    def from_dict(cls, doc: Doc) -> EvaluationReport:
        seg = doc["segmentation"]
        return cls(
            settings=_settings_from_dict(doc["settings"]),
            data=DataSummary.from_dict(doc["data"]),
            results={mode: {name: MethodReport.from_dict(m) for name, m in methods.items()}
                     for mode, methods in doc["results"].items()},
            comparison={mode: {name: Comparison.from_dict(c) for name, c in comp.items()}
                        for mode, comp in doc["comparison"].items()},
            ablation=tuple(AblationRow.from_dict(a) for a in doc["ablation"]),
            scaling=tuple(ScalingPoint.from_dict(p) for p in doc["scaling"]),
            segmentation=None if seg is None else SegmentationQuality.from_dict(seg),
            models=ModelIdentities.from_dict(doc["models"]),
            study=doc["study"],
            prompt_leaks=doc["prompt_leaks"],
            run=RunInfo.from_dict(doc["run"]),
            leakage=None if "leakage" not in doc else LeakageReport.from_dict(doc["leakage"]),
            model_comparison=None if "model_comparison" not in doc
            else ModelComparison.from_dict(doc["model_comparison"]),
            agreement=_agreement_from_dict(doc.get("agreement")),
            subgroups=_subgroups_from_dict(doc.get("subgroups")),
            robustness=_robustness_from_dict(doc.get("robustness")),
        )


def _agreement_from_dict(doc: Doc | None) -> AgreementReport | None:
    from eczema_batch.training.agreement import AgreementReport

    return None if doc is None else AgreementReport.from_dict(doc)


def _subgroups_from_dict(doc: Doc | None) -> SubgroupReport | None:
    from eczema_batch.training.subgroups import SubgroupReport

    return None if doc is None else SubgroupReport.from_dict(doc)
def _robustness_from_dict(doc: Doc | None) -> RobustnessReport | None:
    from eczema_batch.training.robustness import RobustnessReport

    return None if doc is None else RobustnessReport.from_dict(doc)


def _settings_from_dict(doc: Doc) -> EvaluationSettings:
    # Imported here: training.evaluate imports this module.
    from eczema_batch.pipeline.train import TrainSettings
    from eczema_batch.training.evaluate import EvaluationSettings

    return EvaluationSettings(
        folds=doc["folds"], repeats=doc["repeats"], segmenter=doc["segmenter"],
        fractions=tuple(doc["fractions"]), seed=doc["seed"], bootstrap=doc["bootstrap"],
        # The document lists the modes evaluated: more than one when the ablation ran.
        ablation=len(doc["ablation"]) > 1, train=TrainSettings(**doc["train"]),
        reference_label=doc.get("reference_label", "newest"),
        subgroups=doc.get("subgroups", False),
        robustness_images=doc.get("robustness_images"),
    )
