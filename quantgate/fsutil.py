"""Atomic directory writes: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
