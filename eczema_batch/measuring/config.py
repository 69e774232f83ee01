"""What a run computes with: stored with the run so every worker uses the same models."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from eczema_batch.catalogue.measurements import Targets
from eczema_batch.config import Settings, parse_device
from eczema_batch.errors import TransientError, UsageError

SegmenterMode = Literal["seggpt", "none", "manual"]
SEGMENTER_MODES: tuple[SegmenterMode, ...] = ("seggpt", "none", "manual")
#: What a run does with photographs the quality gate flagged: score them (and the review queue
#: shows the flag) or leave them out until a reviewer clears the flag.
QualityMode = Literal["flag", "skip"]
QUALITY_MODES: tuple[QualityMode, ...] = ("flag", "skip")

#: Decode queries with their longest side at least this: SegGPT wants 448 and the lesion crop,
#: often a quarter of the picture, still has ~256 px for DINO's 224 input.
QUERY_MAX_SIDE = 1024
#: Prompts and whole-image embeddings need no more than SegGPT's 448 px input.
PROMPT_MAX_SIDE = 448


@dataclass(frozen=True)
class RunConfig:
    segmenter_model: str
    embedder_model: str
    segmenter_mode: SegmenterMode = "seggpt"
    prompts: int = 2
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    model_dir: str | None = None
    image_root: str | None = None
    max_pixels: int = 200_000_000
    #: threads decoding images while the models compute (Pillow and pydicom release the GIL);
    #: a 12 MP JPEG takes ~11 ms even at reduced scale, so a fast GPU needs several
    decode_threads: int = 2
    #: decoded reference images kept per process for SegGPT's prompts (measuring.prompts)
    prompt_cache_mb: int = 512
    #: flag: score quality-flagged photographs too; skip: leave them unscored
    quality: QualityMode = "flag"

    def __post_init__(self) -> None:
        parse_device(self.device)
        if self.segmenter_mode not in SEGMENTER_MODES:
            raise UsageError(
                f"--segmenter {self.segmenter_mode!r}: use one of {', '.join(SEGMENTER_MODES)}"
            )
        if self.quality not in QUALITY_MODES:
            raise UsageError(f"--quality {self.quality!r}: use one of {', '.join(QUALITY_MODES)}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {
            "segmenter_model": settings.segmenter_model,
            "embedder_model": settings.embedder_model,
            "prompts": settings.prompts,
            "batch_size": settings.batch_size,
            "device": settings.device,
            "precision": settings.precision,
            "model_dir": str(settings.model_dir) if settings.model_dir else None,
            "image_root": str(settings.image_root) if settings.image_root else None,
            "max_pixels": settings.max_image_pixels,
            "decode_threads": settings.decode_threads,
            "prompt_cache_mb": settings.prompt_cache_mb,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def model_path(self) -> Path | None:
        return Path(self.model_dir) if self.model_dir else None


#: Keys older versions wrote into a run's settings that no longer mean anything (read and ignored).
_RETIRED_KEYS = frozenset({"exclude_same_patient"})


@dataclass(frozen=True)
class RunSettings:
    """What a run stores in `runs.settings` (JSON, flat), written and read back only here."""

    config: RunConfig
    targets: Targets
    study: str | None = None
    #: images `--retry-failed` gave another chance
    retried_images: int | None = None
    #: with --quality skip: {"images": flagged images left unscored, "reasons": {kind: images}}
    quality_skipped: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        doc = {**self.config.as_dict(), "targets": asdict(self.targets), "study": self.study}
        if self.retried_images is not None:
            doc["retried_images"] = self.retried_images
        if self.quality_skipped is not None:
            doc["quality_skipped"] = self.quality_skipped
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, run_id: int | None = None) -> RunSettings:
        """Read back; keys this version does not know are an error, not silently dropped: a
        newer planner may have meant something this worker would not do."""
        config_keys = set(RunConfig.__dataclass_fields__)
        known = {"targets", "study", "retried_images", "quality_skipped"}
        unknown = set(doc) - config_keys - known - _RETIRED_KEYS
        if unknown:
            raise TransientError(
                f"run {run_id} was planned by a newer eczema-batch (settings this one does not "
                f"know: {', '.join(sorted(unknown))}): upgrade this worker"
            )
        return cls(
            config=RunConfig(**{k: v for k, v in doc.items() if k in config_keys}),
            targets=Targets(**doc["targets"]),
            study=doc.get("study"),
            retried_images=doc.get("retried_images"),
            quality_skipped=doc.get("quality_skipped"),
        )
