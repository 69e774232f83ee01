"""Model specs, resolved by exact name (like timm's registry).

A spec says what a model is (kind, family, where its weights live on the hub, how its inputs are
prepared); `loading` turns a spec into a ready model. Names are resolved exactly: a tiny test model
is never used in place of a real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eczema_batch.errors import UsageError

Kind = Literal["segmenter", "embedder"]
Family = Literal["seggpt", "hf-vit", "timm"]
Resample = Literal["bilinear", "bicubic"]

#: ImageNet channel statistics (timm's IMAGENET_DEFAULT_*), used by DINO and SegGPT alike.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is and how its inputs are prepared.

    `image_size` is the side of the square input the model expects. For SegGPT it is the size of
    one image (the model sees prompt and query stacked, twice as high); the loader derives the
    real value from the checkpoint's config and trusts that over this number.
    """

    name: str
    kind: Kind
    family: Family
    hub_id: str | None
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tiny: bool = False
    description: str = ""
    #: the interpolation the reference image processor uses (PIL filter of the same name)
    resample: Resample = "bilinear"
    #: timm architecture name (family "timm" only)
    timm_arch: str | None = None


_SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry; a name can only be registered once."""
    if spec.name in _SPECS:
        raise UsageError(f"model name {spec.name!r} is already registered")
    if spec.family == "timm" and not spec.timm_arch:
        raise UsageError(f"timm model {spec.name!r} needs timm_arch")
    _SPECS[spec.name] = spec
    return spec


def get_spec(name: str, *, model_dir: Path | str | None = None) -> ModelSpec:
    """The spec registered under exactly `name`, else the derived model `name` in `model_dir`.

    A derived model (an adapted embedder, a tuned segmenter: `pipeline.derived`) has its base
    model's spec under its own name.
    """
    if name in _SPECS:
        return _SPECS[name]
    from eczema_batch.pipeline.derived import derived_spec

    spec = derived_spec(name, model_dir, _registered)
    if spec is not None:
        return spec
    known = ", ".join(sorted(_SPECS))
    where = f" nor in {model_dir}" if model_dir is not None else ""
    raise UsageError(f"unknown model {name!r}{where}; known models: {known}")


def _registered(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UsageError(f"a derived model's base {name!r} is not a registered model") from None


def list_specs(*, kind: Kind | None = None, include_tiny: bool = True) -> list[ModelSpec]:
    """Registered specs sorted by name, optionally of one kind and without the tiny test models."""
    return [
        spec
        for name, spec in sorted(_SPECS.items())
        if (kind is None or spec.kind == kind) and (include_tiny or not spec.tiny)
    ]


register_spec(
    ModelSpec(
        name="seggpt-vit-large",
        kind="segmenter",
        family="seggpt",
        hub_id="BAAI/seggpt-vit-large",
        image_size=448,
        resample="bicubic",  # SegGptImageProcessor's default filter
        description="SegGPT ViT-L (370M): in-context segmentation from prompt image + mask pairs",
    )
)
register_spec(
    ModelSpec(
        name="dino-vitb16",
        kind="embedder",
        family="hf-vit",
        hub_id="facebook/dino-vitb16",
        image_size=224,
        resample="bilinear",  # plain resize to 224, as in the paper (ViTImageProcessor's filter)
        description="DINO ViT-B/16 (transformers ViTModel, no pooler): 768-d CLS embedding",
    )
)
register_spec(
    ModelSpec(
        name="tiny-seggpt",
        kind="segmenter",
        family="seggpt",
        hub_id=None,
        image_size=16,
        resample="bicubic",
        tiny=True,
        description="random-weight SegGPT of the real class for tests (make_tiny_models)",
    )
)
register_spec(
    ModelSpec(
        name="tiny-dino",
        kind="embedder",
        family="hf-vit",
        hub_id=None,
        image_size=32,
        resample="bilinear",
        tiny=True,
        description="random-weight ViTModel of the real class for tests (make_tiny_models)",
    )
)
# timm backbones (optional extra). timm's default eval transform centre-crops (crop_pct 0.9); we
# resize plainly like the paper, with timm's bicubic filter.
register_spec(
    ModelSpec(
        name="timm-vit-base-dino",
        kind="embedder",
        family="timm",
        hub_id="timm/vit_base_patch16_224.dino",
        image_size=224,
        resample="bicubic",
        timm_arch="vit_base_patch16_224.dino",
        description="DINO ViT-B/16 through timm (needs the [timm] extra)",
    )
)
register_spec(
    ModelSpec(
        name="timm-dinov2-vitb14",
        kind="embedder",
        family="timm",
        hub_id="timm/vit_base_patch14_dinov2.lvd142m",
        image_size=518,  # DINOv2's pretraining size; load_embedder(image_size=...) can lower it
        resample="bicubic",
        timm_arch="vit_base_patch14_dinov2.lvd142m",
        description="DINOv2 ViT-B/14 through timm (needs the [timm] extra)",
    )
)
