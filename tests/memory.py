"""Peak memory of one call, measured in a forked child (Linux: /proc/self/status, clear_refs)."""

from __future__ import annotations

import ctypes
import os
import traceback
from collections.abc import Callable


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_above(call: Callable[[], object]) -> int:
    """Bytes the resident set rose above where it was when `call` started (VmHWM, reset first).

    The call runs in a forked child, so the test process's own memory does not count and
    nothing the call allocates outlives it; an exception in it fails the caller.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            # Freed heap the parent left resident would be reused unseen: give it back first.
            ctypes.CDLL(None).malloc_trim(0)
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")  # VmHWM := VmRSS
            before = _status("VmRSS")
            call()
            os.write(write_end, str(_status("VmHWM") - before).encode())
            os._exit(0)
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise AssertionError(f"the measured call failed:\n{text}")
    return int(text)
