"""Rows known by their tokens: evaluation rows that are calibration rows whatever the file's
bytes, texts cut at the model's longest sequence, a calibration set too small to calibrate."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import digits_info, english, minilm_info, rng_feeds, write_jsonl  # noqa: E402

from quantgate.bundle import sha256_file  # noqa: E402
from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import open_source, write_npz  # noqa: E402
from quantgate.quantize.heldout import Fingerprint, check_held_out  # noqa: E402
from quantgate.quantize.text import tokenize  # noqa: E402

DIGITS = digits_info()


def held_out(ev, cal, name="ev.jsonl", info=None):
    return check_held_out(
        ev,
        cal.fingerprint(),
        model=info or minilm_info(),
        where=f"--eval {name}",
        calibrated_on="--calibration cal.jsonl",
    )


def test_calibration_rows_shuffled_or_respaced_are_not_held_out(tmp_path, caplog):
    """The rows a calibration fitted the INT8 ranges to are refused as evaluation rows in any
    order and with any spacing: the file's bytes differ, the tokens do not."""
    info, texts = minilm_info(), english(700)
    cal_path = write_jsonl(tmp_path / "cal.jsonl", texts[:300])
    cal = open_source(cal_path, info, role="calibration")
    shuffled = random.Random(0).sample(texts[:300], 300)
    spaced = [f"{t} " for t in texts[:300]]
    for name, rows in (("shuffled", shuffled), ("spaced", spaced)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        assert sha256_file(path) != sha256_file(cal_path)
        with pytest.raises(DataError) as e:
            held_out(open_source(path, info, role="evaluation"), cal)
        assert "300 of 300 evaluation rows (100%) are also calibration rows" in str(e.value)

    mixed = write_jsonl(tmp_path / "mixed.jsonl", texts[:120] + texts[300:580])
    with pytest.raises(DataError) as e:
        held_out(open_source(mixed, info, role="evaluation"), cal)
    assert str(e.value).startswith(
        "--eval ev.jsonl: 120 of 400 evaluation rows (30%) are also calibration rows (the same "
        "token ids, whatever the order of the rows or their spacing) of --calibration cal.jsonl. "
        "The gates must measure rows the calibration did not see"
    )

    # A few shared rows (natural duplicates in two samples of one corpus): warned, and left
    # out of the gates (counted in, they narrowed the interval with rows the ranges fit)
    few = write_jsonl(tmp_path / "few.jsonl", texts[:5] + texts[600:695])
    with caplog.at_level("WARNING", logger="quantgate.quantize.heldout"):
        ev = held_out(open_source(few, info, role="evaluation"), cal)
    assert "5 of 100 evaluation rows (5%) are also calibration rows" in caplog.text
    assert "left out of the gates, which measure the other 95 rows" in caplog.text
    assert ev.in_calibration == 5 and ev.record()["in_calibration"] == 5
    assert ev.description.endswith("; 5 calibration rows left out")  # the report's data line
    gated = np.concatenate([b.feeds["input_ids"][:, 1] for b in ev.batches()])
    assert ev.samples == 95 == len(gated) and len(set(ev.row_hashes.tolist())) == 95
    assert not cal.fingerprint().shared(ev.row_hashes)[0]  # none of them calibration rows
    again = np.concatenate([b.feeds["input_ids"][:, 1] for b in ev.batches()])
    np.testing.assert_array_equal(again, gated)  # each pass, the same rows in the same order

    caplog.clear()
    apart = write_jsonl(tmp_path / "apart.jsonl", texts[300:700])
    with caplog.at_level("WARNING", logger="quantgate.quantize.heldout"):
        ev = held_out(open_source(apart, info, role="evaluation"), cal)
    assert ev.in_calibration == 0 and not caplog.records


def test_a_row_is_the_same_tokens_in_jsonl_npz_and_python(tmp_path):
    """JSONL text, its tokens saved as .npz (padded to another width, in another order) and
    a Python iterable of them are the same rows; other texts are not."""
    info, texts = minilm_info(), english(80)
    jsonl = open_source(write_jsonl(tmp_path / "t.jsonl", texts[:40]), info, role="calibration")
    feeds = tokenize(texts[:40], info)
    wide = {k: np.pad(v, ((0, 0), (0, 128 - v.shape[1])))[::-1] for k, v in feeds.items()}
    npz = open_source(write_npz(tmp_path / "t.npz", wide), info, role="calibration")
    items = open_source([feeds], info, role="calibration")
    assert len(set(jsonl.row_hashes.tolist())) == 40
    assert sorted(jsonl.row_hashes) == sorted(npz.row_hashes) == sorted(items.row_hashes)
    other = open_source(write_jsonl(tmp_path / "o.jsonl", texts[40:]), info, role="evaluation")
    assert not set(other.row_hashes.tolist()) & set(jsonl.row_hashes.tolist())
    # The built-in digits: the calibration and test splits share no image.
    digits = open_source(None, DIGITS, role="calibration")
    test = open_source(None, DIGITS, role="evaluation")
    assert digits.fingerprint().shared(test.row_hashes) == (0, 360)


def test_a_manifest_keeps_a_few_kb_of_row_hashes_and_a_regate_estimates_from_them(tmp_path):
    """5000 calibration rows: the manifest keeps the 4096 smallest hashes; the share of
    calibration rows among evaluation rows is estimated from those whose hash is in range."""
    feeds = rng_feeds(5000, seed=1)
    cal = open_source(write_npz(tmp_path / "cal.npz", feeds), DIGITS, role="calibration")
    record = json.loads(json.dumps(cal.record(fingerprint=True)))  # as a manifest stores it
    kept = record["row_hashes"]
    assert kept["rows"] == 5000 and kept["sample"] == "the 4096 smallest hashes"
    assert len(json.dumps(kept)) < 45_000
    prints = Fingerprint.from_record(record)
    assert not prints.complete and len(prints.hashes) == 4096
    assert prints.hashes.tolist() == np.sort(cal.row_hashes)[:4096].tolist()

    new = rng_feeds(700, seed=2)
    mixed = {k: np.concatenate([feeds[k][:300], new[k]]) for k in feeds}  # 30% calibration
    ev = open_source(write_npz(tmp_path / "ev.npz", mixed), DIGITS, role="evaluation")
    with pytest.raises(DataError) as e:
        check_held_out(
            ev, prints, model=DIGITS, where="--eval ev.npz", calibrated_on="the bundle's data"
        )
    found = re.search(
        r"about (\d+)% of the 1000 evaluation rows \((\d+) of the (\d+) whose", str(e)
    )
    assert found and 20 <= int(found[1]) <= 40, str(e.value)
    assert "sample of 4096 the bundle keeps of its 5000 calibration rows" in str(e.value)
    apart = open_source(write_npz(tmp_path / "new.npz", new), DIGITS, role="evaluation")
    assert (
        check_held_out(apart, prints, model=DIGITS, where="x", calibrated_on="y").in_calibration
        == 0
    )

    # Up to 4096 rows the manifest keeps every hash, and the count is exact.
    small = open_source(write_npz(tmp_path / "s.npz", rng_feeds(100)), DIGITS, role="calibration")
    whole = Fingerprint.from_record(small.record(fingerprint=True))
    assert whole.complete and whole.rows == 100 and whole.record()["sample"] == "all"
    for broken in ({}, {"row_hashes": {"rows": 3, "hashes": "not base64!"}}, {"row_hashes": 1}):
        assert Fingerprint.from_record(broken) is None  # the file-hash check applies instead


def test_a_sampled_fingerprint_refuses_on_evidence_not_on_a_handful_of_rows(tmp_path):
    """50,000 calibration rows, 4096 hashes kept: about 33 of 400 evaluation rows fall in the
    sample's range. 3% natural duplicates must not refuse a re-gate at random (a share read
    off a few dozen rows is no evidence alone); evaluation data that is all calibration rows
    must be refused."""
    import dataclasses

    base = open_source(write_npz(tmp_path / "e.npz", rng_feeds(400)), DIGITS, role="evaluation")
    refused = {"natural": 0, "leaked": 0}
    for seed in range(200):
        rng = np.random.default_rng(seed)
        calibration = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
        prints = Fingerprint.of(calibration).sample()
        fresh = rng.integers(0, 2**64, 400, dtype=np.uint64)
        for kind, rows in (
            ("natural", np.concatenate([fresh[:388], calibration[:12]])),  # 3%
            ("leaked", calibration[rng.choice(50_000, 400, replace=False)]),
        ):
            ev = dataclasses.replace(base, row_hashes=rows)
            try:
                check_held_out(
                    ev, prints, model=DIGITS, where="--eval e.npz", calibrated_on="the bundle's"
                )
            except DataError:
                refused[kind] += 1
    assert refused["natural"] <= 2, refused  # the bare share, without its bound, refused 4
    assert refused["leaked"] == 200, refused


def test_texts_longer_than_the_model_are_counted_warned_and_described(tmp_path, caplog):
    info = minilm_info()  # 128 tokens at most
    exact = " ".join(["word"] * 126)  # with [CLS] and [SEP], 128 tokens: read whole
    long = [" ".join(["word"] * n) for n in (127, 200, 400)]  # 129, 202 and 402 tokens
    short = [t for t in english(80) if len(t.split()) <= 30][:40]  # 30 words: under 128 tokens
    path = write_jsonl(tmp_path / "ev.jsonl", [*short, exact, *long])
    with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
        ev = open_source(path, info, role="evaluation")
    assert [r.getMessage() for r in caplog.records] == [
        f"--eval {path}: 3 of 44 evaluation texts are longer than the model's 128 tokens and "
        "are cut: the gates see only their first 128 tokens"
    ]
    assert ev.cut == 3 and ev.record()["cut"] == 3 and ev.record()["lengths"][1] == 128
    assert ev.description == (
        "ev.jsonl: 44 of 44 texts (JSONL, model tokenizer; 3 longer than the model's 128 "
        "tokens, cut to them)"
    )

    caplog.clear()
    with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
        cal = open_source(path, info, role="calibration", samples=2)  # the shortest, the longest
    assert cal.cut == 1 and "1 of 2 calibration texts are longer" in caplog.text
    assert "the calibration sees only their first 128 tokens" in caplog.text
    short = open_source(write_jsonl(tmp_path / "s.jsonl", [exact]), info, role="evaluation")
    assert short.cut == 0 and short.record()["cut"] == 0 and "longer" not in short.description


def test_a_handful_of_calibration_rows_is_warned_about(tmp_path, caplog):
    path = write_npz(tmp_path / "c.npz", rng_feeds(40))
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(path, DIGITS, role="calibration")
        open_source(path, DIGITS, role="evaluation", samples=3)
    assert not caplog.records  # 40 rows calibrate; evaluation rows are the gates' business

    three = write_npz(tmp_path / "three.npz", rng_feeds(3))
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(three, DIGITS, role="calibration")
        open_source(path, DIGITS, role="calibration", samples=8)
        open_source(None, DIGITS, role="calibration", samples=10)
    first, capped, builtin = (r.getMessage() for r in caplog.records)
    assert first == (
        f"--calibration {three}: 3 calibration row(s); static INT8 takes each activation's "
        "range from them, and from fewer than 32 rows those ranges are noise: the INT8 model "
        "may fail its accuracy gates. Calibrate on a few hundred rows like those the model "
        "will serve."
    )
    assert capped.startswith(
        f"--calibration {path}: 8 calibration row(s) (--samples 8 keeps 8 of 40);"
    )
    assert builtin.startswith(
        "built-in digits calibration split (10 of 200 images): 10 calibration row(s) "
        "(--samples 10 keeps 10 of 200);"
    )


def test_without_a_mask_a_row_runs_to_its_last_non_pad_id_for_its_hash_and_length(tmp_path):
    """A tokenizer pads at the end: a pad id inside a row is one of its tokens, so the row
    [5, 0, 7, 0, 0] is 3 tokens long, for its hash and for the selection by length alike."""
    from quantgate.quantize.data import ModelInfo, row_hashes

    info = ModelInfo(inputs=DIGITS.inputs[:1], task="sequence-classification", max_seq_len=5)
    ids = np.array([[5, 0, 7, 0, 0], [4, 4, 0, 0, 0], [1, 2, 3, 4, 0]], np.int64)
    src = open_source(write_npz(tmp_path / "ids.npz", {"input_ids": ids}), info, role="evaluation")
    assert src.lengths == (2, 4)
    assert [b.feeds["input_ids"][0].tolist() for b in src.batches()] == [[4, 4, 0, 0, 0]]
    assert sorted(src.row_hashes) == sorted(row_hashes({"input_ids": ids}, info))
    one = open_source(tmp_path / "ids.npz", info, role="evaluation", samples=1)
    assert one.lengths == (3, 3)  # the median length: the row with a pad id inside
    assert one.row_hashes.tolist() == row_hashes({"input_ids": ids[:1, :3]}, info).tolist()
    assert one.row_hashes.tolist() != row_hashes({"input_ids": np.array([[5, 7]])}, info).tolist()


def test_calibration_progress_counts_every_batch_a_reader_takes(tmp_path):
    """ORT's reader stops at the end of its range without asking past the last batch: that
    batch is counted as it is handed over (a bar stopped at 192 of 200 before)."""
    import itertools

    from quantgate.quantize.data import Counted

    source = open_source(write_npz(tmp_path / "c.npz", rng_feeds(40)), DIGITS, role="calibration")
    seen = []
    batches = list(itertools.islice(Counted(source, seen.append)(), 3))  # 16 + 16 + 8 rows
    assert len(batches) == 3 and seen == [16, 32, 40]


def test_an_npz_without_token_type_ids_is_one_segment(tmp_path):
    """A tokenizer asked for no token_type_ids gives an .npz without them: zeros, as JSONL
    text and `quantgate infer` have them, not a refusal."""
    m = minilm_info()
    ids = np.array([[101, 2023, 102, 0], [101, 2003, 2019, 102]], np.int64)
    path = write_npz(
        tmp_path / "t.npz", {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    )
    (batch,) = list(open_source(path, m, role="calibration").batches())
    assert batch.feeds["token_type_ids"].tolist() == np.zeros_like(ids).tolist()


def test_data_and_the_gates_batches_pad_with_the_models_pad_values(tmp_path):
    """The rows a source yields carry the model's pad values, and the batch-consistency gate
    pads lone rows with them as the server's batcher does."""
    import dataclasses

    from quantgate.padding import right_pad

    model = dataclasses.replace(DIGITS, pad_values={"input_ids": 7})
    source = open_source(write_npz(tmp_path / "p.npz", rng_feeds(4)), model, role="evaluation")
    assert source.pad_values == {"input_ids": 7}
    rows = [
        {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), np.int64)},
        {"input_ids": np.array([[4]]), "attention_mask": np.ones((1, 1), np.int64)},
    ]
    batch = right_pad(rows, source.pad_values)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_repeated_evaluation_rows_are_gated_once(tmp_path, caplog):
    """The test split three times over counted as 3x the rows, and its narrower interval
    passed a gate the split failed. Each row is gated once, with a warning."""
    from quantgate.quantize.heldout import distinct_rows

    feeds = rng_feeds(120, seed=3)
    tripled = {k: np.concatenate([v, v[::-1], v]) for k, v in feeds.items()}
    labels = np.arange(360) % 10
    ev = open_source(write_npz(tmp_path / "ev.npz", tripled, labels), DIGITS, role="evaluation")
    assert ev.samples == 360
    with caplog.at_level("WARNING", logger="quantgate.quantize.heldout"):
        once = distinct_rows(ev, DIGITS, where="--eval ev.npz")
    assert (
        "240 of its 360 rows repeat an earlier row; each row is gated once (120 rows)"
        in caplog.text
    )
    # the reversed copy's labels are others (row i is labelled i % 10, its copy (239 - i) % 10)
    assert "; 120 of them carry another label than a copy before them" in caplog.text
    caplog.clear()
    same = np.concatenate([labels[:120]] * 3)
    thrice = {k: np.concatenate([v, v, v]) for k, v in feeds.items()}
    alike = open_source(write_npz(tmp_path / "a.npz", thrice, same), DIGITS, role="evaluation")
    with caplog.at_level("WARNING", logger="quantgate.quantize.heldout"):
        distinct_rows(alike, DIGITS, where="--eval a.npz")
    assert "240 of its 360 rows repeat" in caplog.text and "another label" not in caplog.text
    assert once.samples == 120 and once.repeated == 240 and once.record()["repeated"] == 240
    rows = np.concatenate([b.rows for b in once.batches()])
    assert sorted(rows.tolist()) == list(range(120))  # the first of each: the file's rows 0..119
    labelled = np.concatenate([b.labels for b in once.batches()])
    assert sorted(labelled.tolist()) == sorted(labels[:120].tolist())
    assert distinct_rows(open_source(write_npz(tmp_path / "one.npz", feeds), DIGITS,
                                     role="evaluation"), DIGITS, where="x").repeated == 0  # fmt: skip


def test_too_few_rows_once_repeats_are_left_out_says_so(tmp_path):
    """20 rows three times over: 20 rows to gate, and the message says why (it quoted the
    file's 60 rows, and under an eval_samples cap asked to raise a cap of 50 to 30)."""
    from quantgate.quantize.gates import check_eval_rows
    from quantgate.quantize.heldout import distinct_rows

    feeds = rng_feeds(20, seed=4)
    tripled = {k: np.concatenate([v, v, v]) for k, v in feeds.items()}
    path = write_npz(tmp_path / "ev.npz", tripled, np.arange(60) % 10)
    ev = open_source(path, DIGITS, role="evaluation")
    once = distinct_rows(ev, DIGITS, where="--eval ev.npz")
    assert (once.samples, once.repeated) == (20, 40)
    assert once.lengths == ev.lengths  # the same rows, once each
    with pytest.raises(DataError) as e:
        check_eval_rows(once, DIGITS.task, ("logits",), None, where="--eval ev.npz")
    assert str(e.value).startswith(
        "--eval ev.npz has 20 row(s) once 40 repeated rows were left out; the accuracy and "
        "agreement gates (top-1, decisions, spans, nearest neighbours) need at least 30"
    ), e.value
    # under a cap of 50 (it keeps 50 of the 60), both causes are said, neither asserted
    capped = distinct_rows(open_source(path, DIGITS, role="evaluation", samples=50), DIGITS,
                           where="--eval ev.npz")  # fmt: skip
    with pytest.raises(DataError) as e:
        check_eval_rows(capped, DIGITS.task, ("logits",), 50, where="--eval ev.npz")
    assert "keeps 50 rows of --eval ev.npz, 20 once 30 repeated rows were left out" in str(e.value)
    assert "where the file holds more; else pass more held-out rows" in str(e.value)


def test_a_sampled_fingerprint_says_how_many_calibration_rows_it_could_not_tell(tmp_path, caplog):
    """5000 calibration rows, 4096 hashes kept: of 50 calibration rows among 1000, only those
    whose hash falls in the sample's range are told and left out; the warning and the
    report's data line say about how many stay."""
    feeds = rng_feeds(5000, seed=1)
    cal = open_source(write_npz(tmp_path / "cal.npz", feeds), DIGITS, role="calibration")
    prints = Fingerprint.from_record(json.loads(json.dumps(cal.record(fingerprint=True))))
    new = rng_feeds(950, seed=2)
    mixed = {k: np.concatenate([feeds[k][:50], new[k]]) for k in feeds}
    ev = open_source(write_npz(tmp_path / "ev.npz", mixed), DIGITS, role="evaluation")
    with caplog.at_level("WARNING", logger="quantgate.quantize.heldout"):
        held = check_held_out(ev, prints, model=DIGITS, where="--eval ev.npz", calibrated_on="c")
    told = held.in_calibration
    assert 0 < told < 50 and held.samples == 1000 - told
    found = re.search(r"about (\d+) more it cannot tell stay in them", caplog.text)
    assert found and told + int(found[1]) <= 80, caplog.text
    assert held.description.endswith(
        f"{told} calibration rows left out (about {found[1]} more not told)"
    )


def test_a_cap_that_keeps_too_few_distinct_rows_is_named(tmp_path):
    """20 rows ten times over, then 100 others; eval_samples 32 keeps 32 rows, 27 of them
    distinct: the cap is the cause (the file has 120 distinct rows), and the message says
    so instead of asking for more data."""
    from quantgate.quantize.gates import check_eval_rows
    from quantgate.quantize.heldout import distinct_rows

    feeds = rng_feeds(120, seed=5)
    rows = {k: np.concatenate([np.tile(v[:20], (10, 1)), v[20:]]) for k, v in feeds.items()}
    path = write_npz(tmp_path / "ev.npz", rows, np.arange(300) % 10)
    once = distinct_rows(
        open_source(path, DIGITS, role="evaluation", samples=32), DIGITS, where="x"
    )
    assert once.samples < 30 and once.repeated
    with pytest.raises(DataError) as e:
        check_eval_rows(once, DIGITS.task, ("logits",), 32, where="--eval ev.npz")
    said = str(e.value)
    assert said.startswith(
        f"eval_samples 32 (--gate-config) keeps 32 rows of --eval ev.npz, {once.samples} once {once.repeated} repeated rows were left out"
    ), said
    assert "Raise eval_samples, or leave it out" in said
