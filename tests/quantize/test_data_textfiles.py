"""Text in CSV, TSV and plain lines: the same rows as JSONL, and bad files told apart."""

from __future__ import annotations

import bz2
import csv
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import english, minilm_info, write_jsonl  # noqa: E402

from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import open_source  # noqa: E402


def read(source) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    batches = list(source.batches())
    return [b.feeds["input_ids"] for b in batches], [b.labels for b in batches]


def write_csv(path: Path, rows, delimiter=",", header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_tsv_and_text_lines_read_as_the_same_jsonl(tmp_path):
    """One set of texts in every format: the same token ids, labels, row hashes and picks
    under a cap; CSV keeps commas, doubled quotes and a line break inside a quoted field,
    and a row after it is found again by its offset."""
    info = minilm_info("sequence-classification")
    texts = [t.replace("\t", " ") for t in english(40)]
    texts[3] = 'He said "stop", then, after a pause, "go".'
    labels = [i % 2 for i in range(40)]
    jsonl = write_jsonl(tmp_path / "t.jsonl", texts, labels=labels)
    tsv = write_csv(tmp_path / "t.tsv", zip(texts, labels, strict=True), delimiter="\t")
    txt = tmp_path / "t.txt"
    txt.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    broken = [*texts[:5], "a line\nbroken inside its quotes", *texts[5:]]
    with_break = write_jsonl(tmp_path / "b.jsonl", broken, labels=[0] * 5 + [1] + labels[5:])
    csv_file = write_csv(tmp_path / "b.csv", zip(broken, [0] * 5 + [1] + labels[5:], strict=True))

    want = open_source(jsonl, info, role="evaluation", batch_size=8)
    for path, kind in ((tsv, "tsv"), (txt, "txt")):
        got = open_source(path, info, role="evaluation", batch_size=8)
        assert got.kind == kind and got.samples == 40
        ids, got_labels = read(got)
        want_ids, want_labels = read(want)
        assert all(np.array_equal(a, b) for a, b in zip(ids, want_ids, strict=True))
        assert np.array_equal(got.row_hashes, want.row_hashes)
        if kind == "txt":
            assert not got.has_labels and got_labels == [None] * len(ids)
        else:
            assert all(np.array_equal(a, b) for a, b in zip(got_labels, want_labels, strict=True))
    for samples in (None, 7):
        want = open_source(with_break, info, role="evaluation", samples=samples, batch_size=4)
        got = open_source(csv_file, info, role="evaluation", samples=samples, batch_size=4)
        assert got.kind == "csv" and got.samples == want.samples
        assert np.array_equal(got.row_hashes, want.row_hashes)
        for a, b in zip(read(got)[0] + read(got)[1], read(want)[0] + read(want)[1], strict=True):
            assert np.array_equal(a, b)
    assert "7 of 41 texts (CSV, model tokenizer" in got.description


def test_csv_labels_are_indices_names_or_nothing(tmp_path, caplog):
    info = minilm_info("sequence-classification")  # no class names: indices only
    path = write_csv(
        tmp_path / "l.csv", [("a text", " 1 "), ("another", "0"), ("third", "+1"), ("4th", "1.0")]
    )  # 1.0: pandas writes the integers of a column with gaps so
    (batch,) = open_source(path, info, role="evaluation").batches()
    assert sorted(batch.labels.tolist()) == [0, 1, 1, 1]
    write_csv(path, [("a text", "1"), ("another", "positive"), ("third", "1.5")])
    with pytest.raises(DataError) as e:
        open_source(path, info, role="evaluation")
    assert 'line 3: label "positive" is a string' in str(e.value)
    assert 'line 4: label "1.5" is a string' in str(e.value)
    write_csv(path, [("a text", ""), ("another", "")], header=("text", "label"))
    with caplog.at_level(logging.WARNING):
        src = open_source(path, info, role="evaluation")
    assert not src.has_labels and '"label" is empty in every row' in caplog.text
    caplog.clear()
    write_csv(path, [("a text", "1"), ("another", "0")], header=("text", "sentiment"))
    with caplog.at_level(logging.WARNING):
        open_source(path, info, role="evaluation")
    assert 'columns "sentiment" are not read' in caplog.text


CSV_REFUSED = {
    "no text column": (b"sentence,label\nhello,1\n",
                       'expected a header row naming a "text" column .* found "sentence", "label"'),
    "empty": (b"", 'found an empty file'),
    "a capital Text": (b"Text,Label\nhello,1\n",
                       'found "Text", "Label". Column names are read as written: write "Text"'),
    "semicolons": (b"text;label\nhello;1\n", "split by semicolons, not commas: write commas"),
    "tabs in a .csv": (b"text\tlabel\nhello\t1\n", r"split by tabs, not commas: name the file \*\.tsv"),
    "header only": (b"text,label\r\n", "found a header and no rows"),
    "a column twice": (b"text,label,text\na,1,b\n", 'names the column "text" twice'),
    "a blank text": (b'text,label\n" ",1\n', 'line 2: no non-blank string "text"'),
    "a field past csv's limit": (b'text\n"' + b"x" * 140_000 + b'"\n',
                                 "line 2: a field longer than 131072 characters"),
    "a comma unquoted": (b"text,label\nfine,1\nhello, world,1\n",
                         "line 3: 3 fields, but the header has 2: quote a field that holds a comma"),
    "a comma at each line's end": (b"text,label\nfine,1,\ngood,0,\n",
                                   "line 2: 3 fields, but the header has 2, the extra ones empty: "
                                   "remove the commas at the line's end"),
    "bzip2 under .csv": (bz2.compress(b"text\nhello\n"), "bzip2-compressed. Decompress it first"),
    "a quote never closed": (b'text,label\nfine,1\n"open,1\nnext,0\nlast,1\n',
                             r"line 3 \(the record runs on to line 5\): a quote opened there never closes"),
    "latin-1": ("text\ncafé\n".encode("latin-1"), "line 2: not UTF-8 .byte 0xe9"),
    "utf-16": ("text\nhello\n".encode("utf-16"), "expected UTF-8 text, found UTF-16"),
    "utf-16 without its mark": ("text\nhello\n".encode("utf-16-le"),
                                "found NUL bytes on line 1 .UTF-16 without a byte-order mark"),
    # a stray quote ran the field on over the next line: one row of two, its label lost
    "a stray quote": (b'text,label\nfine,1\n"Wow a film,1\nmeh" overall,0\nlast,1\n',
                      r"line 3 \(the record runs on to line 4\): a field that begins with a "
                      "quote goes on after its closing quote"),
    "a quoted word first": (b'text,label\n"Wow" he said,1\n',
                            'line 2: a field that begins with a quote goes on after'),
    "carriage returns alone": (b"text,label\rfine,1\rgood,0\r",
                               r"line 1 holds carriage returns .* tr '\\r' '\\n'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CSV_REFUSED))
def test_a_bad_csv_is_refused_with_its_line(tmp_path, case):
    data, expected = CSV_REFUSED[case]
    (tmp_path / "d.csv").write_bytes(data)
    with pytest.raises(DataError, match=expected):
        open_source(tmp_path / "d.csv", minilm_info("sequence-classification"), role="evaluation")


def test_csv_with_a_bom_crlf_and_blank_lines_reads_as_written(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(
        b'\xef\xbb\xbftext,label,,,note,note\r\n"first, line",0,,,a,b\r\n\r\n \r\n'
        b"second,1,,,c,d\r\n"
    )  # Excel's blank header cells, columns not read named alike: no matter
    src = open_source(path, minilm_info("sequence-classification"), role="evaluation")
    (batch,) = src.batches()
    assert src.samples == 2 and sorted(batch.labels.tolist()) == [0, 1]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_a_byte_order_mark_on_a_blank_first_line_is_a_blank_line(tmp_path, suffix):
    rows = {".csv": b"text\nhello\nworld\n", ".txt": b"hello\nworld\n"}
    rows[".jsonl"] = b'{"text": "hello"}\n{"text": "world"}\n'
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf\r\n\n" + rows[suffix])
    src = open_source(path, minilm_info(), role="calibration")
    assert src.samples == 2


def test_text_lines_with_carriage_returns_alone_are_refused_not_read_as_one(tmp_path):
    """A .txt of old Mac line breaks was one calibration row, said only as too few rows."""
    path = tmp_path / "mac.txt"
    path.write_bytes(b"first text\rsecond text\rthird text\r")
    with pytest.raises(DataError, match=r"line 1 holds carriage returns"):
        open_source(path, minilm_info(), role="calibration")


def test_json_that_is_no_json_lines_is_told_how_to_become_it(tmp_path):
    """Objects pretty-printed over lines got ten lines of "not JSON"; rows in a list under a
    key got the advice to rename a key."""
    info = minilm_info()
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "text": "a cat"\n}\n{\n  "text": "a dog"\n}\n')
    with pytest.raises(DataError, match=r"an object spread over lines .*jq -c \. IN.json"):
        open_source(pretty, info, role="calibration")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"version": 1, "data": [{"text": "a cat"}, {"text": "a dog"}]}\n')
    with pytest.raises(DataError, match=r"""the list under "data" .*jq -c '\.\["data"\]\[\]'"""):
        open_source(wrapped, info, role="calibration")


def test_label_cells_are_read_without_the_spaces_around_them(tmp_path):
    """`text, label` written by hand: " negative" was no class name, refused on every line."""
    import dataclasses

    info = dataclasses.replace(
        minilm_info("sequence-classification"), labels=("negative", "positive")
    )
    path = tmp_path / "hand.csv"
    path.write_text(
        'label, text\npositive, good film\nnegative , bad film\npositive, "a, quoted text"\n'
    )  # the quote after ", " opens its field
    (batch,) = open_source(path, info, role="evaluation").batches()
    assert sorted(batch.labels.tolist()) == [0, 1, 1]


def test_number_cells_are_refused_where_class_names_are_other_numbers(tmp_path):
    """Star ratings: class names "1".."5" for classes 0..4. JSONL tells 1 from "1"; a CSV cell
    cannot, and read as indices "1", "3", "4" were classes 1, 3, 4 where the names mean 0, 2,
    3: refused, saying how to write them."""
    import dataclasses

    stars = dataclasses.replace(
        minilm_info("sequence-classification"), labels=("1", "2", "3", "4", "5")
    )
    path = write_csv(tmp_path / "s.csv", [("bad", "1"), ("fine", "3"), ("good", "4")])
    with pytest.raises(DataError) as e:
        open_source(path, stars, role="evaluation")
    assert "labels such as 1 on line 2: the model's class names are numbers" in str(e.value)
    assert '"label": "1" for the name, "label": 1 for the index' in str(e.value)
    five = write_csv(tmp_path / "5.csv", [("bad", "1"), ("great", "5")])  # 5: no such index
    with pytest.raises(DataError, match="the model's class names are numbers") as e:
        open_source(five, stars, role="evaluation")  # was: renumber them from 0 (refused too)
    assert "1-based" not in str(e.value)
    names = write_csv(tmp_path / "n.csv", [("bad", "one star")])  # not a number: a name
    with pytest.raises(DataError, match='label "one star" is not one of the model'):
        open_source(names, stars, role="evaluation")
    decimals = dataclasses.replace(stars, labels=("0.0", "0.5", "1.0"))  # "1.0" reads as 1
    with pytest.raises(DataError, match="A cell 1.0 could mean class 2 .the name. or class 1"):
        open_source(write_csv(tmp_path / "d.csv", [("a", "0")]), decimals, role="evaluation")
    arabic = dataclasses.replace(stars, labels=("١", "٢", "٣"))  # no ASCII digits: names
    (batch,) = open_source(
        write_csv(tmp_path / "a.csv", [("a", "٣"), ("b", "١")]), arabic, role="evaluation"
    ).batches()
    assert sorted(batch.labels.tolist()) == [0, 2]
    plain = dataclasses.replace(stars, labels=("neg", "pos"))  # names that are no numbers
    (batch,) = open_source(
        write_csv(tmp_path / "p.csv", [("a", "1"), ("b", "pos")]), plain, role="evaluation"
    ).batches()
    assert sorted(batch.labels.tolist()) == [1, 1]


def test_tsv_is_read_as_pandas_writes_it_and_text_lines_take_no_labels(tmp_path):
    """A TSV field with a tab, or starting with a quote, is quoted and its quotes doubled
    (pandas' to_csv, csv.writer): read back as the text it was."""
    info = minilm_info("sequence-classification")
    texts = ['"quoted" words', "a\ttab inside", "plain"]
    tsv = write_csv(tmp_path / "q.tsv", zip(texts, [1, 0, 1], strict=True), delimiter="\t")
    assert tsv.read_text().splitlines()[1] == '"""quoted"" words"\t1'
    quoted = write_jsonl(tmp_path / "q.jsonl", texts, labels=[1, 0, 1])
    assert np.array_equal(
        open_source(tsv, info, role="evaluation").row_hashes,
        open_source(quoted, info, role="evaluation").row_hashes,
    )
    txt = tmp_path / "bad.txt"
    txt.write_bytes("fine\n\n  \ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        open_source(txt, info, role="calibration")
    assert "expected one non-blank text per line:\n  - line 4: not UTF-8" in str(e.value)
    assert "label" not in str(e.value)


def test_a_jsonl_key_given_twice_is_refused_on_its_line(tmp_path):
    """JSON keeps a repeated key's last value: every line {"text": SENTENCE, "text": "x"}
    calibrated on "x", said only by failed gates."""
    rows = [f'{{"text": "{t}"}}' for t in english(3, source="pydoc")]
    rows[1] = '{"text": "a real sentence", "label": 0, "text": "x"}'
    path = tmp_path / "twice.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r'line 2: the key "text" comes twice in one object'):
        open_source(path, minilm_info(), role="calibration")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_line_of_megabytes_is_refused_before_it_is_tokenized(tmp_path, suffix):
    """One 50 MB line took 3 GB and minutes to tokenize, into 3 tokens, without a word."""
    long = "x" * (2 << 20)
    line = f'{{"text": "{long}"}}' if suffix == ".jsonl" else long
    path = tmp_path / f"long{suffix}"
    path.write_text(f"{line}\n" if suffix == ".txt" else f'{{"text": "short"}}\n{line}\n')
    where = 1 if suffix == ".txt" else 2
    with pytest.raises(DataError, match=rf"line {where} is 2\.0 MiB long; .* at most 1 MiB"):
        open_source(path, minilm_info(), role="calibration")


def test_a_text_of_invisible_characters_is_refused_as_blank_ones_are(tmp_path):
    """Zero-width spaces passed the non-blank check and made rows of no real token."""
    path = write_jsonl(tmp_path / "ws.jsonl", ["ok", " \u200b\u2060 "])
    with pytest.raises(DataError, match=r'line 2: "text" holds only spaces and invisible'):
        open_source(path, minilm_info(), role="calibration")
    # control characters and U+FFFD alone: BERT's tokenizer drops them, [CLS] [SEP] was left
    # (`quantgate infer` refuses such a text)
    path = write_jsonl(tmp_path / "cc.jsonl", ["ok", "\x07\x1b", "fine", "\ufffd"])
    with pytest.raises(DataError) as e:
        open_source(path, minilm_info(), role="calibration")
    assert 'line 2: its text makes no token ("\\u0007\\u001b")' in str(e.value)
    assert "line 4: its text makes no token" in str(e.value)


def test_a_tsv_cell_keeps_the_spaces_after_its_tab(tmp_path):
    """Indented code in a TSV lost its indent (csv's skipinitialspace): a byte-level BPE
    tokenizer reads spaces, so calibration saw other ids than `quantgate infer -t` sends.
    A CSV's spaces after a comma are still skipped (`text, label` by hand)."""
    from quantgate.quantize.textfiles import text_file

    tsv = tmp_path / "code.tsv"
    tsv.write_bytes(b"text\tlabel\n    def f():\t1\n")
    csv_file = tmp_path / "hand.csv"
    csv_file.write_bytes(b'text,label\nhello, 1\n  "a, b", 0\n')
    rows = {}
    for path in (tsv, csv_file):
        fmt = text_file(path)
        with open(path, "rb") as f:
            rows[path.suffix] = [row for _, _, row, problem in fmt.rows(f, str(path))]
    assert rows[".tsv"] == [{"text": "    def f():", "label": 1}]
    assert rows[".csv"] == [{"text": "hello", "label": 1}, {"text": "a, b", "label": 0}]
