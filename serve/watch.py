"""Files the server reads again when they change: the bearer-token file, the TLS files.

A daemon thread looks at the files' stamps (modification time, size, inode; ``os.stat``
follows symlinks, so a Kubernetes Secret's ``..data`` swap counts) every ``interval``
seconds, off the request path: gRPC runs interceptors and the TLS handshake's callback on
one dispatch thread, which must never wait on a filesystem. When a stamp changed, ``load``
reads the files; what it returns is in force from then on. A load that fails keeps what
was in force, is logged once for that state of the files, and is tried again every
interval until it succeeds: some causes pass with time, the files untouched (a renewed
certificate's start of validity arriving; permissions fixed, which changes no stamp).

Bundles are not read again (``BundleWatch``): the server serves what it loaded at start,
and says once when a served bundle changes or goes on disk, with what a restart would do
(serve another copy, or refuse it: a re-gate that failed the copy served, a file changed).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from quantgate.errors import QuantgateError

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERVAL_S = 1.0


def stamp(paths: Sequence[Path]) -> tuple:
    """What tells a file's new version from its old one; None for one that cannot be seen
    (being replaced)."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append(file_stamp(st))
    return tuple(out)


def file_stamp(st: os.stat_result) -> tuple[int, int, int]:
    """``stamp``'s tuple for one file from its ``os.stat`` (or ``os.fstat``)."""
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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


MANIFEST = "manifest.json"


def bundle_stamp(folder: Path, files: Sequence[str] = ()) -> tuple:
    """What tells a bundle folder's new version from the one loaded: the folder's own
    (device, inode), which an export's rename into place changes (a symbolic link swapped to
    another folder too: ``os.stat`` follows it), manifest.json's ``stamp``, which a manifest
    rewritten in place changes, and the ``stamp`` of each of its ``files`` (the names its
    manifest lists, which a restart checks: one changed in place changes it). None for any
    that cannot be seen (gone)."""
    try:
        st = os.stat(folder)
        where = (st.st_dev, st.st_ino)
    except OSError:
        where = None
    return (where, *stamp([folder / MANIFEST, *(folder / f for f in files)]))


@dataclass(frozen=True)
class Outlook:
    """What a restart would do with a bundle as it is on disk: said in words, and whether it
    would not serve it (``refused``: the server would not start, or not with this model);
    ``files``, the names its manifest lists now, where it could be read."""

    said: str
    refused: bool = False
    files: tuple[str, ...] | None = None
    # the bundle on disk is the one served, hashed: its manifest as loaded, and the copy a
    # restart would serve is the one served (a folder copied anew, byte for byte)
    same: bool = False
    # a restart would serve the copy served, as served, with nothing else to say: the
    # manifest changed otherwise (a passing re-gate), no news that needs an operator
    serves_it: bool = False


@dataclass
class Served:
    """A bundle as the server loaded it: ``model`` names it and ``serving`` the copy served
    ("model.int8.onnx, sha256 3b35f566ab12..."), ``files`` the names its manifest lists,
    ``loaded`` its ``bundle_stamp`` over them taken before they were read, ``seen`` the
    stamp last looked at, over ``watching``: ``files``, then those of the manifest on disk
    once it changed (a re-export that adds a file has it watched). ``outlook()`` says what
    a restart would do with the bundle as it is on disk now (runtime.restart_outlook)."""

    path: Path
    model: tuple[str, str]  # (name, version)
    serving: str
    loaded: tuple
    seen: tuple | None = None
    outlook: Callable[[], Outlook] | None = None
    files: tuple[str, ...] = ()
    settling: tuple | None = None  # a new stamp seen once: said when the next look agrees
    watching: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.seen, self.watching = self.loaded, self.files


class BundleWatch:
    """Served bundles that change on disk, looked at every ``interval`` seconds on one
    daemon thread (a ``stat`` of each folder, manifest and listed file: off the request
    path, and off the main thread, which must stay free to act on a signal).

    The server is not reloaded: what it loaded at start is what it serves until it
    restarts. A change is logged at WARNING once it has settled (two looks alike), not at
    every look, naming what is still served and what a restart would do
    (``Served.outlook``); a bundle that goes from disk is said so.
    ``on_change((name, version), changed, refused)`` is told of each change, for the
    metrics: ``changed`` False when the bundle is back as it was loaded, ``refused`` where
    a restart would not serve it. A served repository's folders not served are said too
    (``repository``; their count to ``on_unserved``)."""

    def __init__(
        self,
        bundles: Iterable[Served],
        *,
        on_change: Callable[[tuple[str, str], bool, bool], None] = lambda model, c, r: None,
        interval: float = INTERVAL_S,
        repository: tuple[Path, Callable[[], list[str]]] | None = None,
        on_unserved: Callable[[int], None] = lambda count: None,
    ):
        self.bundles, self.on_change, self.interval = tuple(bundles), on_change, interval
        # A served repository's root, and what lists its folders the server does not serve
        # (repository.unserved_folders): one added is said once, as a change is.
        self.repository, self.on_unserved = repository, on_unserved
        self._unserved: list[str] = []
        self._unserved_settling: list[str] | None = None
        self._stop = threading.Event()

    def start(self) -> BundleWatch:
        if self.bundles or self.repository:
            threading.Thread(target=self._run, name="watch bundles", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()

    def check(self) -> list[Served]:
        """Look at every bundle once; the ones whose state changed and settled since the last
        look (each logged). A new state is acted on when the next look finds it again: a file
        being written changes at every look, and is said (and hashed) once, when written.
        The thread calls it every interval; a test may call it directly."""
        changed = []
        for b in self.bundles:
            now = bundle_stamp(b.path, b.watching)
            if now == b.seen or now != b.settling:
                b.settling = None if now == b.seen else now
                continue
            b.seen, b.settling = now, None
            changed.append(b)
            back = bundle_stamp(b.path, b.files) == b.loaded  # over the files it loaded
            self.on_change(b.model, *self._said(b, now, back))
        if self.repository is not None:
            self._look_at_repository(*self.repository)
        return changed

    def _said(self, b: Served, now: tuple, back: bool) -> tuple[bool, bool]:
        """Log what became of ``b`` (its stamp ``now``; ``back`` as it was loaded), with
        what a restart would do; whether it changed (its files hashed, where the stamp says
        so: a copy of the same bytes has changed nothing), and whether a restart would not
        serve it."""
        name, version = b.model
        where = f"bundle {b.path} (model {name} v{version})"
        kept = f"still serving the copy loaded at start ({b.serving})"
        if back:
            b.watching, b.seen = b.files, b.loaded
            log.info("%s is back on disk as it was loaded", where)
            return False, False
        if now[0] is None:
            log.warning("%s is gone from disk: %s; a restart would not serve it", where, kept)
            return True, True
        if now[1] is None:
            log.warning("%s has no %s on disk any more: %s; a restart would not serve it",
                        where, MANIFEST, kept)  # fmt: skip
            return True, True
        try:
            outlook = b.outlook() if b.outlook else Outlook("restart to serve the new one")
        except Exception as e:  # noqa: BLE001 - the change is said whatever the look found
            outlook = Outlook(f"what a restart would do is not known: {e}", refused=True)
        if outlook.files is not None and outlook.files != b.watching:
            b.watching = outlook.files  # what a restart would check, from the next look
            b.seen = bundle_stamp(b.path, b.watching)
        if outlook.same:
            log.info("%s was written anew on disk, the same files as loaded (hashed)", where)
            return False, False
        log.log(
            logging.INFO if outlook.serves_it else logging.WARNING,
            "%s changed on disk since it was loaded: %s; %s",
            where,
            kept,
            outlook.said,
        )
        return True, outlook.refused

    def _look_at_repository(self, root: Path, unserved: Callable[[], list[str]]) -> None:
        """Say once when the repository at ``root`` holds folders the server does not serve
        (``unserved()``: "bert", "minilm/2"), and once when it no longer does, each once two
        looks agree (a folder being copied in grows); the count is ``on_unserved``'s, for
        the metric."""
        now = unserved()
        if now == self._unserved or now != self._unserved_settling:  # said once settled
            self._unserved_settling = None if now == self._unserved else now
            return
        self._unserved, self._unserved_settling = now, None
        self.on_unserved(len(now))
        if now:
            log.warning(
                "repository %s holds folders not served: %s; a restart would open each, and "
                "not start where one cannot be served (`quantgate serve %s --check` tells); "
                "a new version takes the requests that name none",
                root,
                ", ".join(now),
                root,
            )
        else:
            log.info("repository %s holds only the folders served", root)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must outlive a bug in one look
                log.exception("looking at the served bundles on disk failed")
