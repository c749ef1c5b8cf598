"""Atomic directory writes: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on clean exit it replaces ``out``.

    If the block raises (or the process dies), ``out`` is untouched and the temporary
    directory is removed (or, after a hard kill, left as a hidden ``.NAME.tmp-*`` sibling
    that never shadows ``out``).
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; give it the mode mkdir would
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def target_problem(
    out: Path, *, force: bool, is_ours: Callable[[Path], bool], noun: str
) -> str | None:
    """Why ``out`` cannot take a new ``noun`` (a bundle, a checkpoint) written by ``atomic_dir``,
    else None. Cheap: callers check it before heavy work, and raise their own error type.

    Refused: an ancestor we cannot write into, a file, the directory a person works in (even
    with ``force``), and an existing non-empty directory that ``is_ours`` does not recognise
    unless ``force``."""
    out = Path(out).absolute()
    parent = out.parent  # the nearest existing ancestor must be a directory we may write into
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "is not a directory" if not parent.is_dir() else "is not writable"
        return f"cannot write the {noun} at {out}: {parent} {what}. Choose another --out."
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; expected a directory for the {noun}. Choose another path."
    if not out.is_dir() or is_ours(out):
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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _replace_dir(new: Path, out: Path) -> None:
    # os.rename cannot replace a non-empty directory: move the old one aside, swap, then
    # delete the old one. Between the two renames the old content still exists intact.
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside.rmdir()
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
