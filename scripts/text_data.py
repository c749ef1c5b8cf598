"""Calibration and evaluation text for a text model, from real English every machine has
offline: two different sources, so that no evaluation row was seen in calibration.

- calibration: Debian's license texts (/usr/share/common-licenses), or, where that folder
  is missing (not Debian), the docstrings of Python's standard library;
- evaluation: CPython's help topics (``pydoc_data.topics``).

Sentences of 40-400 characters, mostly letters, each source's unique ones in a fixed
pseudo-random order (the same files on every run). Written as JSONL, ``{"text": ...}``
lines, which `quantgate export --calibration/--eval` and `quantgate gate --eval` read::

    python scripts/text_data.py                       # calib.jsonl (160), heldout.jsonl (100)
    python scripts/text_data.py --out data --calibration 256 --eval 200
    python scripts/text_data.py --new 300             # new-heldout.jsonl alone: 300 others

``--new N`` is for a re-gate (`quantgate gate --eval`) of a bundle exported with
heldout.jsonl: it writes new-heldout.jsonl alone, the N help-topic sentences after those
the folder's heldout.jsonl holds (after --eval's count where it has none), and leaves
calib.jsonl and heldout.jsonl as they are.

A classifier's evaluation data needs labels (``"label"``), which these texts do not have:
bring your own labelled rows for it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from pathlib import Path

LICENSES = "/usr/share/common-licenses"


def sentences(text: str) -> list[str]:
    """``text``'s sentences of 40-400 characters, at least 60% letters."""
    text = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text)
    return [
        p.strip()
        for p in parts
        if 40 <= len(p.strip()) <= 400 and sum(c.isalpha() for c in p) > 0.6 * len(p)
    ]


def _pick(found: list[str], n: int) -> list[str]:
    """``n`` of the unique sentences, in an order fixed by their hashes."""
    unique = sorted(set(found), key=lambda s: hashlib.md5(s.encode()).hexdigest())
    return unique[:n]


def license_sentences(n: int) -> list[str]:
    found = []
    for f in sorted(glob.glob(f"{LICENSES}/*")):
        if os.path.isfile(f):
            found += sentences(Path(f).read_text(encoding="utf-8", errors="ignore"))
    return _pick(found, n)


def docstring_sentences(n: int) -> list[str]:
    """From the docstrings of some of Python's standard library modules and their members."""
    import importlib
    import inspect

    found = []
    for name in ("argparse", "collections", "email", "json", "logging", "pathlib", "zipfile"):
        module = importlib.import_module(name)
        for member in (module, *vars(module).values()):
            if (inspect.ismodule(member) and member is not module) or not (
                doc := inspect.getdoc(member)
            ):
                continue
            found += sentences(doc)
    return _pick(found, n)


def pydoc_sentences(n: int) -> list[str]:
    from pydoc_data import topics

    return _pick([s for k in sorted(topics.topics) for s in sentences(topics.topics[k])], n)


def calibration_sentences(n: int) -> tuple[list[str], str]:
    """``n`` calibration sentences and where they came from."""
    if os.path.isdir(LICENSES):
        return license_sentences(n), f"Debian's license texts ({LICENSES})"
    return docstring_sentences(n), "docstrings of Python's standard library"


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def new_sentences(heldout: Path, eval_count: int, n: int) -> tuple[list[str], str]:
    """``n`` help-topic sentences that an export evaluated on ``heldout`` never saw, and
    where they start: after as many as ``heldout`` holds (it was written with some --eval),
    none of its texts repeated; where there is no ``heldout``, after ``eval_count``, the
    --eval of a run without --new. Raises ValueError for a ``heldout`` that is not JSONL."""
    if heldout.is_file():
        lines = heldout.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        seen = {r.get("text") for r in rows if isinstance(r, dict)}
        skip, after = len(rows), f"after the {len(rows)} rows of {heldout}"
    else:
        seen, skip = set(), eval_count
        after = f"after the first {eval_count} (--eval's: there is no {heldout})"
    topics = pydoc_sentences(skip + len(seen) + n)  # enough where some are heldout's
    return [t for t in topics[skip:] if t not in seen][:n], after


def _count(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of sentences >= 1, found {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."), help="folder (default: here)")
    parser.add_argument("--calibration", type=_count, default=160, metavar="N", help="default 160")
    parser.add_argument("--eval", type=_count, default=100, metavar="N", help="default 100")
    parser.add_argument(
        "--new",
        type=_count,
        metavar="N",
        help="write only new-heldout.jsonl: N help-topic sentences after those --out's "
        "heldout.jsonl holds (else after --eval's), rows an export evaluated on heldout.jsonl "
        "never saw (for `quantgate gate --eval`); calib.jsonl and heldout.jsonl are left as "
        "they are",
    )
    a = parser.parse_args(argv)
    pydoc = "Python's help topics (pydoc_data)"
    if a.new:  # a re-gate's rows: the export's calib.jsonl and heldout.jsonl stay
        try:
            new, after = new_sentences(a.out / "heldout.jsonl", a.eval, a.new)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            parser.error(
                f"{a.out / 'heldout.jsonl'}: cannot read its rows ({e}); --new writes the "
                "sentences after them: give --out a folder whose heldout.jsonl this script wrote"
            )
        outputs = [(a.out / "new-heldout.jsonl", new, f"{pydoc}, {after}", a.new)]
    else:
        calib, source = calibration_sentences(a.calibration)
        if not calib:
            parser.error(f"{source} gave no sentences: bring calibration text of your own")
        outputs = [
            (a.out / "calib.jsonl", calib, source, a.calibration),
            (a.out / "heldout.jsonl", pydoc_sentences(a.eval), pydoc, a.eval),
        ]
    a.out.mkdir(parents=True, exist_ok=True)
    for path, texts, where, asked in outputs:
        write_jsonl(path, texts)
        short = f" (of {asked} asked: all there are)" if len(texts) < asked else ""
        print(f"{path}: {len(texts)} sentences{short} from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
