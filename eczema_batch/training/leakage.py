"""Which patients `evaluate` may score: none whose labels or masks trained a model it uses.

A derived model (`pipeline.derived`) records the patients whose labels or masks trained it
(`supervised`): a SegGPT tuned on a patient's manual masks has seen the answer for that patient,
so its masks (and every score built on them) for that patient are optimistic. The rule:

- the models are every embedder and segmenter the evaluation uses (all the compared ones
  together, so a comparison is paired on the same patients); a registered model trained on
  none of the catalogue's patients;
- their supervised patients are never in a test fold: they are left out of scoring (the
  predictions, every metric, the bootstrap, segmentation quality against manual masks);
- they still help the others: their images join every training fold (the head learns from
  them, which says nothing about the test patients) and their masks still prompt SegGPT;
- an embedder adapted self-supervised on a patient's images without labels (`unlabelled`) is
  allowed to score that patient (no label or mask was used), and the report says so.

Patients are matched by the study's name and the subject code, as the identity records them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from eczema_batch.catalogue.models import Patient, Study
from eczema_batch.errors import UsageError
from eczema_batch.pipeline.derived import DerivedIdentity, PatientRef, read_identity
from eczema_batch.pipeline.evaluate import Split, grouped_splits
from eczema_batch.pipeline.loading import find_weights
from eczema_batch.pipeline.registry import Kind, get_spec
from eczema_batch.training.data import LabelledImages, References

Doc = Mapping[str, Any]


@dataclass(frozen=True)
class UsedModel:
    """A model an evaluation computes with, and its identity when it was derived."""

    kind: Kind
    name: str
    identity: DerivedIdentity | None = None


def read_used_model(name: str, *, kind: Kind, model_dir: str | None) -> UsedModel:
    """The model `name` as it will be loaded: the identity beside the weights it loads, if any."""
    folder = find_weights(get_spec(name, model_dir=model_dir), model_dir=model_dir)
    return UsedModel(kind=kind, name=name, identity=read_identity(folder))


# --- the report's part --------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedModelUse:
    """A derived model the evaluation used: what it came from and how many patients trained it."""

    kind: str
    name: str
    base: str
    method: str
    #: patients whose labels or masks trained it (never scored)
    supervised: int
    #: patients whose images trained it without labels or masks (scored, and said so)
    unlabelled: int
    #: patients its training command held out
    holdout: int

    @classmethod
    def of(cls, model: UsedModel, identity: DerivedIdentity) -> DerivedModelUse:
        return cls(kind=model.kind, name=model.name, base=identity.base, method=identity.method,
                   supervised=len(identity.supervised), unlabelled=len(identity.unlabelled),
                   holdout=len(identity.holdout))

    @classmethod
    def from_dict(cls, doc: Doc) -> DerivedModelUse:
        return cls(**{k: doc[k] for k in ("kind", "name", "base", "method", "supervised",
                                          "unlabelled", "holdout")})

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "base": self.base, "method": self.method,
                "supervised": self.supervised, "unlabelled": self.unlabelled,
                "holdout": self.holdout}


@dataclass(frozen=True)
class ExcludedPatient:
    """A catalogue patient left out of scoring, and the models their labels or masks trained."""

    study: str
    subject: str
    #: labelled images of the patient that were not scored (they still train heads)
    labelled_images: int
    #: manual masks of the patient not scored for Dice/IoU (they still prompt SegGPT)
    references: int
    models: tuple[str, ...]

    @classmethod
    def from_dict(cls, doc: Doc) -> ExcludedPatient:
        return cls(study=doc["study"], subject=doc["subject"],
                   labelled_images=doc["labelled_images"], references=doc["references"],
                   models=tuple(doc["models"]))

    def as_dict(self) -> dict[str, Any]:
        return {"study": self.study, "subject": self.subject,
                "labelled_images": self.labelled_images, "references": self.references,
                "models": list(self.models)}


@dataclass(frozen=True)
class LeakageReport:
    """What the leakage rule did; in the report only when a derived model was used."""

    derived: tuple[DerivedModelUse, ...]
    excluded: tuple[ExcludedPatient, ...]
    #: supervised patients with no labelled image nor reference evaluated here (another study or
    #: catalogue): nothing of theirs is scored
    not_evaluated: int
    #: labelled patients scored (in the test folds)
    scored_patients: int
    #: derived models that saw patients' images without labels (self-supervised adaptation)
    adapted_on_unlabelled: tuple[str, ...]

    @classmethod
    def from_dict(cls, doc: Doc) -> LeakageReport:
        return cls(derived=tuple(DerivedModelUse.from_dict(d) for d in doc["derived"]),
                   excluded=tuple(ExcludedPatient.from_dict(e) for e in doc["excluded"]),
                   not_evaluated=doc["not_evaluated"],
                   scored_patients=doc["scored_patients"],
                   adapted_on_unlabelled=tuple(doc["adapted_on_unlabelled"]))

    def as_dict(self) -> dict[str, Any]:
        return {"derived": [d.as_dict() for d in self.derived],
                "excluded": [e.as_dict() for e in self.excluded],
                "not_evaluated": self.not_evaluated,
                "scored_patients": self.scored_patients,
                "adapted_on_unlabelled": list(self.adapted_on_unlabelled)}

    def sentences(self) -> list[str]:
        """The rule's outcome in words, for the terminal."""
        out = []
        for d in self.derived:
            out.append(f"{d.kind} {d.name} is derived ({d.method} of {d.base}): labels or masks "
                       f"of {d.supervised} patient(s), images without labels of {d.unlabelled}, "
                       f"{d.holdout} held out")
        if self.excluded:
            images = sum(e.labelled_images for e in self.excluded)
            masks = sum(e.references for e in self.excluded)
            out.append(f"{len(self.excluded)} patient(s) not scored ({images} labelled images, "
                       f"{masks} manual masks): their labels or masks trained a model used here "
                       "(they still train the heads and prompt SegGPT)")
        if self.not_evaluated:
            out.append(f"{self.not_evaluated} patient(s) that trained these models have no "
                       "labelled image or manual mask evaluated here")
        for name in self.adapted_on_unlabelled:
            out.append(f"{name} was adapted on unlabelled images of the evaluated patients "
                       "(allowed: no label or mask; its scores include those patients)")
        out.append(f"{self.scored_patients} labelled patient(s) scored")
        return out


# --- the rule -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exclusion:
    """Catalogue patients never to score, and the report of why."""

    patient_ids: frozenset[int]
    report: LeakageReport | None


def exclusion(session: Session, models: Sequence[UsedModel], data: LabelledImages,
              refs: References) -> Exclusion:
    """Who trained the `models` (deduplicated by kind and name), matched to catalogue patients.

    Only patients with labelled images in `data` or references in `refs` could be scored; the
    others are counted as not evaluated here.
    """
    derived: dict[tuple[str, str], tuple[UsedModel, DerivedIdentity]] = {}
    for model in models:
        if model.identity is not None:
            derived.setdefault((model.kind, model.name), (model, model.identity))
    if not derived:
        return Exclusion(frozenset(), None)
    trained_by: dict[PatientRef, list[str]] = {}
    for model, identity in derived.values():
        for ref in identity.supervised:
            names = trained_by.setdefault(ref, [])
            if model.name not in names:
                names.append(model.name)
    ids = patient_ids(session, trained_by)
    labelled, masks = _counts(data.patient_ids), _counts(refs.patient_ids)
    excluded = sorted(
        ((ExcludedPatient(study=ref.study, subject=ref.subject,
                          labelled_images=labelled.get(ids[ref], 0),
                          references=masks.get(ids[ref], 0), models=tuple(names)), ids[ref])
         for ref, names in trained_by.items()
         if ref in ids and (ids[ref] in labelled or ids[ref] in masks)),
        key=lambda pair: (pair[0].study, pair[0].subject),
    )
    excluded_ids = frozenset(pid for _, pid in excluded)
    evaluated = set(labelled)
    adapted = tuple(m.name for m, identity in derived.values()
                    if set(patient_ids(session, identity.unlabelled).values()) & evaluated)
    report = LeakageReport(
        derived=tuple(DerivedModelUse.of(m, i) for m, i in derived.values()),
        excluded=tuple(e for e, _ in excluded),
        not_evaluated=len(trained_by) - len(excluded),
        scored_patients=len(evaluated - excluded_ids),
        adapted_on_unlabelled=adapted,
    )
    return Exclusion(excluded_ids, report)


def _counts(patients: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(patients, return_counts=True)
    return {int(p): int(n) for p, n in zip(values, counts, strict=True)}


def patient_ids(session: Session, refs: Iterable[PatientRef]) -> dict[PatientRef, int]:
    """Catalogue ids of the patients `refs` names (studies.name, patients.subject_code)."""
    wanted = set(refs)
    if not wanted:
        return {}
    rows = session.execute(
        select(Study.name, Patient.subject_code, Patient.id)
        .join(Study, Patient.study_id == Study.id)
        .where(Study.name.in_(sorted({r.study for r in wanted})))
    )
    return {ref: int(pid) for study, code, pid in rows
            if (ref := PatientRef(study, code)) in wanted}


def check_scorable(data: LabelledImages, excluded: frozenset[int], *, folds: int,
                   models: Sequence[str]) -> None:
    """Enough patients left to score for `folds` folds, or an error that says what to do."""
    patients = set(np.unique(data.patient_ids).tolist())
    left = len(patients - excluded)
    if left >= folds:
        return
    if not excluded:
        raise UsageError(f"only {left} labelled patients for {folds} folds grouped by patient: "
                         f"use --folds {left} or fewer")
    raise UsageError(
        f"only {left} labelled patient(s) left to score for {folds} folds: the labels or masks "
        f"of {len(patients & excluded)} trained {', '.join(models)}, and a model is never "
        "scored on the patients that trained it. Derive the model with some patients held out "
        f"(--holdout), use --folds {left} or fewer (at least 2), or evaluate the registered "
        "model it came from"
    )


def scored_splits(data: LabelledImages, excluded: frozenset[int], *, folds: int, repeats: int,
                  seed: int) -> list[Split]:
    """Patient-grouped folds over the patients that may be scored; the excluded patients' images
    join every training fold. With nobody excluded these are exactly `grouped_splits`."""
    out_mask = np.isin(data.patient_ids, sorted(excluded))
    scored, kept = np.flatnonzero(~out_mask), np.flatnonzero(out_mask)
    inner = grouped_splits(data.labels[scored], data.patient_ids[scored], folds=folds,
                           repeats=repeats, seed=seed)
    return [Split(s.repeat, s.fold, np.sort(np.concatenate([scored[s.train], kept])),
                  scored[s.test]) for s in inner]
