"""Settings, read from ECZEMA_BATCH_* environment variables (and a .env file in the working folder).

`get_settings()` builds them lazily once per process; tests call `get_settings.cache_clear()` after
changing the environment.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eczema_batch.errors import ConfigError, UsageError

#: The largest image ingest decodes. A 40,000 x 40,000 PNG header is a decompression bomb, not a
#: photograph: the largest phone and dermatoscope cameras stay well under 200 MP.
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
#: The largest study file ingest reads (it is read into memory whole). An uncompressed 200 MP RGB
#: DICOM is 600 MB; a larger file is not a study photograph.
DEFAULT_MAX_FILE_BYTES = 1 << 30


_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(name: str) -> tuple[str, int | None]:
    """`auto`, `cpu`, `cuda` or `cuda:N` as (kind, index); anything else is a usage error.

    Checked without torch, so a typo is refused before a run creates any job.
    """
    match = _DEVICE_NAME.match(name.strip().lower())
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        hint = " (a GPU is `cuda`)" if name.strip().lower().startswith("gpu") else ""
        raise UsageError(f"device {name!r} is not one of auto, cpu, cuda or cuda:N{hint}")
    index = match.group(2)
    return match.group(1), int(index) if index is not None else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ECZEMA_BATCH_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    home: Path = Field(
        default=Path(".eczema-batch"),
        description="workspace folder: the embedded SQLite catalogue, masks, reports",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite in the workspace folder"
    )
    broker_url: str | None = Field(default=None, description="Celery broker, e.g. redis://host:6379/0")
    # Passwords kept out of the environment (Docker secrets, /run/secrets/NAME): the file's
    # content goes into the URL's password, which the URL itself then must not carry.
    database_password_file: Path | None = Field(
        default=None, description="file holding the password of ECZEMA_BATCH_DATABASE_URL"
    )
    broker_password_file: Path | None = Field(
        default=None, description="file holding the password of ECZEMA_BATCH_BROKER_URL"
    )
    lease_seconds: float = Field(
        default=300, gt=0,
        description="a job not heard from for this long is taken over (its worker died); "
        "heartbeats renew it every third of it",
    )
    visibility_timeout: int = Field(
        default=7200, ge=1,
        description="seconds before Redis re-delivers a task a worker took but never finished: "
        "longer than the slowest chunk",
    )
    worker_device: str | None = Field(
        default=None, description="device a worker computes on (overrides the run's device)"
    )
    model_dir: Path | None = Field(
        default=None, description="folder of model weights, one sub-folder per model name"
    )
    segmenter_model: str = "seggpt-vit-large"
    embedder_model: str = "dino-vitb16"
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    prompts: int = Field(default=2, ge=1, description="K reference images that prompt SegGPT")
    chunk_size: int = Field(default=64, ge=1, description="image ids per job")
    decode_threads: int = Field(
        default_factory=lambda: min(8, os.cpu_count() or 1), ge=1,
        description="threads decoding images while the models compute",
    )
    prompt_cache_mb: int = Field(
        default=512, ge=0,
        description="MB of decoded reference images each worker process keeps for SegGPT's "
                    "prompts (0: decode them for every chunk)",
    )
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    max_file_bytes: int = Field(
        default=DEFAULT_MAX_FILE_BYTES, ge=1,
        description="larger study files are rejected at ingest from their size, unread",
    )
    image_root: Path | None = Field(
        default=None,
        description="where workers find study folders when they are mounted elsewhere",
    )
    ingest_workers: int = Field(default=0, ge=0, description="decode processes; 0 = one per core")
    ingest_batch_files: int = Field(
        default=500, ge=1, description="files per ingest transaction (a kill loses at most one)"
    )
    # Review queue and trends (eczema_batch/report): what a clinician should look at again, and
    # what counts as a change. Severity is scored 0-3 (the expected class of the visit).
    review_min_confidence: float = Field(
        default=0.5, ge=0, le=1,
        description="flag an image for review when its top class probability is below this",
    )
    review_min_prompt_similarity: float = Field(
        default=0.5, ge=-1, le=1,
        description="flag an image when its SegGPT prompts' mean cosine similarity is below this",
    )
    trend_stable_band: float = Field(
        default=0.5, ge=0,
        description="a change from baseline (expected score, 0-3) within +/- this is 'stable'",
    )
    responder_classes: int = Field(
        default=1, ge=1,
        description="a responder's last visit is at least this many classes better than baseline",
    )
    # The image-quality gate (eczema_batch/imaging/quality.py, QualityThresholds: the same
    # defaults, with the measurements that chose them). Compared at ingest, stored per image.
    quality_min_sharpness: float = Field(
        default=3.0, ge=0,
        description="flag an image as blurred below this variance of its Laplacian (512 px copy)",
    )
    quality_min_luminance: float = Field(
        default=0.15, ge=0, le=1, description="flag as underexposed below this mean luminance (0-1)"
    )
    quality_max_luminance: float = Field(
        default=0.85, ge=0, le=1, description="flag as overexposed above this mean luminance (0-1)"
    )
    quality_max_dark_share: float = Field(
        default=0.25, ge=0, le=1, description="flag when more of the pixels than this are black"
    )
    quality_max_bright_share: float = Field(
        default=0.10, ge=0, le=1, description="flag when more of the pixels than this are white"
    )
    quality_max_cast: float = Field(
        default=4.0, ge=0,
        description="flag a colour cast: the picture's median colour this far (CIELAB units) "
        "outside skin's red-to-yellow hues",
    )
    # Several raters (eczema_batch/catalogue/labels.py): which label is an image's truth.
    reference_label: str = Field(
        default="newest",
        description="reference label rule: newest, majority (ties: the more severe class), or "
        "adjudicator:NAME (that rater's label, else newest; adjudicator:NAME:majority)",
    )

    # Pseudonyms of DICOM PatientID, for a study that keys on it (`ingest --patient-id-pseudonyms`).
    pseudonym_key: SecretStr | None = Field(
        default=None, description="secret key of PatientID pseudonyms (HMAC-SHA-256)"
    )
    pseudonym_key_file: Path | None = Field(
        default=None, description="file holding that key (its first line), instead of the variable"
    )

    @field_validator("reference_label")
    @classmethod
    def _check_reference_label(cls, value: str) -> str:
        from eczema_batch.catalogue.labels import parse_reference_rule

        try:
            return str(parse_reference_rule(value))
        except UsageError as exc:  # -> pydantic's ValidationError, which names the field
            raise ValueError(str(exc)) from None

    @field_validator("device", "worker_device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None:
            parse_device(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ConfigError(
                f"ECZEMA_BATCH_DATABASE_URL={value!r} is not a database URL: use e.g. "
                "sqlite:///path/catalogue.sqlite3 or postgresql+psycopg://user@host/db"
            )
        return value

    @model_validator(mode="after")
    def _passwords_from_files(self) -> Settings:
        if self.database_password_file is not None:
            self.database_url = url_with_password_file(
                self.database_url, self.database_password_file, "DATABASE"
            )
        if self.broker_password_file is not None:
            self.broker_url = url_with_password_file(
                self.broker_url, self.broker_password_file, "BROKER"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'catalogue.sqlite3').resolve()}"


def url_with_password_file(url: str | None, path: Path, what: str) -> str:
    """`url` with the password read from `path` (one line; percent-encoded into the URL)."""
    setting = f"ECZEMA_BATCH_{what}_PASSWORD_FILE"
    if not url:
        raise ConfigError(f"{setting} is set but ECZEMA_BATCH_{what}_URL is not: set the URL "
                          "without its password")
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{setting}={path}: cannot read the password ({exc.strerror})") from None
    if not password or "\n" in password:
        raise ConfigError(f"{setting}={path}: the file must hold the password alone, on one line")
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"{setting}: ECZEMA_BATCH_{what}_URL names no server to log in to")
    if parts.password is not None:
        raise ConfigError(f"ECZEMA_BATCH_{what}_URL already has a password: with {setting}, "
                          "leave it out of the URL")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def pseudonym_key(settings: Settings) -> bytes:
    """The key of PatientID pseudonyms; ConfigError when none is set or it is too short."""
    from eczema_batch.identifiers import MIN_KEY_BYTES

    how = ("set ECZEMA_BATCH_PSEUDONYM_KEY, or ECZEMA_BATCH_PSEUDONYM_KEY_FILE to a file holding "
           "it, to a secret of at least 16 characters that you keep (e.g. the output of "
           "`python -c 'import secrets; print(secrets.token_hex(32))'`)")
    if settings.pseudonym_key is not None:
        key = settings.pseudonym_key.get_secret_value().strip().encode("utf-8")
    elif settings.pseudonym_key_file is not None:
        try:
            lines = settings.pseudonym_key_file.read_bytes().splitlines()
        except OSError as exc:
            raise ConfigError(
                f"ECZEMA_BATCH_PSEUDONYM_KEY_FILE cannot be read ({exc.strerror}): {how}"
            ) from None
        key = lines[0].strip() if lines else b""
    else:
        raise ConfigError(f"PatientID pseudonyms need a key: {how}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the pseudonym key is shorter than {MIN_KEY_BYTES} characters: {how}")
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
