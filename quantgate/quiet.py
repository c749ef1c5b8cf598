"""Other libraries' output kept out of quantgate's, one thread at a time.

``contextlib.redirect_stdout`` and ``warnings.catch_warnings`` swap process-wide state
(``sys.stdout``, the warnings filters): two threads capturing at once restore each other's,
which left ``sys.stdout`` a StringIO for good after two exports in threads of one process.
Every such capture in quantgate holds ``GLOBAL_STATE``, and so does each run of torch's ONNX
exporters, whose legacy tracer keeps process-global state (of two exports in threads, one
failed with "GLOBALS.in_onnx_export must be True" and shipped the other exporter's graph).
Exports in threads of one process therefore take turns there; in processes they run side by
side (forked while a thread holds the lock, a child gets it free). A reentrant lock: a
capture may hold another inside it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator

GLOBAL_STATE = threading.RLock()


def _after_fork_in_child() -> None:
    """A child forked while another thread held the lock would wait forever on a holder it
    does not have: the lock is made free. Forked by the holder, it keeps it, to release."""
    if not GLOBAL_STATE._is_owned():  # type: ignore[attr-defined]
        GLOBAL_STATE._at_fork_reinit()  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def native_stdout_captured() -> Iterator[io.StringIO]:
    """What native code writes to the process's standard output (file descriptor 1) inside,
    captured instead of shown: torch's legacy exporter prints its TorchScript graph there
    when it fails, from C++, where ``sys.stdout`` cannot reach. The StringIO holds it once
    the block has ended."""
    captured = io.StringIO()
    with GLOBAL_STATE, tempfile.TemporaryFile() as sink:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read().decode(errors="replace"))


@contextlib.contextmanager
def stdout_captured() -> Iterator[io.StringIO]:
    """What is printed inside, captured instead of shown."""
    with GLOBAL_STATE, contextlib.redirect_stdout(io.StringIO()) as out:
        yield out


@contextlib.contextmanager
def stderr_captured() -> Iterator[io.StringIO]:
    """What is written to ``sys.stderr`` inside, captured instead of shown (a handler that
    holds the stream it was made with, as quantgate's log does, still writes there)."""
    with GLOBAL_STATE, contextlib.redirect_stderr(io.StringIO()) as err:
        yield err


@contextlib.contextmanager
def warnings_caught(*, record: bool = True) -> Iterator[list[warnings.WarningMessage]]:
    """Warnings raised inside, every one caught (recorded, or dropped) instead of shown."""
    with GLOBAL_STATE, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always" if record else "ignore")
        yield caught


@contextlib.contextmanager
def logger_silenced(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Logger ``name`` shows only ``level`` and above inside; its own level after (the
    caller's program may have set it)."""
    logger = logging.getLogger(name)
    with GLOBAL_STATE:
        before = logger.level
        logger.setLevel(level)
        try:
            yield
        finally:
            logger.setLevel(before)
