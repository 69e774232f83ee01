"""Models derived from a registered one by training on a study (an adapted embedder, a tuned
segmenter), found by name in the model folder like any other model.

A derived model is a `save_pretrained` folder `<model_dir>/<name>/` (config.json + safetensors)
with an identity file beside the weights: which registered model it started from (name and
weights digest), how it was trained (method, settings, seed, loss curve), on which images, and
which patients' labels or masks it learnt from (`supervised`), whose images it saw without them
(`unlabelled`) and which were held out. `evaluate` reads the identity to keep every patient that
trained a model out of that model's scores.

The folder is written under a hidden temporary name and renamed into place only when the
weights and the identity are complete, so the loader never finds a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from eczema_batch.errors import UsageError
from eczema_batch.pipeline.registry import Kind, ModelSpec

#: the identity file of a derived model, beside its config.json
IDENTITY_FILE = "eczema-batch-model.json"
#: the identity format's version
IDENTITY_VERSION = 1
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True, order=True)
class PatientRef:
    """A patient as a catalogue-independent pair: the study's name and the subject code."""

    study: str
    subject: str


@dataclass(frozen=True)
class DerivedIdentity:
    """Where a derived model came from and what trained it."""

    name: str
    kind: Kind
    #: registry name and weights digest of the model it started from
    base: str
    base_digest: str
    #: "dino-adaptation" (self-supervised, no labels) or "seggpt-tuning" (manual masks)
    method: str
    settings: dict[str, Any]
    seed: int
    #: catalogue ids of the images it trained on (in the catalogue named by `catalogue`)
    images: tuple[int, ...]
    #: patients whose labels or masks trained it: never scored with this model
    supervised: tuple[PatientRef, ...] = ()
    #: patients whose images trained it without labels or masks (self-supervised adaptation)
    unlabelled: tuple[PatientRef, ...] = ()
    #: patients set aside by the training command (their masks did not train it)
    holdout: tuple[PatientRef, ...] = ()
    loss_curve: tuple[float, ...] = ()
    created_at: str = ""
    catalogue: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = IDENTITY_VERSION
        for key in ("supervised", "unlabelled", "holdout"):
            data[key] = [[p.study, p.subject] for p in getattr(self, key)]
        data["images"] = list(self.images)
        data["loss_curve"] = list(self.loss_curve)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DerivedIdentity:
        if data.get("version") != IDENTITY_VERSION:
            raise UsageError(
                f"derived model {data.get('name')!r}: identity version {data.get('version')!r} "
                f"is not {IDENTITY_VERSION}; re-create it with this eczema-batch"
            )

        def refs(key: str) -> tuple[PatientRef, ...]:
            return tuple(PatientRef(str(s), str(c)) for s, c in data.get(key, []))

        return cls(
            name=str(data["name"]), kind=data["kind"], base=str(data["base"]),
            base_digest=str(data["base_digest"]), method=str(data["method"]),
            settings=dict(data.get("settings", {})), seed=int(data.get("seed", 0)),
            images=tuple(int(i) for i in data.get("images", [])),
            supervised=refs("supervised"), unlabelled=refs("unlabelled"),
            holdout=refs("holdout"),
            loss_curve=tuple(float(v) for v in data.get("loss_curve", [])),
            created_at=str(data.get("created_at", "")), catalogue=str(data.get("catalogue", "")),
            extra=dict(data.get("extra", {})),
        )


def check_name(name: str) -> str:
    """A derived model's name: lower-case letters, digits, '-', '_', '.'; not hidden."""
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS or len(name) > 100:
        raise UsageError(
            f"model name {name!r}: use 1-100 lower-case letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )
    return name


def new_model_dir(model_dir: Path | None, name: str, *, replace_existing: bool) -> Path:
    """The model folder a derived model `name` is about to be trained into: a UsageError, before
    any work, for a bad name, no folder, or a model of that name already there."""
    check_name(name)
    if model_dir is None:
        raise UsageError("a trained model is written into the model folder: set "
                         "ECZEMA_BATCH_MODEL_DIR (or pass --model-dir)")
    folder = Path(model_dir).expanduser()
    if (folder / name).exists() and not replace_existing:
        raise UsageError(f"{folder / name} already exists: choose another --name or pass "
                         "--replace")
    return folder


def read_identity(folder: Path) -> DerivedIdentity | None:
    """The identity of the derived model in `folder`, or None for a plain model folder."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable model identity ({error})") from error
    return DerivedIdentity.from_json(data)


def derived_spec(name: str, model_dir: Path | str | None, base_of: Callable[[str], ModelSpec]
                 ) -> ModelSpec | None:
    """The spec of the derived model `name` in `model_dir`: its base model's, renamed."""
    if model_dir is None:
        return None
    folder = Path(model_dir).expanduser() / name
    identity = read_identity(folder)
    if identity is None:
        return None
    base = base_of(identity.base)
    # a segmenter tuned at another resolution (tune-segmenter --image-size) runs at that size
    size = identity.settings.get("image_size") if identity.kind == "segmenter" else None
    return replace(
        base, name=name, hub_id=None, image_size=int(size) if size else base.image_size,
        description=f"{identity.method} of {identity.base} ({identity.created_at[:10]})",
    )


def list_derived(model_dir: Path | str | None) -> list[DerivedIdentity]:
    """The derived models in `model_dir`, by name."""
    if model_dir is None or not Path(model_dir).expanduser().is_dir():
        return []
    found = []
    for folder in sorted(Path(model_dir).expanduser().iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        identity = read_identity(folder)
        if identity is not None:
            found.append(identity)
    return found


def publish(model_dir: Path | str, name: str, write: Callable[[Path], None],
            identity: DerivedIdentity, *, replace_existing: bool = False) -> Path:
    """Write a derived model as `<model_dir>/<name>` atomically and return its folder.

    `write(folder)` saves the weights (`save_pretrained`) into a hidden temporary folder beside
    the destination; the identity is written last and the folder renamed into place, so a kill
    at any point leaves either no model or a complete one.
    """
    check_name(name)
    root = Path(model_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    destination = root / name
    if destination.exists() and not replace_existing:
        raise UsageError(
            f"{destination} already exists: choose another --name or pass --replace"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    try:
        write(staging)
        if not (staging / "config.json").is_file():
            raise RuntimeError(f"writing {name} produced no config.json")
        text = json.dumps(identity.as_json(), indent=2, sort_keys=True) + "\n"
        with (staging / IDENTITY_FILE).open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if destination.exists():
            old = root / f".{name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            destination.rename(old)
            staging.rename(destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination
