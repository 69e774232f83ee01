"""Tiny random-weight models of the real classes, for tests and for trying the tool without weights.

`make_tiny_models(DIR)` writes `DIR/tiny-seggpt` and `DIR/tiny-dino` with `save_pretrained`
(safetensors); they load through the same code as real weights (`model_dir=DIR`). The weights come
from a fixed seed, so every call writes the same bytes and the same digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: torch seed of the tiny weights
TINY_SEED = 0

#: SegGPT's output is lesion where the un-normalised RGB mean is above 127.5. Random init at the
#: default std (0.02) leaves every pixel near the ImageNet mean (~115), i.e. all background, which
#: would make segmentation tests vacuous. The decoder head is re-drawn so that its output is centred
#: on the decision boundary and varies with the input.
_HEAD_WEIGHT_STD = 1.0
#: std of the tiny SegGPT's random weights (see tiny_seggpt_config)
_SEGGPT_INIT_STD = 0.2


def tiny_seggpt_config() -> object:
    """A 3-layer SegGPT for 16x16 images (32x16 stacked) that exercises every encoder phase.

    merge_index=1 puts one layer before the merge (ensemble over separate image and mask streams),
    one at it (both streams together) and one after it (merged batch), like the real model
    (merge_index 2 of 24 layers). Weights are drawn 10x wider than the default (0.2, not 0.02) so
    that attention mixes prompt and query: with the default the mask hardly depends on the prompts
    and a wrong feature ensemble changes < 1 % of pixels; at 0.2 inverting the prompt masks changes
    ~17 % and a batch-wide ensemble ~11 %, which the tests can see.
    """
    from transformers import SegGptConfig

    return SegGptConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        mlp_dim=64,
        image_size=[32, 16],
        patch_size=4,
        pretrain_image_size=16,
        decoder_hidden_size=8,
        merge_index=1,
        intermediate_hidden_state_indices=[1, 2],
        initializer_range=_SEGGPT_INIT_STD,
    )


def tiny_vit_config() -> object:
    """A 2-layer ViT at 32x32 with 8-pixel patches: 17 tokens, 32-d CLS embedding."""
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )


def _centre_decoder_head(model: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    head = model.decoder.decoder_pred.head
    with torch.no_grad():
        head.weight.normal_(0.0, _HEAD_WEIGHT_STD / head.weight.shape[1] ** 0.5)
        # bias b with (b * std + mean) * 255 == 127.5 in every channel
        centre = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std, strict=True)])
        head.bias.copy_(centre)


def make_tiny_models(directory: Path) -> dict[str, Path]:
    """Write tiny-seggpt and tiny-dino under `directory`; returns name -> folder."""
    from transformers import SegGptForImageSegmentation, ViTModel
    from transformers.utils import logging as hf_logging

    from eczema_batch.pipeline.registry import get_spec

    directory = Path(directory)
    folders = {name: directory / name for name in ("tiny-seggpt", "tiny-dino")}
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            seggpt = SegGptForImageSegmentation(tiny_seggpt_config())  # type: ignore[arg-type]
            spec = get_spec("tiny-seggpt")
            _centre_decoder_head(seggpt, spec.mean, spec.std)
            seggpt.save_pretrained(folders["tiny-seggpt"])
            torch.manual_seed(TINY_SEED)
            vit = ViTModel(tiny_vit_config(), add_pooling_layer=False)  # type: ignore[arg-type]
            vit.save_pretrained(folders["tiny-dino"])
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
    return folders
