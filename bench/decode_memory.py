"""Peak memory of ingest's check of one large photo, against a full decode in the same run.

A 14000 x 14000 JPEG or PNG is under the default pixel limit (200 MP). Ingest used to decode it
in full to find broken files (the baseline here: `decode_bytes`, what ingest called); it now calls
`check_bytes`, which decodes all the compressed data but never holds the full-size pixels. `run`
decodes at 448 px (`decode_bytes(..., max_side=448)`), shown for reference; its decode threads
share one pixel budget per process (`imaging/budget.py`), measured with 4 threads decoding the
PNG at once against the same with no budget.

Each measurement runs in a forked child: the peak resident set (VmHWM, reset through
/proc/self/clear_refs after `malloc_trim`) minus the resident set before the call, so the parent's
memory and the file's bytes (read before the reset) do not count. Linux with glibc only.

    python -m bench.decode_memory [--side 14000]
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from PIL import Image

from eczema_batch.imaging import check_bytes, decode_bytes
from eczema_batch.imaging.budget import DECODE_BUDGET

MAX_PIXELS = 200_000_000


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra(call: Callable[[], object]) -> tuple[int, float]:
    """(peak bytes above the resident set before the call, seconds), measured in a child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without running the parent's cleanup
        os.close(read_end)
        # Freed heap the parent left resident would be reused unseen: give it back first.
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # reset VmHWM to the current resident set
        before = _status("VmRSS")
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        os.write(write_end, f"{_status('VmHWM') - before} {elapsed}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise RuntimeError("the measuring child failed")
    extra, seconds = text.split()
    return int(extra), float(seconds)


def photo(side: int) -> Image.Image:
    """A smooth picture with some texture, like a photograph (noise alone makes a huge PNG)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 24, size=(side, side // 16, 1), dtype=np.uint8)
    rows = np.broadcast_to(ramp[:, None, None], (side, side, 1)).astype(np.uint8)
    pixels = np.concatenate([rows, rows.transpose(1, 0, 2), np.full_like(rows, 128)], axis=2)
    pixels[:, ::16] += texture
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def threads_decoding(data: bytes, threads: int, budget: int) -> Callable[[], object]:
    def decode_all() -> None:
        DECODE_BUDGET.total = budget
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda _: decode_bytes(data, max_pixels=MAX_PIXELS, max_side=448),
                          range(threads)))
    return decode_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=14000)
    args = parser.parse_args()
    image = photo(args.side)
    print(f"{args.side}x{args.side} ({args.side ** 2 / 1e6:.0f} MP), peak memory above the "
          "process's own, in a forked child:")
    for kind in ("jpeg", "png"):
        data = encode(image, kind)
        full, full_s = peak_extra(partial(decode_bytes, data, max_pixels=MAX_PIXELS))
        check, check_s = peak_extra(partial(check_bytes, data, max_pixels=MAX_PIXELS))
        small, small_s = peak_extra(
            partial(decode_bytes, data, max_pixels=MAX_PIXELS, max_side=448))
        print(f"  {kind.upper():4} ({len(data) / 1e6:.0f} MB file): full decode (baseline) "
              f"{full / 2**20:,.0f} MiB in {full_s:.2f} s; ingest check {check / 2**20:,.0f} MiB "
              f"in {check_s:.2f} s = {check / full:.3f}x the baseline's memory; run's 448 px "
              f"decode {small / 2**20:,.0f} MiB in {small_s:.2f} s")
    threads = 4
    free, free_s = peak_extra(threads_decoding(data, threads, 1 << 62))
    held, held_s = peak_extra(threads_decoding(data, threads, DECODE_BUDGET.total))
    print(f"  {threads} threads decoding the PNG at 448 px at once: no budget (baseline) "
          f"{free / 2**20:,.0f} MiB in {free_s:.2f} s; with the {DECODE_BUDGET.total >> 20} MiB "
          f"budget {held / 2**20:,.0f} MiB in {held_s:.2f} s = {held / free:.3f}x the "
          "baseline's memory")


if __name__ == "__main__":
    main()
