"""Files the server reads again when they change: the bearer-token file, the TLS files.

A daemon thread looks at the files' stamps (modification time, size, inode; ``os.stat``
follows symlinks, so a Kubernetes Secret's ``..data`` swap counts) every ``interval``
seconds, off the request path: gRPC runs interceptors and the TLS handshake's callback on
one dispatch thread, which must never wait on a filesystem. When a stamp changed, ``load``
reads the files; what it returns is in force from then on. A load that fails keeps what
was in force, is logged once for that state of the files, and is tried again every
interval until it succeeds: some causes pass with time, the files untouched (a renewed
certificate's start of validity arriving; permissions fixed, which changes no stamp).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from quantgate.errors import QuantgateError

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERVAL_S = 1.0


def stamp(paths: Sequence[Path]) -> tuple:
    """What tells a file's new version from its old one; None for one that cannot be seen
    (being replaced)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class Watched(Generic[T]):
    """``load()``'s value, loaded now (its errors raise), then again on a daemon thread
    whenever ``paths`` change (module docstring). ``on_load(value)`` is told of every load
    that succeeded after the first, ``on_tick()`` of every look; ``kept`` ends the error
    logged for a failed load ("the tokens read before stay in force")."""

    def __init__(
        self,
        what: str,
        paths: Sequence[Path],
        load: Callable[[], T],
        *,
        kept: str,
        on_load: Callable[[T], None] = lambda value: None,
        on_tick: Callable[[], None] = lambda: None,
        interval: float = INTERVAL_S,
    ):
        self.what, self.paths, self._load, self.kept = what, tuple(paths), load, kept
        self.on_load, self.on_tick, self.interval = on_load, on_tick, interval
        self._stamp = stamp(self.paths)  # before the read: a change during it is seen later
        self.value: T = load()
        self._failing: tuple | None = None  # the stamp whose load failed, while it fails
        self._stop = threading.Event()

    def start(self) -> Watched[T]:
        threading.Thread(target=self._run, name=f"watch {self.what}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """Load again if the files changed (or the last load failed); True when a new value
        is in force. The thread calls it every interval; a test may call it directly."""
        now = stamp(self.paths)
        if now == self._stamp and self._failing is None:
            return False
        try:
            value = self._load()
        except QuantgateError as e:
            if now != self._failing:  # once per state of the files
                log.error("%s; %s", e, self.kept)
            self._failing = now
            return False
        self._stamp, self._failing, self.value = now, None, value
        self.on_load(value)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
                self.on_tick()
            except Exception:  # noqa: BLE001 - the watch must outlive a bug in one look
                log.exception("reading %s again failed; %s", self.what, self.kept)
