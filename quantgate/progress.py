"""The progress callback of every stage a person waits on (export, calibration, search,
timing, FP16, CUDA gates): ``on_progress(task, done, total, status)``.

``task`` names a bar ("export", "calibration", "search", "timing", "fp16", "cuda",
"bundle" (writing it), and a re-gate's "gate"),
``done`` of ``total`` steps (None: not known yet), ``status`` what it is doing now. The
library reports; the CLI draws (one rich bar per task on a terminal, elsewhere a line per
step finished).
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, "int | None", str], None]


def no_progress(task: str, done: int, total: int | None, status: str) -> None:
    """The ``on_progress`` of a caller that shows none."""


__all__ = ["ProgressFn", "no_progress"]
