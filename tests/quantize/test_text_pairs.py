"""Text pairs: a cross-encoder's query and passage, tokenized as one sequence with the
second text of token type 1, from JSONL, CSV and Python, as transformers' tokenizer(text,
text_pair) gives them."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import english, minilm_info  # noqa: E402

from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import open_source  # noqa: E402
from quantgate.quantize.text import tokenize  # noqa: E402


def _pairs(n: int) -> tuple[list[str], list[str]]:
    """n short queries and n passages: real English, the passages longer."""
    texts = english(2 * n)
    return [" ".join(t.split()[:4]) for t in texts[:n]], texts[n:]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _stacked(source) -> dict[str, list[list[int]]]:
    """Every batch's rows, unpadded by the attention mask, by input name."""
    rows: dict[str, list[list[int]]] = {}
    for b in source.batches():
        mask = b.feeds["attention_mask"].astype(bool)
        for name, a in b.feeds.items():
            rows.setdefault(name, []).extend(r[m].tolist() for r, m in zip(a, mask, strict=True))
    return rows


def _transformers(texts, pairs, limit):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_info().tokenizer)
    enc = tok(texts, pairs, truncation=True, max_length=limit)
    return {k: [list(r) for r in enc[k]] for k in ("input_ids", "token_type_ids")}


def test_jsonl_and_csv_pairs_are_tokenized_as_transformers_tokenizes_pairs(tmp_path):
    """Each row's text and text_pair as one sequence: [CLS] query [SEP] passage [SEP], the
    passage of token type 1; cut where too long by the longer text first. CSV reads as the
    same rows as JSONL, and the source says it holds pairs."""
    info = minilm_info("sequence-classification")
    queries, passages = _pairs(40)
    passages[5] = " ".join([passages[5]] * 12)  # past the model's 128 tokens: cut
    labels = [i % 2 for i in range(40)]
    rows = [
        {"text": q, "text_pair": p, "label": y}
        for q, p, y in zip(queries, passages, labels, strict=True)
    ]
    jsonl = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text", "text_pair"])  # columns in any order
        w.writerows([y, q, p] for q, p, y in zip(queries, passages, labels, strict=True))

    want = _transformers(queries, passages, 128)
    assert all(1 in types for types in want["token_type_ids"])
    longer = sum(len(r) > 128 for r in _transformers(queries, passages, None)["input_ids"])
    for path in (jsonl, tmp_path / "pairs.csv"):
        source = open_source(path, info, role="evaluation", batch_size=8)
        assert f"{path.name}: 40 of 40 text pairs (" in source.description
        assert source.cut == longer >= 1 and source.has_labels
        got = _stacked(source)  # in the source's order, not the file's
        labels_read = np.concatenate([b.labels for b in source.batches()]).tolist()
        read = zip(got["input_ids"], got["token_type_ids"], labels_read, strict=True)
        tokenized = zip(want["input_ids"], want["token_type_ids"], labels, strict=True)
        assert sorted(read) == sorted(tokenized)


def test_pairs_on_some_rows_only_are_refused_naming_the_fewer(tmp_path):
    """A pair file missing a text_pair on a row (a lost cell, a dropped key) would read that
    row as one text, which a cross-encoder never sees served: refused, naming the rows unlike
    the others."""
    info = minilm_info()
    queries, passages = _pairs(12)
    rows = [{"text": q, "text_pair": p} for q, p in zip(queries, passages, strict=True)]
    del rows[4]["text_pair"]
    rows[7]["text_pair"] = None
    with pytest.raises(DataError) as e:
        open_source(_write_jsonl(tmp_path / "p.jsonl", rows), info, role="calibration")
    said = str(e.value)
    assert 'line 5: has no "text_pair", though 10 of 12 rows have one' in said, said
    assert "line 8:" in said and "pairs on every row or on none" in said
    assert "line 1:" not in said


def test_a_blank_text_pair_is_refused_and_an_empty_pair_column_is_warned_about(tmp_path, caplog):
    info = minilm_info()
    queries, passages = _pairs(4)
    rows = [{"text": q, "text_pair": p} for q, p in zip(queries, passages, strict=True)]
    rows[2]["text_pair"] = "   "
    with pytest.raises(DataError, match=r'line 3: no non-blank string "text_pair"'):
        open_source(_write_jsonl(tmp_path / "p.jsonl", rows), info, role="calibration")
    # a CSV's text_pair column left empty: each row is one text, said once
    path = tmp_path / "p.csv"
    path.write_text("text,text_pair\n" + "".join(f"{q},\n" for q in queries), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        source = open_source(path, info, role="calibration")
    assert "4 of 4 texts (" in source.description
    assert '"text_pair" is empty wherever it is given, so each row is read as one text' in (
        caplog.text
    )


def test_files_of_two_texts_under_other_names_are_told_to_name_them_text_and_text_pair(
    tmp_path,
):
    """GLUE's sentence1/sentence2, a reranker's query/passage: the command that renames them,
    the first text first whatever order the file has them in (a reranker fed (passage,
    query) reads them the wrong way round)."""
    info = minilm_info("sequence-classification")
    rows = [{"sentence1": "a b", "sentence2": "c d", "label": 1}] * 3
    with pytest.raises(DataError) as e:
        open_source(_write_jsonl(tmp_path / "glue.jsonl", rows), info, role="evaluation")
    assert "jq -c '{text: .sentence1, text_pair: .sentence2, label}'" in str(e.value)
    rows = [{"passage": "a b", "query": "c d", "label": 1}] * 3
    with pytest.raises(DataError) as e:
        open_source(_write_jsonl(tmp_path / "msmarco.jsonl", rows), info, role="evaluation")
    assert "jq -c '{text: .query, text_pair: .passage, label}'" in str(e.value)
    assert '"text" is the one the model reads first' in str(e.value)
    path = tmp_path / "glue.csv"
    path.write_text("passage,query,label\na,b,1\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        open_source(path, info, role="evaluation")
    assert 'name "query" "text" and "passage" "text_pair" (in that order' in str(e.value)


def test_a_pair_under_another_name_is_warned_about_labelled_or_not(tmp_path, caplog):
    """A "passage" or a "Text_Pair" column beside "text" was read as nothing, without a
    word where the rows had labels: the reranker calibrated and gated on queries alone."""
    info = minilm_info("sequence-classification")
    queries, passages = _pairs(4)
    for key in ("passage", "Text_Pair"):
        rows = [{"text": q, key: p, "label": 1} for q, p in zip(queries, passages, strict=True)]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            open_source(_write_jsonl(tmp_path / f"{key}.jsonl", rows), info, role="evaluation")
        assert f'no row has a "text_pair", so each row is read as one text; key "{key}" is not' in (
            caplog.text
        )


def test_calibration_and_evaluation_text_of_other_forms_are_refused(tmp_path):
    """Pairs calibrated, single texts gated (or the reverse): the gates would judge inputs
    the model is never served."""
    from quantgate.quantize.data import check_same_texts

    info = minilm_info()
    queries, passages = _pairs(4)
    pairs = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"text": q, "text_pair": p} for q, p in zip(queries, passages, strict=True)],
    )
    singles = _write_jsonl(tmp_path / "s.jsonl", [{"text": q} for q in queries])
    cal = open_source(pairs, info, role="calibration")
    ev = open_source(singles, info, role="evaluation")
    assert cal.record()["text_pairs"] is True and "text_pairs" not in ev.record()
    with pytest.raises(DataError, match=r"single texts, but --calibration p.jsonl held text pairs"):
        check_same_texts(ev, cal, "--eval s.jsonl", "--calibration p.jsonl")
    with pytest.raises(DataError, match="text pairs .* but the bundle's calibration held single"):
        check_same_texts(cal, {"kind": "jsonl"}, "--eval p.jsonl", "the bundle's calibration")
    with pytest.raises(DataError, match='exported before quantgate read "text_pair"'):
        check_same_texts(cal, {"kind": "jsonl"}, "--eval p.jsonl", "an older bundle's")
    check_same_texts(cal, {"kind": "npz"}, "--eval p.jsonl", "arrays say no form")
    check_same_texts(cal, cal.record(), "--eval p.jsonl", "the same form")


def test_pairs_from_python_are_one_batch_and_mixed_or_malformed_rows_are_refused():
    info = minilm_info()
    queries, passages = _pairs(3)
    feeds = tokenize(list(zip(queries, passages, strict=True)), info)
    want = _transformers(queries, passages, 128)
    mask = feeds["attention_mask"].astype(bool)
    assert [r[m].tolist() for r, m in zip(feeds["input_ids"], mask, strict=True)] == (
        want["input_ids"]
    )
    assert [r[m].tolist() for r, m in zip(feeds["token_type_ids"], mask, strict=True)] == (
        want["token_type_ids"]
    )
    as_lists = tokenize([[q, p] for q, p in zip(queries, passages, strict=True)], info)
    assert all(np.array_equal(as_lists[k], feeds[k]) for k in feeds)  # JSON's pairs: lists
    refusals = (
        ([queries[0], (queries[1], passages[1])], "text 1 is one text and text 2 is a pair"),
        ([("a", "b", "c")], "expected a string or a pair (text, text_pair), found a tuple of 3"),
        ([("a", "")], "text 1 of 1, its text_pair is blank"),
        ([("", "a")], "text 1 of 1, its text is blank"),
        ([("a", 5)], "text 1 of 1, its text_pair: expected a string, found int"),
        (("a question", "its passage"), "for one pair, give [(text, text_pair)]"),
    )
    for texts, said in refusals:
        with pytest.raises(DataError) as e:
            tokenize(texts, info)
        assert said in str(e.value)


def test_a_text_given_as_a_list_of_two_is_told_of_text_pair(tmp_path):
    with pytest.raises(DataError, match='put the first in "text" and the second in "text_pair"'):
        open_source(
            _write_jsonl(tmp_path / "l.jsonl", [{"text": ["q", "p"]}]),
            minilm_info(),
            role="calibration",
        )


def test_what_is_cut_is_said_as_the_tokenizer_cuts_left_or_right(tmp_path, caplog):
    """A tokenizer that cuts on the left keeps a text's last tokens: the warning said the
    first were kept (and a pair's longer text its first)."""
    from transformers import AutoTokenizer

    from quantgate.quantize.text import tokenize as tokenize_with
    from quantgate.tokenizer import Transformers

    info = minilm_info()
    hf = AutoTokenizer.from_pretrained(info.tokenizer, truncation_side="left")
    long = " ".join(f"w{i}" for i in range(200))
    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.text"):
        feeds = tokenize_with([long, "short"], info, Transformers(hf, 0))
        tokenize_with([("q", long)], info, Transformers(hf, 0))
    ids = feeds["input_ids"][0]
    kept = hf.decode(ids, skip_special_tokens=True)
    assert kept.endswith("w199") and "w0 " not in kept  # the last tokens kept
    assert "so the first" in caplog.records[0].getMessage(), caplog.text
    assert "the longer text's first tokens first" in caplog.records[1].getMessage()


def test_both_tokenizers_read_pairs_alike_and_spell_each_token_from_its_own_text():
    """transformers' tokenizer and tokenizer.json alone (``Backend``) give a pair the same
    arrays, cut or not, and each token of the second text is read from the second text."""
    from transformers import AutoTokenizer

    from quantgate.tokenizer import PAIR_PROBES, Backend, Settings, Transformers

    directory = minilm_info().tokenizer
    hf = AutoTokenizer.from_pretrained(directory)
    a, b = Transformers(hf, 0), Backend.load(directory, Settings.of(hf), 0)
    for limit in (None, 8, 64):
        x, y = a.encode(list(PAIR_PROBES), limit), b.encode(list(PAIR_PROBES), limit)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    pair = [("Zoë asks", "where is Zürich?")]
    read = ["[CLS]", "Zoë", "asks", "[SEP]", "where", "is", "Zürich", "?", "[SEP]"]
    assert a.pieces(pair, None) == [read] and b.pieces(pair, None) == [read]


def test_a_slow_tokenizers_line_per_cut_pair_is_dropped_from_quantgates_calls_only():
    """transformers' Python tokenizers log "Be aware, overflowing tokens are not returned"
    for each pair they cut: dozens of lines an export. Dropped while quantgate tokenizes,
    kept for a program's own calls."""
    try:
        from transformers import BertTokenizerLegacy as Slow  # transformers 5's Python one
    except ImportError:
        from transformers import BertTokenizer as Slow  # 4.x's

    from quantgate.tokenizer import Transformers

    slow = Slow(str(Path(minilm_info().tokenizer) / "vocab.txt"))
    assert not slow.is_fast
    said: list[str] = []
    keep = logging.Handler()
    keep.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(f"transformers.{m}") for m in ("tokenization_utils_base",
                                                                 "tokenization_python")]  # fmt: skip
    for logger in loggers:
        logger.addHandler(keep)
    try:
        pairs = [("a b c d e f g h i j", "k l m n o p q r s t u v")]
        feeds = Transformers(slow, 0).encode(pairs, 8)
        assert feeds["input_ids"].shape == (1, 8)
        assert not [s for s in said if "overflowing tokens" in s]
        slow(pairs, truncation=True, max_length=8)  # the program's own call
        assert [s for s in said if "overflowing tokens" in s]
    finally:
        for logger in loggers:
            logger.removeHandler(keep)


def test_pairs_left_out_of_the_evaluation_are_not_counted_as_gated(tmp_path):
    """A question answerer's pairs are read in windows, a row each: rows left out (they are
    calibration rows) left the count of pairs as it was, so 29 pairs passed the 30 the span
    gate needs, and the manifest recorded 32."""
    from dataclasses import replace

    from quantgate.quantize.gates import check_eval_rows
    from quantgate.quantize.heldout import check_held_out, distinct_rows

    info = replace(minilm_info("question-answering"), max_seq_len=64)
    s = english(400)

    def write(path, pairs):
        path.write_text("".join(json.dumps({"text": q, "text_pair": c}) + "\n" for q, c in pairs))
        return path

    short = [(s[i], s[i + 1]) for i in range(0, 60, 2)]  # 30 pairs of one window each
    long_ = [(s[i], " ".join(s[i + 1 : i + 8])) for i in range(100, 332, 8)]  # 29, in windows
    cal = open_source(write(tmp_path / "cal.jsonl", short), info, role="calibration")
    ev = open_source(write(tmp_path / "ev.jsonl", long_ + short[:3]), info, role="evaluation")
    assert ev.pairs == 32
    ev = check_held_out(distinct_rows(ev, info, where="ev"), cal.fingerprint(), model=info,
                        where="ev", calibrated_on="cal")  # fmt: skip
    left = {int(p) for b in ev.batches() for p in b.windows[:, 0]}
    assert ev.pairs == len(left) == 29 and ev.record()["pairs"] == 29
    with pytest.raises(DataError, match="29 question/context pair"):
        check_eval_rows(ev, "question-answering", ("start_logits", "end_logits"), None, where="ev")
