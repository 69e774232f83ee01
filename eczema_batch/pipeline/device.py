"""Which device and which reduced precision to run the models with.

Nothing here runs at import time: CUDA is only queried when a function is called, so importing the
pipeline never initialises a GPU (Celery forks workers after import).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from eczema_batch.config import parse_device
from eczema_batch.errors import UsageError

logger = logging.getLogger(__name__)

_PRECISIONS = {"auto", "fp32", "bf16", "fp16"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N` as a torch device."""
    if isinstance(device, torch.device):
        device = str(device)
    kind, index = parse_device(device)
    if kind == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r} asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}): use --device cpu, or install a CUDA build of torch"
        )
    if index is not None and index >= torch.cuda.device_count():
        raise UsageError(
            f"device {device!r} asked for, but only "
            f"{torch.cuda.device_count()} CUDA device(s) exist"
        )
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the models compute in: float32 means no autocast.

    `auto` is bf16 on CUDA (fp16 on GPUs without bf16, i.e. before Ampere) and fp32 on CPU, where
    reduced precision is slower on most processors and the CPU path is the correctness baseline.
    """
    if precision not in _PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of {', '.join(sorted(_PRECISIONS))}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(dtype: torch.dtype) -> str:
    """The short name (fp32, bf16, fp16) recorded with a model identity."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to `dtype` on `device`; a no-op for float32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory, however torch reports it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so a smaller batch can fit."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def halved_batch(exc: BaseException, device: torch.device, size: int, what: str) -> int:
    """The batch size to retry with after `exc`; re-raises what is not a splittable OOM.

    A batch that does not fit the device is split in two and retried (the caller keeps the
    smaller size for the rest of the work); a single item that does not fit raises, with what
    to do next.
    """
    if not is_out_of_memory(exc):
        raise exc
    free_device_memory(device)
    if size <= 1:
        raise torch.OutOfMemoryError(
            f"{what}: one item does not fit in {device} memory: use a device with more memory "
            "or --precision bf16"
        ) from exc
    half = max(1, size // 2)
    logger.warning("%s: out of %s memory with a batch of %d; retrying with %d", what, device,
                   size, half)
    return half
