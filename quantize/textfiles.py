"""The text files data comes in: JSON Lines, CSV, TSV and plain lines, read row by row.

Each format finds its rows in one pass (``rows``: every row with the line it starts on and
its byte offset) and reads one row again from its offset (``row_at``), so ``quantize.text``
keeps offsets, not texts, between its passes. A row is a dict: ``"text"``, and
``"text_pair"`` and ``"label"`` where the file gives them (``READ_KEYS``), and whatever
other keys or columns it has (named in a warning when no row has a label: one of them may
be it).

- ``.jsonl`` (``.json``, ``.ndjson``): one ``{"text": ..., "label": ...}`` object per line
  (``"text_pair"`` too, for a model that reads pairs).
- ``.csv``, ``.tsv``: a header row naming a ``text`` column and optionally ``text_pair``
  and ``label`` columns, then one row per text; other columns are not read. An empty
  ``text_pair`` cell is none. A label cell that is a whole
  number (``1.0`` too) is a class index, any other a class name, an empty one no label
  (``quantize.text`` refuses number cells where class names are other numbers). Both are
  quoted as pandas writes them (``to_csv``; RFC 4180): a field in double quotes may hold
  the delimiter, doubled quotes and line breaks, and ends at its closing quote.
- ``.txt``: one text per line, without labels.

Every format is UTF-8 (a byte-order mark is skipped); blank lines are skipped.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from quantgate.errors import DataError
from quantgate.quantize.labels import cell_index
from quantgate.schema import RepeatedKeys, unique_keys

# A row's first line (1-based), its byte offset, the row (a dict where it could be read),
# and what is wrong with it as written (None: readable; the text and label are checked
# by quantize.text).
Found = tuple[int, int, Any, "str | None"]

UNREADABLE = object()  # a row that cannot be read: not UTF-8, not JSON, fields miscounted
# The longest line read (bytes). A text is cut to the model's longest sequence, a few thousand
# characters at most; one line of 50 MB still cost 3 GB and minutes to tokenize, to 3 tokens.
MAX_LINE_BYTES = 1 << 20
READ_KEYS = ("text", "text_pair", "label")  # what a row's keys (a file's columns) may give
# keys or columns that hold no text to tokenize (SQuAD's rows have "title" and "answers" too)
NOT_TEXT = ("label", "labels", "id", "idx", "title", "answers")
# Other datasets' names for a pair's first text and its second: a hint puts the first in
# "text" (the order matters: a reranker reads its query first)
FIRST_TEXTS = ("query", "question", "question1", "premise", "sentence1", "anchor", "text_a",
               "text1", "q", "sentence")  # fmt: skip
SECOND_TEXTS = ("pair", "text_b", "text2", "question2", "sentence2", "passage", "hypothesis",
                "context", "document", "positive", "answer")  # fmt: skip


def as_pair(a: str, b: str) -> tuple[str, str]:
    """Two columns' names in the order "text" and "text_pair" take them: another dataset's
    first text first (``FIRST_TEXTS``, ``SECOND_TEXTS``), else as the file has them."""
    swap = b.lower() in FIRST_TEXTS or a.lower() in SECOND_TEXTS
    return (
        (b, a) if swap and not (a.lower() in FIRST_TEXTS and b.lower() in FIRST_TEXTS) else (a, b)
    )


def pair_like(key: str) -> bool:
    """Whether an unread key or column may hold a pair's second text: "text_pair" in
    another case, or another dataset's name for it."""
    return key.lower() in (*SECOND_TEXTS, "text_pair", "textpair", "text-pair")


@dataclass(frozen=True)
class Words:
    """How messages speak of a format's rows."""

    name: str  # "JSONL"
    expected: str  # what a good row is, completing "expected ..."
    key: str  # what holds a value: "key" (JSON) or "column"
    empty: str  # a label given as nothing: "null" or "empty"


class TextFile:
    """One format. ``rows`` may raise DataError for the whole file (a CSV header without a
    "text" column, a UTF-16 file); a bad row is yielded with its problem instead."""

    kind = ""
    words: Words
    labels = True  # whether its rows can carry a label
    typed_labels = True  # whether a label says 1 from "1" (JSON does; a CSV cell is text)

    def rows(self, f: BinaryIO, where: str) -> Iterator[Found]:
        raise NotImplementedError

    def row_at(self, f: BinaryIO, offset: int) -> dict[str, Any]:
        raise NotImplementedError

    def nothing_found(self, size: int) -> str:
        """What a file of ``size`` bytes held, where ``rows`` found no row in it."""
        return "only blank lines" if size else "an empty file"


class JsonLines(TextFile):
    kind = "jsonl"
    words = Words("JSONL", 'one JSON object per line with a non-blank string "text"', "key", "null")

    def rows(self, f: BinaryIO, where: str) -> Iterator[Found]:
        first = True
        for lineno, start, line in _lines(f, where):
            value, problem = _parse_json(line)
            if first:
                _check_json_lines(line, value, lineno, where)
                first = False
            yield lineno, start, value, problem

    def row_at(self, f: BinaryIO, offset: int) -> dict[str, Any]:
        f.seek(offset)
        return json.loads(f.readline())


class PlainLines(TextFile):
    kind = "txt"
    words = Words("text lines", "one non-blank text per line", "key", "empty")
    labels = False

    def rows(self, f: BinaryIO, where: str) -> Iterator[Found]:
        for lineno, start, line in _lines(f, where):
            try:
                text = _decode(line, start)
            except UnicodeDecodeError as e:
                yield lineno, start, UNREADABLE, _not_utf8(e)
                continue
            yield lineno, start, {"text": text}, None

    def row_at(self, f: BinaryIO, offset: int) -> dict[str, Any]:
        f.seek(offset)
        return {"text": _decode(f.readline(), offset)}


class Delimited(TextFile):
    """CSV or TSV: a header row, then one row per text. ``header`` is set by ``rows``."""

    typed_labels = False

    def __init__(self, kind: str):
        self.kind = kind
        self.delimiter = "\t" if kind == "tsv" else ","
        self.words = Words(
            kind.upper(),
            'a header row naming a "text" column, then one row per text with a non-blank "text"',
            "column",
            "empty",
        )
        self.header: list[str] = []

    def rows(self, f: BinaryIO, where: str) -> Iterator[Found]:
        lines = _Records(f, where)
        reader = _read(self._reader(lines), lines, where)
        self.header = self._header(next((r for r in reader if r), []), where)  # blank lines before
        for fields in reader:
            lineno, start = lines.start
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line (a row of blank fields is a row: its text is told blank)
            if len(fields) != len(self.header):
                yield lineno, start, UNREADABLE, self._miscount(fields)
                continue
            yield lineno, start, self._row(fields), None

    def row_at(self, f: BinaryIO, offset: int) -> dict[str, Any]:
        f.seek(offset)
        return self._row(next(self._reader(_Records(f, "", offset))))

    def _reader(self, lines: Iterator[str]) -> Iterator[list[str]]:
        """csv's reader of these files. Strict: a field that opens a quote ends where it
        closes (a stray quote ran the field on over the next lines, merging rows, and lost a
        label without a word). In CSV, spaces after a comma are skipped: `text, label` by
        hand, and `a, "b, c"`, whose quote opens the field. In TSV they are the cell's (code
        indented after a tab): a byte-level BPE tokenizer reads them, as it does a JSONL
        row's."""
        comma = self.delimiter == ","
        return csv.reader(lines, delimiter=self.delimiter, strict=True, skipinitialspace=comma)

    def nothing_found(self, size: int) -> str:
        return "a header and no rows" if self.header else super().nothing_found(size)

    def _header(self, fields: list[str], where: str) -> list[str]:
        names = [name.strip() for name in fields]
        if "text" not in names:
            found = ", ".join(json.dumps(n) for n in names[:8]) or "an empty file"
            raise DataError(
                f'{where}: expected a header row naming a "text" column (the text to tokenize) '
                f'and optionally a "label" column (its class); found {found}. '
                + self._header_hint(names)
            )
        for read in READ_KEYS:  # other columns are not read: alike or blank, no matter
            if names.count(read) > 1:
                raise DataError(f'{where}: the header names the column "{read}" twice')
        return names

    def _header_hint(self, names: list[str]) -> str:
        """What to do about a header without "text": mind its case, split it by this
        format's delimiter, or name the text's column."""
        lower = [n.lower() for n in names]
        if "text" in lower:
            return (
                f'Column names are read as written: write "{names[lower.index("text")]}" as '
                '"text" (and a label column as "label").'
            )
        mine = "tabs" if self.kind == "tsv" else "commas"
        for sep, called in ((";", "semicolons"), (",", "commas"), ("\t", "tabs"), ("|", "bars")):
            if sep != self.delimiter and len(names) == 1 and sep in names[0]:
                suffix = {",": ".csv", "\t": ".tsv"}.get(sep)
                how = (
                    f"name the file *{suffix}"
                    if suffix
                    else f"write {mine} instead (pandas: to_csv(PATH, index=False))"
                )
                return f"The first line is split by {called}, not {mine}: {how}."
        texts = [n for n in names if n not in (*NOT_TEXT, "")]
        if len(texts) == 2:  # sentence1 and sentence2, query and passage
            first, second = as_pair(*texts)
            return (
                f'Name the column that holds the text "text" in the first line; where '
                f'"{first}" and "{second}" are a pair a model reads together, name "{first}" '
                f'"text" and "{second}" "text_pair" (in that order: the text the model reads '
                "first, a query before its passage)."
            )
        return 'Name the column that holds the text "text" in the first line.'

    def _miscount(self, fields: list[str]) -> str:
        n = len(fields)
        said = f"{n} field{'s' * (n != 1)}, but the header has {len(self.header)}"
        if any("\n" in field for field in fields):  # the record ran on past its line
            return f"{said}: is a quote opened here and never closed?"
        sep = "tab" if self.kind == "tsv" else "comma"
        if n > len(self.header) and not any(f.strip() for f in fields[len(self.header) :]):
            return f"{said}, the extra ones empty: remove the {sep}s at the line's end"
        return f"{said}: quote a field that holds a {sep}"

    def _row(self, fields: list[str]) -> dict[str, Any]:
        row: dict[str, Any] = dict(zip(self.header, fields, strict=True))
        if "label" in row:
            row["label"] = _cell_label(row["label"])
        if row.get("text_pair") == "":  # as an empty label cell is no label
            row["text_pair"] = None
        return row


def _read(reader: Iterator[list[str]], lines: _Records, where: str) -> Iterator[list[str]]:
    """csv.reader's records, each marked returned; its error (a field past csv's size limit,
    as after a quote never closed) is a DataError naming the line the record began on."""
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field limit" in str(e):
                why = (
                    f"a field longer than {csv.field_size_limit()} characters, the csv "
                    "module's limit: a quote opened and never closed reads the rest of the "
                    "file as one field; a text that long is cut to the model's longest "
                    "sequence anyway, so shorten it (or write the texts as JSONL)"
                )
            elif "expected after" in str(e):  # strict: "',' expected after '\"'"
                why = (
                    f"a field that begins with a quote goes on after its closing quote "
                    f"({e}). A field in quotes ends at the next lone quote: quote the whole "
                    'field and double the quotes inside it ("He said ""hi"""), as '
                    "spreadsheets and pandas save them"
                )
            elif "unexpected end of data" in str(e):
                why = "a quote opened there never closes: close it, or double it if it is text"
            else:
                why = f"{e}; is a quote opened and never closed?"
            at = lines.start[0]
            upto = f" (the record runs on to line {lines.lineno})" if lines.lineno > at else ""
            raise DataError(f"{where}: line {at}{upto}: {why}") from None
        yield fields
        lines.returned()


def text_file(path: Path) -> TextFile:
    """The format of ``path``, by its suffix (one of ``SUFFIXES``)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return Delimited(suffix[1:])
    return PlainLines() if suffix == ".txt" else JsonLines()


SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".txt")
KINDS = ("jsonl", "csv", "tsv", "txt")  # each format's kind: a data source read from text


def _lines(f: BinaryIO, where: str) -> Iterator[tuple[int, int, bytes]]:
    """Each non-blank line of ``f`` (bytes), with its 1-based number and byte offset; the
    first is checked to be a line of UTF-8 text (``_check_first_line``)."""
    pos, first = 0, True
    for lineno, line in enumerate(f, 1):
        start, pos = pos, pos + len(line)
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"{where}: line {lineno} is {len(line) / 2**20:.1f} MiB long; quantgate reads "
                f"lines of at most {MAX_LINE_BYTES >> 20} MiB. A text is cut to the model's "
                "longest sequence (a question answerer's context is read in windows of it): "
                "shorten it, or split it into rows"
            )
        if line.removeprefix(codecs.BOM_UTF8).strip():  # a mark alone is a blank line too
            if first:
                _check_first_line(line, lineno, where)
                first = False
            yield lineno, start, line


class _Records:
    """The lines of a binary file, decoded with their line breaks, for csv.reader (which
    takes one line at a time, and only as many as its next record needs). ``start`` is the
    number and offset of the line the last record began on; the caller says when a record
    was returned (``returned``)."""

    def __init__(self, f: BinaryIO, where: str, offset: int = 0):
        self._f, self._where = f, where
        self.lineno, self._pos = 0, offset  # the number of the line read last
        self._begins = True  # the next line taken begins a record
        self.start = (0, offset)

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> str:
        line = self._f.readline()
        if not line:
            raise StopIteration
        self.lineno += 1
        if self._begins:
            self.start, self._begins = (self.lineno, self._pos), False
        start, self._pos = self._pos, self._pos + len(line)
        if start == 0:
            _check_first_line(line, 1, self._where)
        try:
            return _decode(line, start, keep_break=True)
        except UnicodeDecodeError as e:
            raise DataError(f"{self._where}: line {self.lineno}: {_not_utf8(e)}") from None

    def returned(self) -> None:
        self._begins = True


def _decode(line: bytes, offset: int, keep_break: bool = False) -> str:
    """A line as text, without its line break unless kept (and without a byte-order mark at
    offset 0)."""
    if offset == 0:
        line = line.removeprefix(codecs.BOM_UTF8)
    text = line.decode("utf-8")
    return text if keep_break else text.rstrip("\r\n")


def _cell_label(cell: str) -> int | str | None:
    """A CSV/TSV label cell: a whole number is a class index (1.0 too, as pandas writes the
    integers of a column with gaps), empty is no label, any other text a class name (as
    written but for the spaces around it, as `text, label` by hand puts them: names are
    matched exactly)."""
    if not cell.strip():
        return None
    index = cell_index(cell)
    return cell.strip() if index is None else index


# A compressed file's first bytes, and how to decompress it (its NUL bytes were said to be
# UTF-16's, whatever the file's name)
_COMPRESSED = (
    (b"\x1f\x8b", "gzip-compressed", "gunzip -c FILE > OUT"),
    (b"PK\x03\x04", "a zip archive (a .npz of arrays is one: name it .npz)", "unzip FILE"),
    (b"\xfd7zXZ\x00", "xz-compressed", "unxz -k FILE"),
    (b"(\xb5/\xfd", "zstd-compressed", "unzstd FILE"),
    (b"BZh", "bzip2-compressed", "bunzip2 -k FILE"),
)


def _check_first_line(line: bytes, lineno: int, where: str) -> None:
    """DataError for a file its first line of text shows is no UTF-8 text in lines: every
    row would be bad (or all one row), none saying why. A compressed file or a zip archive,
    whatever its name says; UTF-16 with its byte-order mark, or without (NUL bytes: read as
    UTF-8, its ASCII passes and its other characters come out as other tokens); line breaks
    that are carriage returns alone (old Macs', Excel's "CSV (Macintosh)"), which make the
    file one line."""
    for magic, kind, how in _COMPRESSED if lineno == 1 else ():
        if line.startswith(magic) and (magic != b"BZh" or line[3:4].isdigit()):
            raise DataError(
                f"{where}: expected UTF-8 text, found a file that is {kind}. Decompress it "
                f"first ({how}) and give the text."
            )
    if line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{where}: expected UTF-8 text, found UTF-16 (line {lineno} starts with its "
            "byte-order mark). Save the file as UTF-8."
        )
    if b"\0" in line:
        raise DataError(
            f"{where}: expected UTF-8 text, found NUL bytes on line {lineno} (UTF-16 without "
            "a byte-order mark?). Save the file as UTF-8."
        )
    if b"\r" in line.rstrip(b"\r\n"):
        raise DataError(
            f"{where}: line {lineno} holds carriage returns (\\r) not followed by a line feed: "
            'line breaks written as old Macs and Excel\'s "CSV (Macintosh)" write them, which '
            "make the file one line. Convert them: tr '\\r' '\\n' < IN > OUT"
        )


def _check_json_lines(line: bytes, value: Any, lineno: int, where: str) -> None:
    """DataError for a file that is JSON, but not JSON Lines (its first line of text, read
    as ``value``, tells): an array, objects spread over lines, or the rows in a list under
    a key."""
    if line.removeprefix(codecs.BOM_UTF8).strip() == b"{":
        raise DataError(
            f"{where}: expected JSON Lines, one object per line; found an object spread over "
            f"lines (line {lineno} is '{{' alone). Write one object per line, for example "
            "with: jq -c . IN.json > OUT.jsonl"
        )
    if isinstance(value, dict) and "text" not in value:
        for key, rows in value.items():
            if (
                isinstance(rows, list)
                and rows
                and all(isinstance(r, dict) and "text" in r for r in rows[:10])
            ):
                raise DataError(
                    f"{where}: expected JSON Lines, one object per line; found the rows in "
                    f"the list under {json.dumps(key)} (line {lineno}). Write them one per "
                    f"line, for example with: jq -c '.[{json.dumps(key)}][]' IN.json > OUT.jsonl"
                )
    if line.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        raise DataError(
            f'{where}: expected JSON Lines, one {{"text": ...}} object per line; found a '
            f"JSON array (line {lineno} starts with '['). Write one object per line, for "
            "example with: jq -c '.[]' IN.json > OUT.jsonl"
        )


def _parse_json(line: bytes) -> tuple[Any, str | None]:
    """A JSONL line's value (``UNREADABLE`` where it is not UTF-8 JSON, or an object names a
    key twice), and why, if so."""
    try:
        return json.loads(line, object_pairs_hook=unique_keys), None
    except UnicodeDecodeError as e:
        return UNREADABLE, _not_utf8(e)
    except RepeatedKeys as e:  # JSON would keep the last value: a "text" given twice lost it
        return (
            UNREADABLE,
            f'the key "{e.keys[0][:40]}" comes twice in one object; give each key once',
        )
    except ValueError as e:
        return UNREADABLE, f"not JSON ({e})"


def _not_utf8(e: UnicodeDecodeError) -> str:
    return (
        f"not UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); save the file "
        "as UTF-8"
    )


__all__ = [
    "SUFFIXES",
    "UNREADABLE",
    "Delimited",
    "JsonLines",
    "PlainLines",
    "TextFile",
    "Words",
    "text_file",
]
