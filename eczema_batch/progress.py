"""The progress callbacks long steps report through (the CLI draws them as bars)."""

from __future__ import annotations

from collections.abc import Callable

#: `progress(done, total)`: items done so far out of `total`.
Progress = Callable[[int, int], None]
#: `progress(stage, done, total)`: the same for one named stage of a step that has several.
StageProgress = Callable[[str, int, int], None]
