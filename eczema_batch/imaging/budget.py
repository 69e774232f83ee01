"""How much decoded-pixel memory the decode threads of one process may hold at once.

`run` decodes in up to 8 threads per worker. JPEG decodes at reduced scale (small whatever the
photo), but PNG and DICOM decode in full before they are shrunk: a 196 MP PNG holds ~0.8 GB, and
eight of them at once would hold 6 GB. A decode takes its estimate from this budget before it
starts and gives it back when done; a decode larger than the whole budget waits until it can run
alone, so a process holds at most max(budget, its largest single decode).

Memory a large decode frees must really go back before the next one starts: glibc keeps freed
heap memory in each thread's arena (Pillow allocates in 16 MB blocks, under glibc's adaptive mmap
threshold), so without `malloc_trim` four threads taking turns still reach four decodes' worth.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Bytes of decoded pixels one process's decodes may hold together.
DEFAULT_BUDGET = 1 << 30
#: Decodes this large give their freed memory back to the system when done.
_TRIM_ABOVE = 64 << 20


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; elsewhere freed memory is left as it is
    except (AttributeError, OSError):
        return lambda: None
    return lambda: trim(0)


_release_freed = _malloc_trim()


class PixelBudget:
    def __init__(self, total: int = DEFAULT_BUDGET) -> None:
        self.total = total
        self.used = 0
        #: decodes waiting for their share (for tests and diagnostics)
        self.waiting = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = max(0, min(amount, self.total))  # too large for the budget: runs alone
        with self._changed:
            self.waiting += 1
            self._changed.notify_all()
            while self.used and self.used + amount > self.total:
                self._changed.wait()
            self.waiting -= 1
            self.used += amount
        try:
            yield
        finally:
            if amount >= _TRIM_ABOVE:
                _release_freed()
            with self._changed:
                self.used -= amount
                self._changed.notify_all()


#: The process's budget, shared by every decode in it.
DECODE_BUDGET = PixelBudget()
