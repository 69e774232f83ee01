"""DINO's multi-crop views of a batch of images, with kornia, on the device, batched.

Every image of the batch gives 2 global crops and some local crops: random resized crops
(global and local scales), horizontal flips, brightness/contrast, a colour change, a slight blur.

Colour is the signal in eczema (redness), so the default colour change (`planckian`) is only a
change of illuminant (kornia's RandomPlanckianJitter, black-body light from warm to cool) plus
brightness and contrast: a red lesion stays red. `standard` is DINO's usual recipe (hue and
saturation jitter, grayscale, solarisation), which teaches the model to ignore exactly that; it
is there to compare against, not to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import kornia.augmentation as K
import torch
from torch import nn

Colour = Literal["planckian", "standard"]
COLOURS: tuple[Colour, ...] = ("planckian", "standard")

#: DINO's crop scales (fractions of the image area)
GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)


@dataclass(frozen=True)
class ViewSettings:
    global_size: int
    local_size: int
    local_crops: int
    colour: Colour = "planckian"
    global_scale: tuple[float, float] = GLOBAL_SCALE
    local_scale: tuple[float, float] = LOCAL_SCALE


def _odd(value: float) -> int:
    return max(3, int(value) // 2 * 2 + 1)


def colour_augmentations(colour: Colour) -> list[Any]:
    """The colour part of the views: `planckian` (default) keeps hue, `standard` does not."""
    if colour == "planckian":
        return [
            K.RandomPlanckianJitter(mode="blackbody", p=0.8),
            K.ColorJitter(brightness=0.4, contrast=0.4, p=0.8),
        ]
    if colour == "standard":  # DINO's DataAugmentationDINO
        return [
            K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2),
        ]
    raise ValueError(f"colour augmentation {colour!r} is not one of {', '.join(COLOURS)}")


def _pipeline(size: int, scale: tuple[float, float], colour: Colour) -> nn.Module:
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=scale, resample="bicubic"),
        K.RandomHorizontalFlip(p=0.5),
        *colour_augmentations(colour),
        # slight blur: up to ~a twentieth of the crop's side
        K.RandomGaussianBlur(_odd(size / 10), sigma=(0.1, max(0.2, size / 112)), p=0.5),
    )


class MultiCrop(nn.Module):
    """(B, 3, S, S) floats in [0, 1] -> [global 1, global 2, local 1, ...], each (B, 3, s, s),
    normalised with the model's mean and std. Row i of every view is image i."""

    def __init__(self, settings: ViewSettings, *, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        self.settings = settings
        self.global_views = _pipeline(settings.global_size, settings.global_scale,
                                      settings.colour)
        self.local_views = _pipeline(settings.local_size, settings.local_scale, settings.colour)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    @property
    def crops(self) -> int:
        return 2 + self.settings.local_crops

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views in [0, 1], before normalisation."""
        views = [self.global_views(images) for _ in range(2)]
        views += [self.local_views(images) for _ in range(self.settings.local_crops)]
        return [v.clamp(0.0, 1.0) for v in views]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [(v - self.mean) / self.std for v in self.raw(images)]
