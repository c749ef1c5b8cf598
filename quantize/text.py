"""Text data: files of texts (and labels) in the formats of ``quantize.textfiles``, JSONL
``{"text": ..., "label": ...}`` lines among them, and the model's tokenizer. A row with a
``"text_pair"`` too is a pair, tokenized as one sequence (``quantgate.tokenizer.Text``):
a cross-encoder's query and passage, an NLI premise and hypothesis. A file holds pairs on
every row or on none.

A text file is read in two passes. The first (``_scan``) reads and checks every row,
tokenizes the good ones a few hundred at a time to learn their lengths and row hashes, and
keeps only their byte offsets; a file with bad rows is refused once, listing the first
``MAX_PROBLEMS``, or in one sentence where every JSONL line is wrong the same way. The
second pass, on every ``batches()``, seeks to the rows selected and tokenizes a batch at a
time, right-padded with the model's pad id, as the server pads requests.

``tokenize`` is the same tokenizing for texts in memory: what ``quantgate infer`` sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.bundle import Bundle, load, sha256_file
from quantgate.errors import DataError
from quantgate.quantize.data import (
    Batch,
    DataSource,
    Feeds,
    ModelInfo,
    Role,
    check_feeds,
    chunks,
    stratified,
)
from quantgate.quantize.heldout import row_hash
from quantgate.quantize.labels import (
    forms_problem,
    label_count,
    label_problem,
    name_index,
    number_cells_problem,
    one_based_hint,
    quote,
)
from quantgate.quantize.textfiles import (
    NOT_TEXT,
    READ_KEYS,
    UNREADABLE,
    TextFile,
    as_pair,
    pair_like,
    text_file,
)
from quantgate.spans import context_mask
from quantgate.tasks import EMBEDDING_TASKS, QA_TASKS
from quantgate.tokenizer import Backend, Text, Tokenizer, Transformers, Windows

log = logging.getLogger(__name__)


def text_source(path: Path, model: ModelInfo, samples: int | None, batch_size: int, role: Role):
    """The rows of a text file (JSONL, CSV, TSV, plain lines: ``textfiles.text_file``), read
    for ``role``."""
    flag = role.flag
    fmt = text_file(path)
    if model.tokenizer is None:
        raise DataError(
            f"{flag} {path}: text needs the model's tokenizer, and this model has none "
            f"(it is not a Hugging Face model). Pass a .npz with arrays "
            f"{', '.join(model.input_names)} instead."
        )
    tok = tokenizer_of(model)
    limit = model.max_seq_len or None
    where = f"{flag} {path}"
    scan = _scan(path, fmt, tok, limit, model, where)
    numbers = not fmt.typed_labels and scan.index_at is not None
    if numbers and (problem := number_cells_problem(model.labels)):  # before the lines that
        # are out of range: star ratings 1..5 were told to renumber from 0, then refused again
        raise DataError(f"{where}: labels such as {scan.index_at}: {problem}")
    error = _refusal(scan, fmt, model, where)
    if error is not None:
        raise error
    if not scan.offsets:
        found = fmt.nothing_found(path.stat().st_size)
        raise DataError(
            f"{where}: expected {fmt.words.expected}, found {found}. Write the texts into it."
        )
    if not scan.labelled and model.reads_row_labels:
        _warn_unlabelled(scan, fmt, where)
    if scan.null_pairs and not scan.paired:
        log.warning(
            '%s: "text_pair" is %s wherever it is given, so each row is read as one text',
            where,
            fmt.words.empty,
        )
    elif scan.pair_like and not scan.paired:
        log.warning(
            '%s: no row has a "text_pair", so each row is read as one text; %s %s %s not '
            "read. If it holds each row's second text (a passage, a hypothesis), name it "
            '"text_pair".',
            where,
            fmt.words.key + "s" * (len(scan.pair_like) > 1),
            _keys(sorted(scan.pair_like)),
            "are" if len(scan.pair_like) > 1 else "is",
        )
    if scan.paired and model.task in EMBEDDING_TASKS:
        log.warning(
            "%s: text pairs for a %s model, which embeds one text at a time: each pair is "
            "embedded as one sequence. A bi-encoder is served single texts: give those "
            '(a "text" per row) unless this model was trained on pairs',
            where,
            model.task,
        )
    lengths = np.asarray(scan.lengths, dtype=np.int64)
    offsets = np.asarray(scan.offsets, dtype=np.int64)
    # rows that are windows, where a pair was read in more than one (a pair that fits, or a
    # question that leaves no room, is one window: the row ``tokenize`` reads)
    window_of = np.asarray(scan.window_of, np.int64) if any(scan.window_of) else None
    pair_of = np.asarray(scan.pair_of, np.int64)
    if window_of is None:
        keep = stratified(lengths, samples)
    else:  # ``samples`` pairs, each with every window: its answer is its windows' best
        kept_pairs = stratified(np.bincount(pair_of, weights=lengths).astype(np.int64), samples)
        keep = stratified(lengths, None)  # every window, in length order: those of the pairs
        keep = keep[np.isin(pair_of[keep], kept_pairs)]
    cut = int(np.isin(keep, scan.cut).sum())
    pairs = scan.paired
    if cut and limit is not None:  # (texts are cut only where there is a limit)
        why = f"are longer than the model's {limit} tokens and are cut"
        if window_of is not None:  # the rest of the long ones are read in windows
            why = f"have a question that leaves its context no room in the model's {limit} tokens"
        log.warning(
            "%s: %d of %d %s %s %s: %s only %s",
            where,
            cut,
            len(keep) if window_of is None else len(np.unique(pair_of[keep])),
            role.value,
            "text pairs" if pairs else "texts",
            why,
            "the gates see" if role is Role.EVALUATION else "the calibration sees",
            _kept_words(tok, limit, pair=pairs)
            + (_qa_cut(model) if role is Role.EVALUATION else ""),
        )
    if window_of is not None and (window_of[keep] > 0).any():  # (whole pairs are kept)
        kept = np.unique(pair_of[keep])
        log.info(
            "%s: %d of %d %s text pairs are longer than the model's %d tokens: each is read "
            "in overlapping windows (Hugging Face's doc_stride), a row each, as `quantgate "
            "infer` reads them: %d rows",
            where,
            len(np.unique(pair_of[keep][window_of[keep] > 0])),
            len(kept),
            role.value,
            limit,
            len(keep),
        )
    if model.task in QA_TASKS and not pairs:
        log.warning(
            "%s: single texts for a %s model, which reads a question and its context as one "
            'pair: put each row\'s question in "text" and its context in "text_pair", as it '
            "is served",
            where,
            model.task,
        )
    digest = sha256_file(path)
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())
    h.update(f"{limit}".encode())  # not the tokenizer's path: the bundle moves with its copy
    index = name_index(model.labels)
    labelled = bool(scan.labelled)
    gated = role is Role.EVALUATION

    def batches() -> Iterator[Batch]:
        with open(path, "rb") as f:
            for idx in chunks(keep, batch_size):
                rows = []
                for off in offsets[idx]:
                    rows.append(fmt.row_at(f, int(off)))
                texts = [row_text(r) for r in rows]
                windows = context = None
                if window_of is not None:  # each row a window of its pair
                    feeds, context, windows = _windows_at(
                        tok, texts, window_of[idx], pair_of[idx], model, limit
                    )
                else:
                    feeds = _encode(tok, texts, model, limit)
                    context = _context(tok, texts, model, limit, feeds) if gated else None
                labels = None
                if labelled:  # a class name stands for its index
                    labels = np.array([index.get(r["label"], r["label"]) for r in rows], np.int64)
                # the gates' answers' context; calibration reads the inputs alone
                yield Batch(feeds, labels, context=context if gated else None, windows=windows)

    long = f"; {cut} longer than the model's {limit} tokens, cut to them" if cut else ""
    if cut and window_of is not None:
        long = f"; {cut} cut, their question leaving the context no room"
    what = "text pairs" if pairs else "texts"
    if window_of is not None:
        what = f"windows of {scan.pairs} text pairs"
    return DataSource(
        description=(
            f"{path.name}: {len(keep)} of {len(offsets)} {what} "
            f"({fmt.words.name}, model tokenizer{long})"
        ),
        kind=fmt.kind,
        file_sha256=digest,
        samples=len(keep),
        has_labels=labelled,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths[keep].min()), int(lengths[keep].max())),
        total=len(offsets),
        cut=cut,
        row_hashes=np.asarray(scan.hashes, dtype=np.uint64)[keep],
        labels_ignored=scan.ignored > 0,
        text_pairs=pairs,
        pairs=None if window_of is None else len(np.unique(pair_of[keep])),
    )


MAX_PROBLEMS = 10  # bad lines described one by one; the rest are counted
TOKEN_BATCH = 256  # texts tokenized at once to count their tokens


@dataclass
class _Scan:
    """What the first pass over a text file learns; none of its texts are kept."""

    offsets: list[int] = field(default_factory=list)  # byte offset of each good row
    lengths: list[int] = field(default_factory=list)  # its token count, at most the model's
    hashes: list[int] = field(default_factory=list)  # its row hash (row_hashes)
    cut: list[int] = field(default_factory=list)  # good rows longer than the model takes
    # a question answerer's pairs past the model's length are read in windows
    # (``tokenizer.Windows``), a row each: each row's window of its pair, and its pair (by
    # its number among the good rows); empty where rows are not windows
    window_of: list[int] = field(default_factory=list)
    pair_of: list[int] = field(default_factory=list)
    pairs: int = 0  # good rows read (pairs, where rows are windows)
    lines: int = 0  # rows (non-blank lines of JSONL)
    bad: int = 0  # rows that are not good
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, described
    shapes: set[tuple[str, ...] | None] = field(default_factory=set)  # how (two are enough)
    # the good rows without a "label" and with one: how many, and the first lines of each
    # (a file must label every row or none; the fewer are the ones told wrong)
    unlabelled_at: list[int] = field(default_factory=list)
    labelled_at: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=lambda: [0, 0])  # [without, with]
    lo: int = 1 << 63  # the smallest and largest integer label
    hi: int = -1
    index_at: str | None = None  # the first integer label, and its line
    name_at: str | None = None  # the first string label, and its line
    null_labels: int = 0  # rows whose "label" is null or empty (read as unlabelled)
    reads_row_labels: bool = True  # False: an embedding or token model's: labels not read
    ignored: int = 0  # lines whose label was not read for that
    unread: set[str] = field(default_factory=set)  # keys beside READ_KEYS there
    # the good rows without a "text_pair" and with one, as for labels; and those whose
    # "text_pair" is null or empty (read as none)
    unpaired_at: list[int] = field(default_factory=list)
    paired_at: list[int] = field(default_factory=list)
    pair_counts: list[int] = field(default_factory=lambda: [0, 0])  # [without, with]
    null_pairs: int = 0
    pair_like: set[str] = field(default_factory=set)  # unread keys that may be a text_pair

    def add(self, lineno: int, row: Any, problem: str | None) -> bool:
        """Take in one row (as read, with what is wrong with it); True for a good row."""
        self.lines += 1
        label = row.get("label") if isinstance(row, dict) else None
        if label is not None and not self.reads_row_labels:
            self.ignored, label = self.ignored + 1, None
        if isinstance(label, int) and not isinstance(label, bool):
            self.lo, self.hi = min(self.lo, label), max(self.hi, label)
            self.index_at = self.index_at or f"{label} on line {lineno}"
        elif isinstance(label, str):
            self.name_at = self.name_at or f"{quote(label)} on line {lineno}"
        if problem is not None:
            self.bad += 1
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(f"line {lineno}: {problem}")
            if len(self.shapes) < 2:
                self.shapes.add(_shape(row))
            return False
        has = label is not None
        self.counts[has] += 1
        if len(at := (self.labelled_at if has else self.unlabelled_at)) < MAX_PROBLEMS:
            at.append(lineno)
        if not has and self.reads_row_labels:
            self.null_labels += "label" in row
            if len(self.unread) < MAX_PROBLEMS:  # one may be a misnamed label
                self.unread.update(k for k in row if k not in READ_KEYS)
        paired = row.get("text_pair") is not None
        if not paired and len(self.pair_like) < MAX_PROBLEMS:  # a text_pair under its own name
            self.pair_like.update(k for k in row if k not in READ_KEYS and pair_like(k))
        self.pair_counts[paired] += 1
        self.null_pairs += not paired and "text_pair" in row
        if len(at := (self.paired_at if paired else self.unpaired_at)) < MAX_PROBLEMS:
            at.append(lineno)
        return True

    @property
    def labelled(self) -> bool:
        """Whether the good rows have labels (all of them, or ``mixed`` says otherwise)."""
        return self.counts[1] > 0

    @property
    def paired(self) -> bool:
        """Whether the good rows are text pairs (all of them, or ``mixed`` says otherwise)."""
        return self.pair_counts[1] > 0

    def mixed(self) -> None:
        """Where some good rows have a "label" (a "text_pair") and others none, the fewer are
        bad rows."""
        self._fewer(
            self.counts, self.unlabelled_at, self.labelled_at, "label", "label every row or none"
        )
        self._fewer(
            self.pair_counts,
            self.unpaired_at,
            self.paired_at,
            "text_pair",
            "a file holds pairs on every row or on none",
        )

    def _fewer(
        self, counts: list[int], without_at: list[int], with_at: list[int], key: str, fix: str
    ) -> None:
        without, with_ = counts
        if not (without and with_):
            return
        rows = without + with_
        if without <= with_:
            few, lines = without, without_at
            said = f'has no "{key}", though {with_} of {rows} rows have one'
        else:
            few, lines = with_, with_at
            said = f'has a "{key}", though {without} of {rows} rows have none'
        self.bad += few
        room = max(MAX_PROBLEMS - len(self.problems), 0)
        self.problems += [f"line {n}: {said}: {fix}" for n in lines[:room]]


def _scan(
    path: Path, fmt: TextFile, tok: Tokenizer, limit: int | None, model: ModelInfo, where: str
) -> _Scan:
    """Pass 1 over a text file: every row read and checked; the byte offset, token count and
    row hash of every good one, and which are cut at ``limit`` (tokenized only while no row
    is bad: such a file is refused)."""
    scan = _Scan(reads_row_labels=model.reads_row_labels)
    texts: list[Text] = []  # good lines waiting to be tokenized
    starts: list[int] = []  # and their offsets
    linenos: list[int] = []  # and their lines
    empty = len(tok.ids([""], None)[0])  # the special tokens alone: a text of no token

    def count() -> None:
        if (read := _windows_of(tok, texts, limit, model)) is not None:
            return windowed(read)
        ids = tok.ids(texts, limit)
        if tokenless := [i for i, row in enumerate(ids) if len(row) <= empty]:
            # (control characters alone, U+FFFD: BERT's tokenizer drops them) a file that
            # has one is refused, as `quantgate infer` refuses such a text
            scan.bad += len(tokenless)
            room = max(MAX_PROBLEMS - len(scan.problems), 0)
            scan.problems += [
                f"line {linenos[i]}: its text makes no token ({json.dumps(texts[i])[:40]}): the "
                "model's tokenizer drops every character of it"
                for i in tokenless[:room]
            ]
            return
        if limit is not None:  # a row of ``limit`` tokens may have been cut: count again
            full = [i for i, row in enumerate(ids) if len(row) == limit]
            longer = tok.ids([texts[i] for i in full], limit + 1) if full else []
            first = len(scan.offsets)
            scan.cut.extend(
                first + i for i, row in zip(full, longer, strict=True) if len(row) > limit
            )
        scan.lengths.extend(len(row) for row in ids)
        scan.hashes.extend(row_hash(np.asarray(row, dtype="<i8")) for row in ids)
        scan.offsets.extend(starts)
        scan.pairs += len(texts)
        texts.clear()
        starts.clear()
        linenos.clear()

    def windowed(read: Windows) -> None:
        """The windows of a batch of pairs, a row each."""
        first = np.searchsorted(read.pairs, np.arange(len(texts)))  # each pair's first window
        for w, pair in enumerate(read.pairs.tolist()):
            n = len(read.places[w])  # the window's tokens
            ids = read.encoded["input_ids"][w, :n].astype("<i8")
            scan.lengths.append(n)
            scan.hashes.append(row_hash(ids))
            scan.offsets.append(starts[pair])
            scan.window_of.append(w - int(first[pair]))
            scan.pair_of.append(scan.pairs + pair)
            if pair in read.cut:
                scan.cut.append(len(scan.offsets) - 1)
        scan.pairs += len(texts)
        texts.clear()
        starts.clear()
        linenos.clear()

    with open(path, "rb") as f:
        for lineno, start, row, unreadable in fmt.rows(f, where):
            problem = unreadable or _row_problem(row, model)
            if scan.add(lineno, row, problem) and not scan.bad:
                texts.append(row_text(row))
                starts.append(start)
                linenos.append(lineno)
                if len(texts) == TOKEN_BATCH:
                    count()
    if texts and not scan.bad:
        count()
    scan.mixed()
    return scan


def _refusal(scan: _Scan, fmt: TextFile, model: ModelInfo, where: str) -> DataError | None:
    """The one DataError for a scanned text file with bad rows, or whose labels are class
    names that cannot stand for classes (``labels.forms_problem``); None for a good file."""
    forms = forms_problem(scan.index_at, scan.name_at, model.labels)
    if not scan.bad:
        return None if forms is None else DataError(f"{where}: {forms}")
    shape = next(iter(scan.shapes)) if len(scan.shapes) == 1 else None
    if scan.bad == scan.lines and shape is not None:  # every line wrong the same way: say once
        return DataError(f"{where}: {_same_on_every_line(shape)}")
    more = scan.bad - len(scan.problems)
    body = [
        *(f"  - {p}" for p in scan.problems),
        *([f"  ... and {more} more bad line(s)"] if more else []),
        *(
            [one_based_hint(scan.lo, scan.hi, label_count(model.labels)).strip()]
            if model.labels
            else []
        ),
        *([forms] if forms else []),
    ]
    optional = (
        f'an optional "label" (a class index, or one of the model\'s {len(model.labels)} '
        "class names)"
        if model.labels
        else 'an optional "label" (not read: an embedding is judged against FP32)'
        if model.task in EMBEDDING_TASKS
        else 'an optional integer "label"'
    )
    return DataError(
        f"{where}: expected {fmt.words.expected}"
        + (f" and {optional}" if fmt.labels else "")
        + ":\n"
        + "\n".join(part for part in body if part)
    )


def _warn_unlabelled(scan: _Scan, fmt: TextFile, where: str) -> None:
    """Warn where a file read as unlabelled looks as if it meant to have labels: a "label"
    null (or empty) in every row, or keys or columns beside "text" that are not read (one
    may be the label)."""
    key, empty = fmt.words.key, fmt.words.empty
    keys = ", ".join(f'"{k}"' for k in sorted(scan.unread))
    if scan.null_labels == scan.lines:
        log.warning(
            '%s: "label" is %s in every row, so the rows are read as unlabelled (the gates '
            "compare with FP32 only).%s",
            where,
            empty,
            f" {key.capitalize()}s {keys} are not read: if one holds each row's class, put "
            'it in "label".'
            if keys
            else "",
        )
    elif keys:
        log.warning(
            '%s: no row has a "label", so the rows are read as unlabelled; %ss %s are not '
            'read. If one of them holds each row\'s class, name it "label".',
            where,
            key,
            keys,
        )


def _row_problem(row: Any, model: ModelInfo) -> str | None:
    """What is wrong with a row read from a text file, or None: an object with a non-blank
    string "text" (and "text_pair", where it has one) and a label that is a class of the
    model (``labels.label_problem``)."""
    if not isinstance(row, dict):
        return f'found {_json_kind(row)}, expected an object with a "text" key'
    if "text" not in row:
        return f'no "text" key (found {_keys(row) or "an empty object"})'
    for key in ("text", "text_pair"):
        if (problem := _text_problem(row, key)) is not None:
            return problem
    label = row.get("label") if model.reads_row_labels else None
    return None if label is None else label_problem(label, model.labels)


def _text_problem(row: dict, key: str) -> str | None:
    """What is wrong with a row's "text" (or its "text_pair", where not null), or None."""
    text = row.get(key)
    if key == "text_pair" and text is None:
        return None
    if key == "text" and isinstance(text, list) and len(text) == 2:
        return (
            f'"text" is a list of two ({json.dumps(text)[:60]}): for a pair, put the first in '
            '"text" and the second in "text_pair"'
        )
    if not isinstance(text, str) or not text.strip():
        return f'no non-blank string "{key}" (found {json.dumps(text)[:60]})'
    if _invisible(text):
        return (
            f'"{key}" holds only spaces and invisible characters ({json.dumps(text)[:60]}): '
            "no tokenizer makes a token of them"
        )
    try:
        text.encode()
    except UnicodeEncodeError as e:  # JSON's "\ud800": half a UTF-16 pair, no character
        return (
            f'"{key}" holds {json.dumps(text[e.start])}, half of a UTF-16 surrogate pair, at '
            f"character {e.start}: no tokenizer reads it; write the character whole"
        )
    return None


def _invisible(text: str) -> bool:
    """Whether ``text`` is only spaces and invisible characters (zero-width spaces and
    joiners, soft hyphens: Unicode's Cf), of which no tokenizer makes a token."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


def row_text(row: dict) -> Text:
    """A good row's text: its "text", or ("text", "text_pair") where it has a pair."""
    pair = row.get("text_pair")
    return row["text"] if pair is None else (row["text"], pair)


def _shape(row: Any) -> tuple[str, ...] | None:
    """How a bad line is wrong, where every line of a file may be wrong the same way: the keys
    of an object without "text", the kind of a value that is not an object; else None."""
    if row is UNREADABLE:
        return None
    if isinstance(row, dict):
        return ("keys", *row) if "text" not in row else None
    return ("value", _json_kind(row))


def _same_on_every_line(shape: tuple[str, ...]) -> str:
    """One message for a file whose every line has the same wrong keys or is not an object."""
    if shape[0] == "value":
        fix = (
            " Wrap each, for example with: jq -c '{text: .}' IN.jsonl > OUT.jsonl"
            if shape[1] == "a string"
            else ""
        )
        return (
            f'found {shape[1]} on every line; expected one {{"text": ..., "label": ...}} '
            f'object per line ("label" optional).{fix}'
        )
    keys = shape[1:]
    found = f"found keys {_keys(keys)} on every line" if keys else "found {} on every line"
    texts = [k for k in keys if k not in NOT_TEXT]
    expected = (
        f'{found}; expected "text" (the text to tokenize), optionally "text_pair" (its '
        'second text, for a model that reads pairs) and "label" (its class). '
    )
    if len(texts) == 2:  # sentence1 and sentence2, question and context, query and passage
        a, b = as_pair(*texts)
        label = ", label" if "label" in keys else ""
        return (
            f"{expected}Name the keys that hold the texts, for example with: "
            f"jq -c '{{text: .{a}, text_pair: .{b}{label}}}' IN.jsonl > OUT.jsonl "
            '(in that order: "text" is the one the model reads first, a query before its '
            'passage; a model that reads one text at a time takes "text" alone)'
        )
    key = texts[0] if len(texts) == 1 else "KEY"
    return (
        f'{expected}Rename the key that holds the text to "text", for example with: '
        f"jq -c '.text = .{key} | del(.{key})' IN.jsonl > OUT.jsonl"
    )


def _keys(keys: Iterable[str]) -> str:
    """'"sentence", "label"': the first eight keys, quoted."""
    keys = list(keys)
    shown = ", ".join(map(quote, keys[:8]))
    return shown + (f", ... {len(keys) - 8} more" if len(keys) > 8 else "")


def _json_kind(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return f"JSON {json.dumps(value)}"
    return "an array" if isinstance(value, list) else "a number"


def tokenize(texts: Sequence[Text], model: ModelInfo, tokenizer: Tokenizer | None = None) -> Feeds:
    """``texts`` (strings, or (text, text_pair) pairs: a list of two is one too, as JSON
    gives it) as one padded batch of the model's inputs, by the model's own tokenizer (as
    JSONL data is; ``tokenizer``, where the caller has loaded it), cut at its longest
    sequence: what a client sends the served model."""
    rows = _rows(texts)  # before the tokenizer loads: seconds, for transformers' import
    tok = _own(tokenizer, model)
    counts = _token_counts(tok, rows, None)
    _refuse_tokenless(tok, rows, counts)
    limit = model.max_seq_len or None
    if limit is not None:
        for i, n in enumerate(counts, 1):
            if n > limit:
                pair = isinstance(rows[i - 1], tuple)
                log.warning(
                    "text %d is %d tokens; the model reads at most %d, so %s%s",
                    i,
                    n,
                    limit,
                    _cut_words(tok, n - limit, pair=pair),
                    _qa_cut(model) + (_WINDOWS_HINT if pair and model.task in QA_TASKS else ""),
                )
    return _encode(tok, rows, model, limit)


def windows(
    pairs: Sequence[Text], model: ModelInfo, tokenizer: Tokenizer | None = None
) -> tuple[Feeds, Windows] | None:
    """A question answerer's (question, context) ``pairs`` as the model's inputs, a context
    longer than the model read in overlapping windows (``tokenizer.Windows``: a row per
    window, ``Windows.pairs`` saying whose): what ``spans.answers`` reads each pair's answer
    from. A model without a longest sequence reads each pair whole, in one window. None
    where a text is not a pair, or the tokenizer keeps no offsets (a slow one:
    ``tokenize`` cuts)."""
    rows = _rows(pairs)
    tok = _own(tokenizer, model)
    asked = [r for r in rows if isinstance(r, tuple)]
    if len(asked) != len(rows):  # single texts: nothing to window
        return None
    _refuse_tokenless(tok, rows)
    limit = model.max_seq_len or max(_token_counts(tok, rows, None))
    read = tok.windows(asked, limit)
    if read is None:
        return None
    if read.cut:
        log.warning(
            "%d of %d questions leave their context no room in the model's %d tokens, so the "
            "model reads %s%s",
            len(read.cut),
            len(rows),
            limit,
            _kept_words(tok, limit, pair=True),
            _qa_cut(model),
        )
    return _feeds(read.encoded, model, "tokenized text"), read


def _own(tokenizer: Any, model: ModelInfo) -> Tokenizer:
    """``tokenizer``, where the caller has loaded one (a transformers tokenizer is wrapped,
    as before), else the model's own."""
    tok = tokenizer or tokenizer_of(model)
    if not isinstance(tok, (Backend, Transformers)):
        tok = Transformers(tok, model.pad_values.get("input_ids", 0))
    return tok


# where a question answerer's pair is cut by ``tokenize``: what would read it whole
_WINDOWS_HINT = (
    " (text_windows reads a long context in overlapping windows, as `quantgate infer` does, "
    "where the tokenizer keeps offsets: a fast one)"
)


def _qa_cut(model: ModelInfo) -> str:
    """What a cut means to a question answerer: its answer may have been in the part cut."""
    return "; an answer in the part cut cannot be found" if model.task in QA_TASKS else ""


def _lost_end(tok: Tokenizer) -> str:
    """The end of a text too long that ``tok`` cuts: its "last" tokens, or its "first"."""
    return "first" if tok.truncation_side == "left" else "last"


def _kept_words(tok: Tokenizer, limit: int, *, pair: bool) -> str:
    """Which ``limit`` tokens of a text (or a pair) too long the model reads, as ``tok`` cuts."""
    lost = _lost_end(tok)
    if pair:
        return f"{limit} tokens of each (the longer text of a pair loses its {lost} tokens first)"
    return f"their {'first' if lost == 'last' else 'last'} {limit} tokens"


def _cut_words(tok: Tokenizer, n: int, *, pair: bool) -> str:
    """Which ``n`` tokens a text (or a pair) loses to the model's limit, as ``tok`` cuts."""
    lost = _lost_end(tok)
    return (
        f"{n} are cut, the longer text's {lost} tokens first" if pair else f"the {lost} {n} are cut"
    )


def text_inputs(bundle: Bundle | str | Path, texts: Sequence[Text]) -> Feeds:
    """``texts`` as one padded batch of ``bundle``'s inputs, by the tokenizer the bundle
    carries (hashed with it): what ``Client.infer(name, text_inputs(bundle, texts))`` sends,
    and what `quantgate infer -t TEXT --bundle` sends. Each text is a string, or a pair
    ``(text, text_pair)`` for a model that reads two (a cross-encoder's query and passage),
    every row alike. A DataError where the bundle's model takes no text (no tokenizer), or a
    text is blank or not UTF-8."""
    b = bundle if isinstance(bundle, Bundle) else load(bundle)
    return tokenize(texts, ModelInfo.from_manifest(b.manifest, b.path))


def text_windows(
    bundle: Bundle | str | Path, pairs: Sequence[tuple[str, str]]
) -> tuple[Feeds, Windows]:
    """A question answerer's (question, context) ``pairs`` as ``bundle``'s inputs, a context
    longer than the model read in overlapping windows, a row each (``tokenizer.Windows``):
    what `quantgate infer -t Q -p C --bundle` sends. ``spans.answers(pairs, start, end,
    w.places, w.pairs)`` reads each pair's answer from the scores the rows get. A DataError
    where the bundle's tokenizer keeps no offsets (a slow one), or a text is not a pair."""
    b = bundle if isinstance(bundle, Bundle) else load(bundle)
    model = ModelInfo.from_manifest(b.manifest, b.path)
    rows = _rows(pairs)
    if not all(isinstance(r, tuple) for r in rows):
        raise DataError("text_windows reads (question, context) pairs: give a pair a row")
    read = windows(rows, model)
    if read is None:
        raise DataError(
            f"{b.path}: its tokenizer keeps no offsets (a slow one), so its tokens' places in "
            "the context are not known: export the model with its fast tokenizer"
        )
    return read


def _rows(texts: Sequence[Text]) -> list[Text]:
    """``texts`` as rows to tokenize, each a string or a (text, text_pair) tuple (a list of
    two, as JSON and pandas give a pair, made one). Refused: one string or one pair for a
    list of them, no texts, a blank one, one that is not UTF-8 (a shell hands Python the
    bytes it was given: an ISO-8859-1 'é' arrives as a lone surrogate, which the tokenizer
    fails on with a TypeError), and pairs on some rows only."""
    if isinstance(texts, str):  # a Sequence[str] too: it would be a row per character
        raise DataError(f"expected a list of texts, found one string ({texts[:40]!r}): give [text]")
    if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, str) for t in texts):
        raise DataError(  # each text would be a row of its own: two rows, no pair
            f"expected a list of texts, found one tuple of two strings ({texts[0][:30]!r}, "
            f"{texts[1][:30]!r}): for one pair, give [(text, text_pair)]; for two texts, a list"
        )
    if not texts:
        raise DataError("expected one or more texts to tokenize, found none")
    rows: list[Text] = []
    for i, t in enumerate(texts, 1):
        which = f"text {i} of {len(texts)}"
        if isinstance(t, (tuple, list)) and len(t) == 2:
            _check_text(t[0], which + ", its text")
            _check_text(t[1], which + ", its text_pair")
            rows.append((t[0], t[1]))
        elif isinstance(t, (tuple, list)):
            raise DataError(
                f"{which}: expected a string or a pair (text, text_pair), found a "
                f"{type(t).__name__} of {len(t)}"
            )
        else:
            _check_text(t, which)
            rows.append(t)
    pairs = [isinstance(t, tuple) for t in rows]
    if any(pairs) and not all(pairs):
        odd = pairs.index(not pairs[0]) + 1
        raise DataError(
            f"text 1 is {'a pair' if pairs[0] else 'one text'} and text {odd} is "
            f"{'a pair' if pairs[odd - 1] else 'one text'}: give every row a text_pair or none"
        )
    return rows


PAIR = ("text", "text_pair")  # a pair's texts, as _rows names them


def _refuse_tokenless(tok: Tokenizer, rows: list[Text], counts: list[int] | None = None) -> None:
    """Refuse a text of which ``tok`` makes no token, only the special ones an empty text
    gets (a BERT tokenizer drops control characters and U+FFFD): the model would answer
    for nothing, and say nothing of it. ``counts``: each row's tokens, where the caller has
    them (a single text's are its own); each text of a pair is counted alone."""
    said: list[tuple[str, str, int]] = []  # (which, as _rows names it; the text; its tokens)
    alone: list[tuple[str, str]] = []  # the texts still to count
    for i, r in enumerate(rows):
        which = f"text {i + 1} of {len(rows)}"
        if isinstance(r, tuple):
            alone += [(f"{which}, its {k}", t) for k, t in zip(PAIR, r, strict=True)]
        elif counts is not None:
            said.append((which, r, counts[i]))
        else:
            alone.append((which, r))
    if alone:
        n_alone = _token_counts(tok, [t for _, t in alone], None)
        said += [(w, t, n) for (w, t), n in zip(alone, n_alone, strict=True)]
    empty = len(tok.ids([""], None)[0])
    for which, t, n in said:
        if n <= empty:
            raise DataError(
                f"{which} ({t[:40]!r}) makes no token: the model's tokenizer drops every "
                "character of it, and the model would answer for an empty text; expected "
                "words to tokenize"
            )


def _check_text(t: object, which: str) -> None:
    """Refuse a text (``which``, as a message names it) that is no string, is blank, or is
    not UTF-8."""
    if not isinstance(t, str):
        raise DataError(f"{which}: expected a string, found {type(t).__name__}")
    if not t.strip():
        raise DataError(f"{which} is blank ({t!r}): expected words to tokenize")
    if _invisible(t):
        raise DataError(
            f"{which} holds only spaces and invisible characters ({t!r}): no tokenizer makes a "
            "token of them; expected words to tokenize"
        )
    try:
        t.encode()
    except UnicodeEncodeError as e:  # a lone surrogate: a byte the shell could not decode
        c = ord(t[e.start])
        byte = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise DataError(
            f"{which} is not UTF-8 ({byte} at character {e.start}): pass text encoded in "
            "UTF-8 (iconv -f LATIN1 -t UTF-8 converts ISO-8859-1)"
        ) from None


def tokenizer_of(model: ModelInfo) -> Tokenizer:
    """The model's own tokenizer (a bundle's copy): text to token ids, and back. It pads
    with the model's pad id, as the server pads, also where the tokenizer names none of
    its own (GPT-2's) or another than the model's config. A bundle whose export checked its
    tokenizer.json against transformers runs it without transformers (``quantgate.tokenizer``)."""
    if model.tokenizer is None:
        raise DataError(
            "text needs the model's tokenizer, and this model has none (it is not a Hugging "
            f"Face model); send its inputs ({', '.join(model.input_names)}) as arrays instead"
        )
    directory, pad = model.tokenizer, model.pad_values.get("input_ids", 0)  # 0: not recorded
    if not Path(directory).is_dir():  # a bundle moved to another machine: the export's path
        raise DataError(
            f"text needs the model's tokenizer, recorded at export as {directory}, which is "
            "not a directory on this machine (bundles exported before they carried their "
            "tokenizer point at the model's own directory). Re-export the bundle, put the model "
            f"directory there, or give the tokenized inputs ({', '.join(model.input_names)}) "
            "as arrays instead (a .npz for quantgate's data: quantgate.quantize.data.write_npz "
            "writes one)."
        )
    if model.tokenizer_settings is not None:
        try:
            fast = Backend.load(directory, model.tokenizer_settings, pad)
        except ModuleNotFoundError as e:
            if e.name == "tokenizers":  # transformers' tokenizers need it too: say it is that
                raise
            fast = None
        except Exception as e:  # noqa: BLE001 - any failure means the same to the user
            raise DataError(f"cannot load the model's tokenizer from {directory}: {e}") from e
        if fast is not None and fast.proven:
            return fast
    return Transformers(_transformers_tokenizer(directory), pad)


def _transformers_tokenizer(directory: str):
    try:
        auto = _auto_tokenizer()
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("transformers", "tokenizers"):
            raise  # the `hf` extra is not installed: the CLI says to install it
        raise DataError(f"cannot import transformers' tokenizers ({e}); check its install") from e
    try:
        return auto.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise DataError(f"cannot load the model's tokenizer from {directory}: {e}") from e


def _auto_tokenizer():
    """transformers' AutoTokenizer, imported without its advice that PyTorch is missing: a CI
    runner or a client tokenizes without torch by design (the `hf` extra alone)."""
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(quiet)
    os.environ[quiet] = "1"
    try:
        from transformers import AutoTokenizer
    finally:
        if before is None:
            del os.environ[quiet]
        else:
            os.environ[quiet] = before
    return AutoTokenizer


def _windows_at(
    tok: Tokenizer,
    texts: list[Text],
    nth: np.ndarray,
    pairs: np.ndarray,
    model: ModelInfo,
    limit: int | None,
) -> tuple[Feeds, np.ndarray, np.ndarray]:
    """Rows that are windows (``_Scan.window_of``): window ``nth[i]`` of ``texts[i]``, its
    pair (``pairs[i]``, its number). Their inputs, their context tokens
    (``spans.context_mask``) and ``Batch.windows``: each row's pair and its part of the
    context's first token. Each pair is read once, however many of its windows the rows
    are (a long context's full windows sort together)."""
    distinct, first_row, row_pair = np.unique(pairs, return_index=True, return_inverse=True)
    read = _windows_of(tok, [texts[i] for i in first_row], limit, model)
    assert read is not None  # as the scan read them
    chosen = np.searchsorted(read.pairs, np.arange(len(distinct)))[row_pair] + nth
    places = [read.places[w] for w in chosen]
    width = max(len(p) for p in places)
    feeds = _feeds({k: v[chosen, :width] for k, v in read.encoded.items()}, model, "text")
    windows = np.stack([pairs, read.starts[chosen]], axis=1)
    return feeds, context_mask(texts, places, width), windows


def _windows_of(
    tok: Tokenizer, texts: list[Text], limit: int | None, model: ModelInfo
) -> Windows | None:
    """A question answerer's pairs in windows (``Tokenizer.windows``): the rows its data is
    read as; None for other models and texts, and where the tokenizer keeps no offsets."""
    pairs = [t for t in texts if isinstance(t, tuple)]
    if model.task not in QA_TASKS or limit is None or not pairs or len(pairs) != len(texts):
        return None
    return tok.windows(pairs, limit)


def _token_counts(tok: Tokenizer, texts: list[Text], limit: int | None) -> list[int]:
    return [len(ids) for ids in tok.ids(texts, limit)]


def _context(
    tok: Tokenizer, texts: list[Text], model: ModelInfo, limit: int | None, feeds: Feeds
) -> np.ndarray | None:
    """A question answerer's context tokens in ``feeds`` (``spans.context_mask``), where its
    answers may be, as ``quantgate infer`` reads them; None for other models, and where the
    tokenizer keeps no offsets (a slow one)."""
    if model.task not in QA_TASKS:
        return None
    places = tok.places(texts, limit)
    return None if places is None else context_mask(texts, places, feeds["input_ids"].shape[1])


def _encode(tok: Tokenizer, texts: list[Text], model: ModelInfo, limit: int | None) -> Feeds:
    enc = tok.encode(texts, limit)
    longest = enc["input_ids"].shape[1]
    if limit is not None and longest > limit and isinstance(texts[0], tuple):
        raise DataError(  # the tokenizers library leaves such a pair uncut
            f"a text pair of {longest} tokens cannot be cut to the model's {limit}: the special "
            "tokens around two texts take most of that. Export with a --max-seq-len that leaves "
            "room for both texts, or give single texts"
        )
    return _feeds(enc, model, "tokenized text")


def _feeds(enc: Mapping[str, np.ndarray], model: ModelInfo, what: str) -> Feeds:
    """A tokenizer's arrays as ``model``'s inputs, each of its dtype."""
    feeds = {}
    for spec in model.inputs:
        if spec.name in enc:  # a token_type_ids left out is one segment: check_feeds adds it
            feeds[spec.name] = enc[spec.name].astype(spec.dtype)
    return check_feeds(feeds, model, what)


__all__ = ["text_inputs", "text_source", "text_windows", "tokenize", "tokenizer_of", "windows"]
