"""Atomic directory writes: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from quantgate import signals
from quantgate.errors import Busy, OutOfSpace, QuantgateError

log = logging.getLogger(__name__)


def resolve_target(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path, and through a symbolic link to where the link points:
    writing at ``current -> releases/v3`` replaces releases/v3 and keeps the link."""
    out = Path(out).absolute()
    return out.resolve() if out.is_symlink() else out  # (a loop: refused by target_problem)


def gone_cwd(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read, where it is relative and the current directory is gone:
    a shell inside a bundle that a re-gate or an export replaced sits in the removed copy,
    where "." holds nothing (and a bundle there would be said not to be one)."""
    if Path(path).is_absolute():
        return None
    try:
        os.getcwd()
    except FileNotFoundError:
        return (
            f"{path} is relative to the current directory, which no longer exists (a re-gate "
            'or export replaced the directory it was): cd into it again (cd "$PWD"), or pass '
            "its full path"
        )
    return None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on clean exit it replaces ``out``.

    If the block raises (or the process dies), ``out`` is untouched and the temporary
    directory is removed (or, after a hard kill, left as a hidden ``.NAME.tmp-*`` sibling
    that never shadows ``out``). Where the filesystem can swap two directories in one step
    (Linux's renameat2), ``out`` holds the old or the new content at every moment, even
    across a power cut once this returns: the files are on disk before the swap.
    """
    out = resolve_target(out)
    made = make_parents(out.parent)
    restore_aside(out)
    sweep_dead(out.parent, f".{out.name}.tmp-")
    sweep_dead(out.parent, aside_prefix(out))
    tmp = None
    try:
        with _signals_held():  # a signal right after mkdtemp would leave it behind
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner()}-", dir=out.parent))
        # mkdtemp makes it 0700: give it the mode of the directory it replaces (a bundle kept
        # private stays private), else the mode mkdir would
        tmp.chmod(stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        remove_if_empty(made)
        raise


def make_parents(path: Path) -> list[Path]:
    """Make directory ``path`` and its missing parents; the ones made, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (``make_parents``'s), innermost first, those still empty: a failed
    command leaves no folders it made for nothing."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): nor are the folders that hold it


# the prefixes of quantgate's working directories under $TMPDIR (``work_dir``'s)
WORK_PREFIXES = (
    "quantgate-build-",  # quantgate export (quantize.pipeline)
    "quantgate-export-",  # quantgate export --no-quantize (export.pipeline)
    "quantgate-placement-",  # a variant's placement check (quantgate.placement)
    "quantgate-serve-",  # the server's placement checks (serve.runtime)
)


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A temporary working directory under $TMPDIR, ``PREFIX<pid>-<host>-*``, removed after.
    The ones left by this machine's processes that died (a SIGKILL, the OOM killer: no
    cleanup runs) are removed first, of every quantgate command (``WORK_PREFIXES``, of
    which ``prefix`` is one): a model's work can take gigabytes, and a killed export is
    not always followed by one of its kind."""
    if prefix not in WORK_PREFIXES:
        raise ValueError(f"{prefix!r} is not one of fsutil.WORK_PREFIXES: add it there")
    root = Path(tempfile.gettempdir())
    for each in WORK_PREFIXES:
        sweep_dead(root, each)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{_owner()}-") as tmp:
        yield Path(tmp)


def sweep_dead(folder: Path, prefix: str) -> None:
    """Remove the directories ``PREFIX<pid>-<host>-*`` in ``folder`` that a process of this
    machine (``<host>``: its name's hash) made and that process is gone: what a killed
    quantgate left. A running process's is kept, and so is another machine's or
    container's (its processes are not ours to see), where the folder is shared."""
    host = _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        pid, _, rest = entry.name.removeprefix(prefix).partition("-")
        ours = entry.name.startswith(prefix) and rest.startswith(f"{host}-")
        if ours and _dead(pid) and entry.is_dir(follow_symlinks=False):
            log.info("removing %s, left by quantgate process %s, which died", entry.path, pid)
            _remove(Path(entry.path))


def aside_prefix(out: Path) -> str:
    """The name's start of where ``_swap`` moves ``out``'s old content while it renames the
    new content in, where the filesystem cannot swap them in one step (NFS, CIFS, FUSE)."""
    return f".{out.name}.old-"


def asides(out: Path) -> list[Path]:
    """What processes of this machine that died while replacing ``out`` moved aside, and
    left there (a SIGKILL between ``_swap``'s two renames), newest first. One that names
    this process is a dead one's too: a container's quantgate is PID 1 again after a
    restart, and this process moves one aside only within ``_swap``, which puts content at
    ``out`` again before it returns (the caller's claim keeps other threads out)."""
    host, prefix = _host_tag(), aside_prefix(out)
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        pid, _, rest = entry.name.removeprefix(prefix).partition("-")
        ours = entry.name.startswith(prefix) and rest.startswith(f"{host}-")
        gone = pid == str(os.getpid()) or _dead(pid)
        if ours and gone and entry.is_dir(follow_symlinks=False):
            found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def restore_aside(out: Path) -> None:
    """Put back at ``out`` the old content a process that died while replacing it left aside
    (``asides``), where ``out`` is missing: that process never got its new content in place."""
    if os.path.lexists(out) or not (left := asides(out)):
        return
    os.rename(left[0], out)
    log.warning(
        "restored %s from %s, where a quantgate process that died while replacing it had "
        "moved it aside",
        out,
        left[0].name,
    )


def _owner() -> str:
    """``<pid>-<host>``: who makes a folder that ``sweep_dead`` may remove once they die."""
    return f"{os.getpid()}-{_host_tag()}"


@functools.cache
def _host_tag() -> str:
    """This machine (or container) as 8 hex digits: its host name's hash."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _dead(pid: str) -> bool:
    """Whether process ``pid`` (digits) of this machine has ended; False when unsure."""
    if not (pid.isdigit() and len(pid) <= 9) or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's, alive
        return False
    return False


@contextlib.contextmanager
def claimed(out: str | os.PathLike, what: str, *, create: bool = False) -> Iterator[None]:
    """Hold ``out`` for this process while it works towards writing there (``what``, as
    another process is told of it: "an export"). A second process that claims it
    meanwhile is refused at once with ``Busy``, where both would work for minutes and the
    last to finish would win: a re-gate read before another one wrote would drop that one's
    record.

    The claim is an advisory lock (flock) on a hidden sibling, ``.NAME.lock``, which holds
    who claimed it and is removed after; the kernel drops the lock when its process dies,
    however it dies. ``create`` makes ``out``'s folder first (an export writes there in the
    end); where it does not exist, or the filesystem takes no lock (some network mounts),
    the work goes on unclaimed: what refuses an unwritable ``out`` still does. Claims nest within a thread: `quantgate gate` holds its bundle
    while it reads the settings it then re-gates with, and the re-gate claims it again;
    another thread is refused as another process is."""
    out = resolve_target(out)
    path = out.parent / f".{out.name}.lock"
    held = _held.paths
    if path in held:  # this thread's already
        yield
        return
    made: list[Path] = []
    try:
        if create:
            made = make_parents(out.parent)
        fd = _lock(path, out)
    except OSError as e:
        log.debug("not claiming %s: %s", out, e)
        yield
        return
    held.add(path)
    try:
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is the claim
            os.write(fd, f"pid {os.getpid()}, {what}, since {since}\n".encode())
        restore_aside(out)  # before the work reads what is there (an export: its model)
        yield
    finally:
        held.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: the next claim makes a file of its own
        os.close(fd)
        remove_if_empty(made)  # a failed export's: out is not there to keep them


class _Held(threading.local):
    """The lock files this thread holds (``claimed``)."""

    def __init__(self):
        self.paths: set[Path] = set()


_held = _Held()


def _lock(path: Path, out: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, emptied for its holder's
    line; ``Busy`` where another process holds it."""
    while True:
        try:
            # never through a link: one planted there would have its target emptied
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise QuantgateError(  # no wait ends it (Busy's exit 1): exit 2, to act on
                f"{path} is a symbolic link, where quantgate keeps the lock that claims {out}. "
                "quantgate writes no lock through a link: remove it (and find out who made it)."
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise QuantgateError(
                    f"{path} is not a file, where quantgate keeps the lock that claims {out}: "
                    "remove it."
                )
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "no details"
            os.close(fd)
            who = (
                "another thread of this process"
                if holder.startswith(f"pid {os.getpid()},")
                else "another quantgate process"
            )
            raise Busy(
                f"{out} is being written by {who} ({holder}). Wait for it to finish, or write "
                f"somewhere else. (Its claim is the lock on {path}; the lock goes with the "
                "process.)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                os.ftruncate(fd, 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed it between the open and the lock: again


_FULL = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large",  # a size limit (ulimit -f), as full for this file
}


# The states of trusted files (path, inode, modification time, mode) warned about already.
_SAID: set[tuple[str, int, int, int]] = set()


def secret_file(flag: str, path: Path, *, secret: bool, error: type[Exception]) -> None:
    """Refuse (``error``) a file the server trusts (a token file, a TLS key, a certificate)
    that every user may write: whoever can write it grants themselves access or serves
    their own certificate, and the server reads it again when it changes. One its group
    may write is warned about (Debian's users each have a group of their own, and a umask
    of 002 makes every file so); so, where ``secret``, is one every user may read. A file on
    a read-only filesystem no one may write, whatever its mode. Called at each read, a
    reload's too: a warning is said once for each state of the file (a reload that keeps
    failing is retried every second, and said the same warning each time)."""
    try:
        st = path.stat()  # followed through links: a mounted Secret's
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return  # the read that follows says why it cannot be read
    mode = stat.S_IMODE(st.st_mode)
    said = (str(path), st.st_ino, st.st_mtime_ns, mode) in _SAID
    _SAID.add((str(path), st.st_ino, st.st_mtime_ns, mode))
    if mode & stat.S_IWOTH and not read_only:
        raise error(
            f"{flag} {path} may be written by every user (mode {mode:04o}): whoever can write "
            f"it could give themselves access. Make it writable by its owner alone: chmod "
            f"go-w {path}"
        )
    if said:
        return
    if mode & stat.S_IWGRP and not read_only:
        log.warning(
            "%s %s may be written by its group (mode %04o): everyone in it could give "
            "themselves access; chmod g-w %s unless the group is its owner's alone",
            flag, path, mode, path,
        )  # fmt: skip
    if secret and mode & stat.S_IROTH:
        log.warning(
            "%s %s may be read by every user of this host (mode %04o): chmod o-r %s",
            flag, path, mode, path,
        )  # fmt: skip


def disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from, says a filesystem is full: an
    OSError's errno, or the text a C++ library (ONNX Runtime, PyTorch) put in its message."""
    return full_errno(err) is not None


def full_errno(err: BaseException | None) -> int | None:
    """Which of ``_FULL`` ``err``'s chain (it, and what it was raised from) says, else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return err.errno
        if found := next((n for n, text in _FULL.items() if text in str(err)), None):
            return found
        err = err.__cause__ or err.__context__
    return None


def raise_if_full(err: BaseException, work: Path, what: str) -> None:
    """Raise OutOfSpace, from ``err``, when ``what`` failed because the filesystem that holds
    ``work`` is full (``disk_full``): no retry or other recipe would do better."""
    if disk_full(err):
        raise _out_of_space(work, err, what) from err


def _out_of_space(work: Path, err: BaseException, what: str) -> OutOfSpace:
    try:
        free = f" ({size_said(shutil.disk_usage(work).free)} free there now)"
    except OSError:
        free = ""
    temporary = Path(work).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    where = (
        "It is under $TMPDIR: point TMPDIR at a filesystem with room"
        if temporary
        else "Give it a directory on a filesystem with room"
    )
    cause = f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    if full_errno(err) == errno.EFBIG:
        return OutOfSpace(
            f"{what} failed: a file in its working directory {work} reached this process's "
            f"file size limit ({_size_limit()}). Raise it (ulimit -f unlimited) "
            f"and run again. {cause}"
        )
    return OutOfSpace(
        f"{what} failed: the filesystem that holds its working directory {work} is full{free}. "
        f"{where} (several times the size of the model) and run again. {cause}"
    )


def _size_limit() -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return "none" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


def target_problem(
    out: Path,
    *,
    force: bool,
    is_ours: Callable[[Path], bool],
    noun: str,
    inputs: Iterable[tuple[str, Any]] = (),
    mount_ok: bool = False,
    elsewhere: str = "choose another --out",
    carries_others: bool = False,
) -> str | None:
    """Why ``out`` cannot take a new ``noun`` (a bundle, a checkpoint) written by ``atomic_dir``,
    else None. Cheap: callers check it before heavy work, and raise their own error type.

    Refused: an ancestor we cannot write into, a file, the directory a person works in or one
    that holds the job's ``inputs`` ((what, path) pairs: the model, the data; even with
    ``force``), one that holds a Git, Mercurial or Subversion folder (even with ``force``,
    unless the new content ``carries_others`` along: a re-gate's), and an existing
    non-empty directory that ``is_ours`` does not recognise
    unless ``force``; a mount point, unless the caller writes into it in place
    (``mount_ok``). ``elsewhere`` is the advice where ``out``'s place cannot be written:
    what else to do (a re-gate has no --out)."""
    try:
        os.stat(out)  # follows every link on the way: ELOOP for a loop anywhere in it
    except FileNotFoundError:
        pass  # to be created
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (
                f"--out {out} goes through a symbolic link that cannot be followed "
                f"({e.strerror}). Remove the link, or choose another path."
            )
    out = resolve_target(out)
    if held := _holds_input(out, inputs):
        return (
            f"--out {out} {held}, which this job reads; the {noun} replaces the directory at "
            f"--out, so it would be lost (refused even with --force). Choose a new directory "
            f"for the {noun}."
        )
    parent = out.parent  # the nearest existing ancestor must be a directory we may write into
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return (
            f"cannot write the {noun} at {out}: {parent} is not a directory. Choose another --out."
        )
    in_place = mount_ok and out.is_dir() and is_mount_point(out)  # written inside, not beside
    written_in = out if in_place else parent
    if _on_read_only_filesystem(written_in):  # no chmod makes it writable
        return (
            f"cannot write the {noun} at {out}: {written_in} is on a read-only filesystem "
            f"(mounted read-only); {elsewhere}."
        )
    if not in_place and not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"cannot write the {noun} at {out}: {parent} is not writable. Make {parent} "
            f"writable (the {noun} is written beside {out.name}, then renamed into place), or "
            f"{elsewhere}."
        )
    if not in_place and (failed := _cannot_create_in(parent)):
        return (  # a permission check says yes where the filesystem says no (/proc, say)
            f"cannot write the {noun} at {out}: a directory cannot be made in {parent} "
            f"({failed}); {elsewhere}."
        )
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; expected a directory for the {noun}. Choose another path."
    if not out.is_dir():
        return None
    if not in_place and is_mount_point(out):
        return (
            f"--out {out} is a mount point (a volume, say): the {noun} is written beside it "
            "and renamed into place, which cannot replace a mount point. Write it into a "
            f"directory inside it (--out {out / out.name}), or mount the directory above."
        )
    if read_only := _read_only(out):
        return (
            f"{out} is read-only ({read_only}); writing the {noun} there would replace it "
            f"as a whole, so refusing. Make it writable (chmod u+w {out}) if it may change, "
            f"or {elsewhere}."
        )
    # a repository in it is someone's work, in a bundle too (its history, with --force),
    # unless the new content carries the old along (a re-gate's)
    if not carries_others and (repository := _repository_in(out)):
        return (
            f"--out {out} holds a version-controlled folder ({repository}); the {noun} "
            f"replaces the directory at --out, so refusing (even with --force). Choose a new "
            f"directory for the {noun}."
        )
    if is_ours(out):
        return None
    if why := irreplaceable(out):
        return (
            f"--out {out} is {why}; the {noun} replaces the directory at --out, so refusing "
            f"(even with --force). Choose a new directory for the {noun}."
        )
    if any(out.iterdir()) and not force:
        return (
            f"--out {out} is an existing directory that is not a {noun}; refusing to replace "
            "it. Choose another path, or pass --force to replace it."
        )
    return None


def _cannot_create_in(parent: Path) -> str | None:
    """Why no directory can be made in ``parent`` (a read-only or special filesystem, which
    ``os.access`` does not tell root), found by making one and removing it; else None."""
    try:
        made = tempfile.mkdtemp(prefix=".quantgate-probe-", dir=parent)
    except OSError as e:
        return e.strerror or str(e)
    with contextlib.suppress(OSError):
        os.rmdir(made)
    return None


def is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point: another filesystem's root (``os.path.ismount``), or
    a directory bind-mounted from the same filesystem, which ismount cannot tell (a
    container's volume can be either); Linux's /proc/self/mountinfo lists both."""
    if os.path.ismount(path):
        return True
    try:
        # undecodable bytes as os.path.realpath gives them: a mount of such a path anywhere
        # must not break the check of every other
        table = Path("/proc/self/mountinfo").read_text(errors="surrogateescape")
    except OSError:
        return False
    real = os.path.realpath(path)
    unescaped = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)))
    return any(
        len(fields) > 4 and unescaped(fields[4]) == real
        for fields in (line.split(" ") for line in table.splitlines())
    )


def _holds_input(out: Path, inputs: Iterable[tuple[str, Any]]) -> str | None:
    """How directory ``out`` is, or holds, one of ``inputs`` (what, path); else None."""
    target = out.resolve()
    for what, path in inputs:
        if not isinstance(path, (str, os.PathLike)) or (named := _named_file(path)) is None:
            continue  # not a path (arrays in memory), or not there
        source = named.resolve()
        if source == target:
            return f"is the {what}"
        if source.is_relative_to(target):
            return f"holds the {what} ({source})"
    return None


def spec_path(text: str) -> str | None:
    """The file or folder a model spec names: the spec itself, or the file of a
    ``file.py:function``; None for a ``module:function``."""
    head, colon, _ = text.rpartition(":")
    if colon:
        return head if head.endswith(".py") else None
    return text


def _named_file(spec: str | os.PathLike) -> Path | None:
    """The file or folder an input names, where it exists: a path, or a factory's file
    (``path/to/file.py:function``; ``package.module:function`` where its import finds it,
    on the Python path, then in the current directory, found without importing it)."""
    if (path := Path(spec).expanduser()).exists():
        return path
    text = os.fspath(spec)
    if (named := spec_path(text)) is not None:  # a path not there, or a file.py's
        return path if (path := Path(named).expanduser()).exists() else None
    parts = text.rpartition(":")[0].split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    # where the import looks, in its order: the Python path, then the current directory
    # (``factories._import`` puts it last where the path does not hold it)
    roots = [root or os.getcwd() for root in sys.path]
    for root in [*roots, os.getcwd()]:
        module = Path(root).joinpath(*parts)
        for file in (module / "__init__.py", module.with_suffix(".py")):  # a package first
            if file.is_file():
                return file
    return None


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def irreplaceable(out: Path) -> str | None:
    """Why replacing the directory ``out`` would destroy more than what was written there,
    else None: a mistyped ``--out .`` or an empty ``--out "$DIR"`` must not take the work
    with it, even with --force."""
    target, here = Path(out).resolve(), Path.cwd().resolve()
    if here.is_relative_to(target):
        return (
            "the current directory" if target == here else "a directory that holds the current one"
        )
    if target == Path.home().resolve():
        return "the home directory"
    if target == Path(target.anchor):
        return "the root directory"
    return None


def _repository_in(folder: Path) -> Path | None:
    """A Git, Mercurial or Subversion folder in ``folder`` or a folder directly inside it
    (a project, or a folder of projects), else None: someone's work, not a job's output."""
    marks = (".git", ".hg", ".svn")
    try:  # (a link to a checkout elsewhere is not: replacing the folder removes the link)
        inside = [
            folder,
            *(p for p in folder.iterdir() if p.name not in marks and _real_dir(p)),
        ]
    except OSError:
        return None
    return next((p / m for p in inside for m in marks if (p / m).exists()), None)


def _on_read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def size_said(n: float) -> str:
    """A number of bytes as a person reads it: "120 kB", "340 MB", "2.1 GB" (two digits
    below 10, whole numbers above; 999,999 bytes is "1 MB", not "1000 kB")."""
    if n < 1000:
        return f"{n:.0f} bytes"
    in_ = lambda scale: float(f"{n / scale:.2g}") if n < 10 * scale else round(n / scale)  # noqa: E731
    unit, shown = next(
        ((u, v) for u, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)) if (v := in_(scale)) >= 1),
        ("kB", in_(1e3)),  # 1,000 bytes and more are at least 1 kB
    )
    return f"{shown:g} {unit}" if shown < 10 else f"{shown:.0f} {unit}"


def size_with(path: Path, beside: Iterable[str]) -> int:
    """Bytes of file ``path`` and of the files ``beside`` it (names relative to its folder)
    that are there: a model with the weights ONNX keeps outside it. OSError where ``path``
    cannot be read."""
    return path.stat().st_size + sum(
        (path.parent / f).stat().st_size for f in beside if (path.parent / f).is_file()
    )


def _read_only(out: Path) -> str | None:
    """How directory ``out`` says it must not change, else None: no write permission for this
    user, or none for anyone (which root, who may write anyway, is also held to)."""
    mode = stat.S_IMODE(out.stat().st_mode)
    if not os.access(out, os.W_OK) or not mode & 0o222:
        return f"mode {mode:o}"
    return None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


_recordings: list[list[Path]] = []  # recording()'s lists, open now


@contextlib.contextmanager
def recording() -> Iterator[list[Path]]:
    """A list of the directories replaced (atomic_dir's commit point passed) in this process
    while the block runs, in order: a command interrupted after one says that it holds the
    new content (quantgate.cli). Nothing is kept outside such a block."""
    replaced: list[Path] = []
    _recordings.append(replaced)
    try:
        yield replaced
    finally:  # this list, not an equal one (two recordings may hold the same paths)
        _recordings[:] = [r for r in _recordings if r is not replaced]


def replace_files(staged: Iterable[tuple[Path, Path]], recorded: Path) -> None:
    """Rename each staged file over its target, in order, as one commit point: a Ctrl-C,
    SIGTERM or SIGHUP waits until all are done (as ``_replace_dir``'s swap), and
    ``recorded`` is then recorded as replaced (``recording``)."""
    with _signals_held():
        for tmp, path in staged:
            os.replace(tmp, path)
        for replaced in _recordings:
            replaced.append(recorded)


def _replace_dir(new: Path, out: Path) -> None:
    """Put directory ``new`` at ``out``, and remove what was there. The swap is the commit
    point: a Ctrl-C, SIGTERM or SIGHUP waits for it to finish (and is raised after it), so
    ``out`` is never left missing, or with its old content only aside, by one."""
    with _signals_held():  # the old content goes too before a held signal ends the process
        old = _swap(new, out)
        for replaced in _recordings:
            replaced.append(out)
        if old is not None:
            _remove(old)


def _swap(new: Path, out: Path) -> Path | None:
    """Rename ``new`` to ``out``; where ``out``'s old content went (to remove), or None."""
    try:
        if _rename2(new, out, _RENAME_NOREPLACE):
            return None
    except FileExistsError:
        if _rename2(new, out, _RENAME_EXCHANGE):  # one step: out is never missing
            return new  # the old content, now at new's path
    # Elsewhere: os.rename cannot replace a non-empty directory, so move the old one aside,
    # then rename. Between the two renames the old content is intact in the aside directory.
    if not out.exists():
        os.rename(new, out)
        return None
    aside = Path(tempfile.mkdtemp(prefix=f"{aside_prefix(out)}{_owner()}-", dir=out.parent))
    aside.rmdir()
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    return aside


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """The signals that end a command wait while the block runs; the first of them is raised
    again when it ends, to the handler it would have met. Held by Python's own handlers, not
    the thread's signal mask: any thread (ONNX Runtime's, torch's) may take a signal for the
    process, and Python then runs its handler on the main thread, inside the block. An
    event loop's wakeup fd is set aside meanwhile, so that it hears of the signal once.
    Outside the main thread, which cannot set handlers, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    wakeup = signal.set_wakeup_fd(-1)
    try:
        with signals.handling(lambda signum, _frame: held.append(signum)):
            yield
    finally:
        signal.set_wakeup_fd(wakeup)
        for signum in dict.fromkeys(held):  # a handler that raises or exits ends the loop
            signal.raise_signal(signum)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2 flags (linux/fs.h)
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the system or the filesystem lacks it (the
    caller falls back to os.rename), OSError for any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync_tree(root: Path) -> None:
    """Every file below ``root`` and every directory entry on disk, before it is renamed
    into place: without it a power cut can leave the new name pointing at empty files."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue  # a link, or a fifo (whose open would wait for a writer): no data
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except (PermissionError, FileNotFoundError):  # linked in, not ours to read (its
                continue  # owner wrote it), or gone
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem that cannot sync a directory: the files themselves are synced
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove the directory tree ``path``, also where a folder in it is read-only; what cannot
    be removed is logged, never raised (the new content is already in place)."""

    def writable_and_retry(func, name, _exc):
        parent = os.path.dirname(name)
        try:
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
            func(name)
        except OSError as e:
            failed.append(f"{name}: {e.strerror or e}")

    failed: list[str] = []
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable_and_retry)
    else:
        shutil.rmtree(path, onerror=writable_and_retry)
    if failed:
        log.warning("could not remove %s completely (%s); delete it by hand", path, failed[0])
