"""The signals that end a quantgate process, and one way to handle them.

SIGINT (Ctrl-C), SIGTERM (a supervisor's stop) and SIGHUP (the terminal closed). The CLI
turns them into exceptions so that temporary files go, the server drains on them, and a
bundle's swap holds them until it is done: each installs its handler with ``handling``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

ENDING = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def handling(handler: Callable[[int, object], object]) -> Iterator[None]:
    """``handler`` for the ENDING signals while the block runs; the previous handlers after.

    SIGINT or SIGHUP inherited as ignored stays ignored: a script's background job, nohup.
    SIGTERM is always handled: it is how supervisors (Kubernetes, systemd) stop a process.
    A handler installed outside Python (``getsignal`` None) cannot be restored, and is left.
    Handlers go in one by one, so a signal meanwhile finds the rest as they were. Main
    thread only, as ``signal.signal``."""
    previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL, SIG_IGN
    try:
        install(handler, previous)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignored() -> list[str]:
    """The ENDING signals ignored now, by name: those ``handling`` left as it found them
    (inherited as ignored)."""
    return [signal.Signals(s).name for s in ENDING if signal.getsignal(s) == signal.SIG_IGN]


def install(handler: Callable[[int, object], object], previous: dict | None = None) -> None:
    """``handler`` for the ENDING signals, by ``handling``'s rule, for good (``handling``
    restores them); the handlers it replaces go into ``previous``."""
    for sig in ENDING:
        current = signal.getsignal(sig)
        if current is not None and (sig == signal.SIGTERM or current != signal.SIG_IGN):
            old = signal.signal(sig, handler)
            if previous is not None:
                previous[sig] = old
