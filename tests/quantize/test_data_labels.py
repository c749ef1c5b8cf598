"""Labels are checked against the model's classes when the data is read: out-of-range labels
named by line, row or item; string labels mapped through the class names; wrong JSONL keys
said once."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import minilm_info, rng_feeds, tiny_export  # noqa: E402

from quantgate.bundle import Manifest  # noqa: E402
from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source, write_npz  # noqa: E402


@pytest.fixture(scope="module")
def classifiers(tiny_bert, tmp_path_factory):
    """Real Hugging Face classifiers, loaded as the export loads them: one whose config names
    its classes, one with the config's default names (LABEL_0, LABEL_1, LABEL_2), one rating
    stars (classes 0..4 named "1".."5") and one that names two classes alike."""
    from transformers import BertForSequenceClassification

    from quantgate.export.pipeline import load
    from quantgate.export.validation import input_specs

    root = tmp_path_factory.mktemp("hf-cls")
    named = tiny_bert(
        root / "named", BertForSequenceClassification, num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
    )  # fmt: skip
    paths = {
        "named": named,
        "default": tiny_bert(root / "default", BertForSequenceClassification, num_labels=3),
        "stars": tiny_bert(
            root / "stars", BertForSequenceClassification, num_labels=5,
            id2label={i: str(i + 1) for i in range(5)},
        ),
        "twice": tiny_bert(
            root / "twice", BertForSequenceClassification, num_labels=3,
            id2label={0: "neg", 1: "pos", 2: "pos"},
        ),
        # one logit: a reranker's, a binary head's (its sign), or a regression's
        "single": tiny_bert(root / "single", BertForSequenceClassification, num_labels=1),
    }  # fmt: skip
    models = {name: load(path) for name, path in paths.items()}
    infos = {name: ModelInfo.from_model(m, input_specs(m)) for name, m in models.items()}
    return infos, named


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labels_of(source) -> list[int]:
    return [int(x) for b in source.batches() for x in b.labels]


def test_a_classifier_s_class_names_come_from_its_config(classifiers):
    infos, _ = classifiers
    assert infos["named"].labels == ("neg", "neu", "pos")
    assert infos["named"].classes == "3 classes (0..2: neg, neu, pos)"
    assert infos["default"].labels == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_jsonl_labels_outside_the_classes_are_named_by_line(classifiers, tmp_path):
    info = classifiers[0]["named"]
    rows = [{"text": f"a short sentence number {i}", "label": i % 3} for i in range(30)]
    rows[16]["label"] = 5
    rows[22]["label"] = -1
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert "--eval" in msg and "ev.jsonl" in msg
    assert "line 17: label 5, but the model has 3 classes (0..2: neg, neu, pos)" in msg
    assert "line 23: label -1, but the model has 3 classes" in msg
    assert msg.count("- line ") == 2 and "1-based" not in msg


def test_a_single_logit_takes_labels_0_and_1(classifiers, tmp_path):
    """A one-logit classifier with 0/1 labels (a binary head, a reranker): the gates score
    the logit's sign against them (docs/quantize.md), but reading the data refused label 1,
    "the model has 1 class", in JSONL and .npz alike, with "a class index 0..0" to do."""
    info = classifiers[0]["single"]
    rows = [{"text": f"a short sentence number {i}", "label": i % 2} for i in range(40)]
    assert labels_of(open_source(jsonl(tmp_path / "ok.jsonl", rows), info, role="evaluation")) == [
        i % 2 for i in range(40)
    ]
    feeds = {k: v[:40] for k, v in rng_feeds(40).items()}
    npz = write_npz(tmp_path / "ok.npz", feeds, labels=[i % 2 for i in range(40)])
    assert labels_of(open_source(npz, info, role="evaluation")) == [i % 2 for i in range(40)]
    rows[7]["label"] = 2
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "bad.jsonl", rows), info, role="evaluation")
    assert (
        "line 8: label 2, but the model has 1 class (0: LABEL_0) (a single logit: label 0 or 1, its sign)"
        in str(e.value)
    )
    npz = write_npz(tmp_path / "bad.npz", feeds, labels=[2] + [0] * 39)
    with pytest.raises(DataError) as e:
        open_source(npz, info, role="evaluation")
    assert "Give each row a class index 0..1" in " ".join(str(e.value).split())
    # real-valued targets: a regression's, gated without labels (R²); the message says so
    rows[7]["label"] = 0.37
    regression = "A single logit with real-valued targets (a regression) is gated without labels"
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "real.jsonl", rows), info, role="evaluation")
    assert regression in " ".join(str(e.value).split())
    npz = write_npz(tmp_path / "real.npz", {**feeds, "labels": np.linspace(0, 1, 40)})
    with pytest.raises(DataError) as e:
        open_source(npz, info, role="evaluation")
    assert regression in " ".join(str(e.value).split())


def test_one_based_jsonl_labels_are_listed_and_called_one_based(classifiers, tmp_path):
    info = classifiers[0]["named"]
    rows = [{"text": f"sentence {i}", "label": i % 3 + 1} for i in range(60)]  # 1..3
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert "- line 3: label 3, but the model has 3 classes" in msg
    assert msg.count("- line ") == 10 and "... and 10 more bad line(s)" in msg  # 20 bad lines
    assert msg.rstrip().endswith("They look 1-based: renumber them from 0, in the order of the "
                                 "model's classes.")  # fmt: skip


def test_string_labels_map_to_their_class_index_by_exact_name(classifiers, tmp_path):
    infos, _ = classifiers
    names = ["pos", "neg", "neu", "neg", "pos"]
    src = open_source(
        jsonl(tmp_path / "ev.jsonl", [{"text": "x " * (i + 1), "label": n} for i, n in
                                      enumerate(names)]),
        infos["named"], role="evaluation",
    )  # fmt: skip
    assert src.has_labels and labels_of(src) == [2, 0, 1, 0, 2]  # in length order: as written
    # Integers and names may be mixed; Hugging Face's default names map like any other.
    rows = [{"text": "one", "label": "LABEL_2"}, {"text": "one two", "label": 1}]
    src = open_source(jsonl(tmp_path / "d.jsonl", rows), infos["default"], role="evaluation")
    assert labels_of(src) == [2, 1]


def test_a_string_label_that_is_no_class_name_lists_the_names(classifiers, tmp_path):
    infos, _ = classifiers
    rows = [{"text": "fine", "label": "neg"}, {"text": "a", "label": "positive"},
            {"text": "b", "label": "NEU"}]  # fmt: skip
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), infos["named"], role="evaluation")
    msg = str(e.value)
    assert "- line 1" not in msg
    assert (
        'line 2: label "positive" is not one of the model\'s class names (matched exactly); it '
        "has 3 classes (0..2: neg, neu, pos)" in msg
    )
    assert 'line 3: label "NEU"' in msg and '("NEU" differs only in case from "neu")' in msg
    with pytest.raises(DataError, match=r'line 1: label "label_1" .*\(0\.\.2: LABEL_0, LABEL_1'):
        open_source(jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "label_1"}]),
                    infos["default"], role="evaluation")  # fmt: skip


def test_string_labels_need_a_model_with_class_names(tmp_path):
    """A classifier that records no class names (a factory model without `class_names`)."""
    info = minilm_info("sequence-classification")
    assert info.labels == ()
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": "neg"}]
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert 'line 2: label "neg" is a string, but labels must be integer class indices' in msg
    assert "carries no class names to map strings through" in msg
    assert "write" not in msg.split("line 2:")[1], msg  # "neg" reads as no index
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": "1"}]  # a CSV's cell, quoted
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = " ".join(str(e.value).split())
    assert 'line 2: label "1" is a string, but labels must be integer class indices' in msg
    assert 'For the class index 1, write "label": 1 (a JSON number, unquoted).' in msg, msg
    ids = np.array([[101, 2000, 102]] * 3)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    np.savez(tmp_path / "ev.npz", **feeds, labels=np.array(["neg", "pos", "neg"]))
    with pytest.raises(DataError, match=r'labels are strings \("neg", "pos"\), but labels must '
                       "be integer class indices"):  # fmt: skip
        open_source(tmp_path / "ev.npz", info, role="evaluation")
    np.savez(tmp_path / "neg.npz", **feeds, labels=np.array([0, -2, 1]))  # no classes: >= 0
    with pytest.raises(DataError, match=r"found others in 1 row \(row 1: -2\)"):
        open_source(tmp_path / "neg.npz", info, role="evaluation")


def test_npz_labels_outside_the_built_in_digits_are_named_by_row(tmp_path):
    """Each bad label beside its own row (12 is row 3's, -1 row 17's), and what to do."""
    info = ModelInfo.from_export(tiny_export())  # the built-in model: classes '0'..'9'
    assert info.labels == tuple("0123456789") and info.classes == "10 classes (0..9)"
    feeds, labels = rng_feeds(40), np.arange(40) % 10
    open_source(write_npz(tmp_path / "ok.npz", feeds, labels), info, role="evaluation")
    labels[[3, 17]] = [12, -1]
    with pytest.raises(DataError) as e:
        open_source(write_npz(tmp_path / "bad.npz", feeds, labels), info, role="evaluation")
    assert str(e.value).endswith(
        "bad.npz: labels outside the model's classes in 2 rows (row 3: 12, row 17: -1): the "
        "model has 10 classes (0..9). Give each row a class index 0..9."
    ), str(e.value)
    one_based = write_npz(tmp_path / "one.npz", feeds, np.arange(40) % 10 + 1)
    with pytest.raises(DataError, match=r"in 4 rows \(row 9: 10, row 19: 10, .*They look 1-based"):
        open_source(one_based, info, role="evaluation")


def test_a_bundle_s_class_names_check_the_items_of_an_iterable(classifiers):
    infos, _ = classifiers
    base = infos["named"]
    m = Manifest(
        "cls", base.task, base.inputs, (), (), 17, {"kind": "huggingface"},
        export={"max_seq_len": 128}, extra={"labels": ["neg", "neu", "pos"]},
    )  # fmt: skip
    info = ModelInfo.from_manifest(m)
    assert info.labels == ("neg", "neu", "pos")
    ids = np.array([[101, 2000, 102]] * 4)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    items = [{**feeds, "labels": ["pos", "neg", "neu", "pos"]}, {**feeds, "labels": [0, 1, 2, 2]}]
    src = open_source(items, info, role="evaluation")
    assert labels_of(src) == [2, 0, 1, 2, 0, 1, 2, 2]
    items[1]["labels"] = [0, 3, 2, 3]
    with pytest.raises(DataError, match=r"data item 1: labels outside the model's classes in 2 rows "
                       r"\(row 1: 3, row 3: 3\): the model has 3 classes \(0\.\.2: neg, neu, pos\)\. "
                       "Give each row a class index 0..2 or one of its class names"):  # fmt: skip
        open_source(items, info, role="evaluation")
    items[1]["labels"] = ["neg", "good", "neu", "neg"]
    with pytest.raises(DataError, match=r'data item 1: the label in 1 row \(row 1: "good"\) is not '
                       "one of the model's class names"):  # fmt: skip
        open_source(items, info, role="evaluation")


WRONG_EVERY_LINE = {  # the lines: what the one message says
    "keys": (
        [{"sentence": f"s {i}", "label": i % 2} for i in range(25)],
        'found keys "sentence", "label" on every line; expected "text"',
        "jq -c '.text = .sentence | del(.sentence)' IN.jsonl > OUT.jsonl",
    ),
    "strings": (
        [f"sentence {i}" for i in range(25)],
        'found a string on every line; expected one {"text": ..., "label": ...} object per line',
        "jq -c '{text: .}' IN.jsonl > OUT.jsonl",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_EVERY_LINE))
def test_jsonl_wrong_the_same_way_on_every_line_says_so_once(classifiers, tmp_path, case):
    info = classifiers[0]["named"]
    rows, found, fix = WRONG_EVERY_LINE[case]
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "cal.jsonl", rows), info, role="calibration")
    msg = str(e.value)
    assert msg.startswith(f"--calibration {tmp_path / 'cal.jsonl'}: {found}")
    assert fix in msg and "\n" not in msg and "line 1" not in msg


def test_jsonl_wrong_in_varied_ways_keeps_its_list_of_lines(classifiers, tmp_path):
    info = classifiers[0]["named"]
    path = tmp_path / "cal.jsonl"
    path.write_text('{"sentence": "a"}\n{"sentence": "b", "idx": 1}\nnot json\n"c"\n')
    with pytest.raises(DataError) as e:
        open_source(path, info, role="calibration")
    msg = str(e.value)
    assert 'line 1: no "text" key (found "sentence")' in msg
    assert 'line 2: no "text" key (found "sentence", "idx")' in msg
    assert "line 3: not JSON" in msg
    assert 'line 4: found a string, expected an object with a "text" key' in msg
    # One good line among wrong ones: the wrong lines are listed, not summed up.
    path.write_text('{"text": "fine"}\n' + '{"sentence": "b"}\n' * 3)
    with pytest.raises(DataError, match=r'(?s)line 2: no "text" key.*line 4: no "text" key'):
        open_source(path, info, role="calibration")


def test_bad_labels_stop_a_build_before_the_export(classifiers, tmp_path):
    """The data are read and checked once the model is loaded, before minutes of export."""
    from quantgate.quantize.pipeline import build

    _, model_dir = classifiers
    cal = jsonl(tmp_path / "cal.jsonl", [{"text": f"calibration {i}"} for i in range(20)])
    rows = [{"text": f"held out {i}", "label": "neg"} for i in range(40)]
    ev = jsonl(tmp_path / "ev.jsonl", [*rows, {"text": "the last one", "label": "great"}])
    with pytest.raises(DataError, match=r'line 41: label "great" is not one of the model'):
        build(model_dir, tmp_path / "bundle", calibration=cal, evaluation=ev)
    assert not (tmp_path / "bundle").exists()


def test_a_label_under_another_key_is_warned_about_not_read_in_silence(
    classifiers, tmp_path, caplog
):
    """{"text", "labels"}: read as unlabelled (the gates then only compare with FP32), and
    the keys it did not read are named."""
    info = classifiers[0]["named"]
    rows = [{"text": f"sentence {i}", "labels": i % 3, "id": i} for i in range(6)]
    with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
        src = open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    assert not src.has_labels
    (record,) = [r for r in caplog.records if "not read" in r.getMessage()]
    assert 'keys "id", "labels" are not read' in record.getMessage()
    assert 'name it "label"' in record.getMessage()
    caplog.clear()
    labelled = [{"text": f"sentence {i}", "label": i % 3, "id": i} for i in range(6)]
    with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
        open_source(jsonl(tmp_path / "ok.jsonl", labelled), info, role="evaluation")
    assert not caplog.records  # other keys beside a label are fine


def hf_feeds(lengths: list[int]) -> dict[str, np.ndarray]:
    """Feeds for the tiny Hugging Face classifiers, one row of each real length (padded)."""
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = [101] + [2000 + i] * (n - 2) + [102]
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}  # fmt: skip


def test_npz_class_names_map_to_their_indices_and_stay_with_their_rows(classifiers, tmp_path):
    info = classifiers[0]["named"]
    names = np.array(["pos", "neg", "neu", "pos", "neu"])
    np.savez(tmp_path / "ev.npz", **hf_feeds([4, 6, 3, 5, 7]), labels=names)
    src = open_source(tmp_path / "ev.npz", info, role="evaluation")
    # Batched in length order (rows 2, 0, 3, 1, 4): "neu", "pos", "pos", "neg", "neu".
    assert labels_of(src) == [1, 2, 2, 0, 1]


def test_npz_bytes_labels_are_read_as_utf8(classifiers, tmp_path):
    base = classifiers[0]["named"]
    m = Manifest(
        "cls", base.task, base.inputs, (), (), 17, {"kind": "huggingface"},
        export={"max_seq_len": 128}, extra={"labels": ["café", "thé", "eau"]},
    )  # fmt: skip
    info = ModelInfo.from_manifest(m)
    feeds = hf_feeds([3, 3, 3])
    utf8 = np.array([n.encode() for n in ("thé", "café", "eau")])  # dtype S, as numpy keeps bytes
    np.savez(tmp_path / "utf8.npz", **feeds, labels=utf8)
    assert labels_of(open_source(tmp_path / "utf8.npz", info, role="evaluation")) == [1, 0, 2]
    latin1 = np.array([b"eau", b"caf\xe9", b"th\xe9"])
    np.savez(tmp_path / "latin1.npz", **feeds, labels=latin1)
    with pytest.raises(DataError) as e:
        open_source(tmp_path / "latin1.npz", info, role="evaluation")
    msg = str(e.value)
    assert "latin1.npz: labels in 2 rows (indices 1, 2) are bytes that are not UTF-8" in msg
    assert r"(the first: b'caf\xe9')" in msg and "encode them as UTF-8" in msg


def test_uint64_labels_beyond_int64_are_reported_as_written(tmp_path):
    info = ModelInfo.from_export(tiny_export())  # classes '0'..'9'
    feeds, labels = rng_feeds(4), np.array([0, 1, 2**63 + 5, 3], np.uint64)
    np.savez(tmp_path / "big.npz", **feeds, labels=labels)
    with pytest.raises(DataError, match=r"in 1 row \(row 2: 9223372036854775813\): "
                       r"the model has 10 classes"):  # fmt: skip
        open_source(tmp_path / "big.npz", info, role="evaluation")
    unnamed = replace(info, labels=())  # no class names: any index >= 0 that fits int64
    with pytest.raises(DataError, match=r"labels must be class indices 0, 1, \.\.\. \(that fit int64\); found "
                       r"others in 1 row \(row 2: 9223372036854775813\)"):  # fmt: skip
        open_source(tmp_path / "big.npz", unnamed, role="evaluation")
    np.savez(tmp_path / "ok.npz", **feeds, labels=np.array([0, 9, 2**62, 3], np.uint64))
    src = open_source(tmp_path / "ok.npz", unnamed, role="evaluation")
    assert sorted(labels_of(src)) == [0, 3, 9, 2**62]  # all rows are 64 tokens: order is free


def test_star_ratings_mixing_indices_and_names_are_refused(classifiers, tmp_path):
    """Classes 0..4 named "1".."5": "1" is class 0 but 1 is class 1, so a file must use one
    form; either alone is read."""
    info = classifiers[0]["stars"]
    rows = [{"text": "great " * (i + 1), "label": "5"} for i in range(3)]
    rows[1]["label"] = 1
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert msg.startswith(f"--eval {tmp_path / 'ev.jsonl'}: labels are both class indices (1 on "
                          'line 2) and class names ("5" on line 1)')  # fmt: skip
    assert "5 classes (0..4: 1, 2, 3, 4, 5)" in msg
    assert 'the label "1" means class 0, the label 1 class 1' in msg
    assert msg.endswith("Use one form for every label: the class indices 0..4, or the names.")
    # Beside bad lines, the mix is told after them.
    rows[2]["label"] = 5
    with pytest.raises(DataError, match=r"(?s)- line 3: label 5, but.*labels are both class"):
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    for form, expected in (("names", [4, 0, 2]), ("indices", [4, 0, 2])):
        labels = ["5", "1", "3"] if form == "names" else [4, 0, 2]
        rows = [{"text": "fine " * (i + 1), "label": x} for i, x in enumerate(labels)]
        src = open_source(jsonl(tmp_path / f"{form}.jsonl", rows), info, role="evaluation")
        assert labels_of(src) == expected


def test_an_iterable_mixing_star_indices_and_names_is_refused(classifiers):
    info = classifiers[0]["stars"]
    feeds = hf_feeds([3, 3, 3])
    with pytest.raises(DataError, match=r"data item 1: labels are both class indices \(data item "
                       r'1\) and class names \(data item 0\)'):  # fmt: skip
        open_source([{**feeds, "labels": ["1", "2", "5"]}, {**feeds, "labels": [0, 1, 4]}],
                    info, role="evaluation")  # fmt: skip
    with pytest.raises(DataError, match=r"data item 0: labels are both class indices \(1 in row "
                       r'0\) and class names \("1" in row 1\)'):  # fmt: skip
        open_source([{**feeds, "labels": [1, "1", "2"]}], info, role="evaluation")
    # Where no name is another number, a list may mix them: each read in its own form.
    src = open_source([{**feeds, "labels": ["pos", 0, "neu"]}], classifiers[0]["named"],
                      role="evaluation")  # fmt: skip
    assert labels_of(src) == [2, 0, 1]
    digits = ModelInfo.from_export(tiny_export())  # names '0'..'9' are their own indices
    items = [{**rng_feeds(3), "labels": ["7", "0", "9"]}, {**rng_feeds(3), "labels": [7, 0, 9]}]
    assert labels_of(open_source(items, digits, role="evaluation")) == [7, 0, 9, 7, 0, 9]


def test_names_given_to_two_classes_refuse_string_labels(classifiers, tmp_path):
    info = classifiers[0]["twice"]
    assert info.labels == ("neg", "pos", "pos")
    rows = [{"text": "bad", "label": "neg"}, {"text": "good", "label": "pos"}]
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert 'labels are class names ("neg" on line 1)' in msg
    assert '"pos" is class 1 and class 2, so a name does not say which class it means' in msg
    assert msg.endswith("Use class indices (0..2) instead.")
    np.savez(tmp_path / "ev.npz", **hf_feeds([3, 4]), labels=np.array(["neg", "pos"]))
    with pytest.raises(DataError, match=r'ev\.npz: labels are class names \("neg", "pos"\), but '
                       r'.*"pos" is class 1 and class 2'):  # fmt: skip
        open_source(tmp_path / "ev.npz", info, role="evaluation")
    rows = [{"text": "bad", "label": 0}, {"text": "good one", "label": 2}]  # indices are fine
    assert labels_of(open_source(jsonl(tmp_path / "i.jsonl", rows), info, role="evaluation")) == [
        0, 2]  # fmt: skip


def test_null_labels_are_said_to_be_null_not_unread(classifiers, tmp_path, caplog):
    info = classifiers[0]["named"]

    def warnings(rows) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="quantgate.quantize.text"):
            src = open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
        assert not src.has_labels
        return [r.getMessage() for r in caplog.records]

    (msg,) = warnings([{"text": f"sentence {i}", "label": None} for i in range(4)])
    assert '"label" is null in every row, so the rows are read as unlabelled' in msg
    assert "not read" not in msg
    (msg,) = warnings([{"text": f"sentence {i}", "label": None, "stars": 3} for i in range(4)])
    assert '"label" is null in every row' in msg
    assert 'Keys "stars" are not read: if one holds each row\'s class, put it in "label".' in msg
    # Null on some lines, absent on others: the other keys are named, "label" is not.
    rows = [{"text": f"sentence {i}", "id": i, **({"label": None} if i % 2 else {})}
            for i in range(4)]  # fmt: skip
    (msg,) = warnings(rows)
    assert 'no row has a "label"' in msg and 'keys "id" are not read' in msg


def test_whole_float_labels_are_their_integers_and_fractions_are_refused(classifiers, tmp_path):
    """pandas writes an integer column with a gap as floats (1.0): those are class indices;
    2.5 is not one, in JSONL or in .npz."""
    info = classifiers[0]["named"]
    rows = [{"text": f"sentence {i}", "label": float(i % 3)} for i in range(30)]
    src = open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    assert sorted(set(labels_of(src))) == [0, 1, 2]
    rows[4]["label"] = 2.5
    with pytest.raises(DataError, match="line 5: "):
        open_source(jsonl(tmp_path / "bad.jsonl", rows), info, role="evaluation")
    digits = ModelInfo.from_export(tiny_export())
    feeds = rng_feeds(40)
    whole, half = tmp_path / "whole.npz", tmp_path / "half.npz"
    np.savez(whole, **feeds, labels=(np.arange(40) % 10).astype(np.float64))
    assert labels_of(open_source(whole, digits, role="evaluation")) == list(np.arange(40) % 10)
    np.savez(half, **feeds, labels=np.arange(40) % 10 + 0.5)
    with pytest.raises(
        DataError,
        match=r"labels must be class indices \(whole numbers\); found others in 40 rows \(row 0: "
        r"0\.5, row 1: 1\.5, row 2: 2\.5, row 3: 3\.5, row 4: 4\.5, \.\.\. 35 more\)",
    ):
        open_source(half, digits, role="evaluation")


def test_an_embedding_model_s_labels_are_ignored_whatever_their_form(classifiers, tmp_path, caplog):
    """An embedding model is gated on its agreement with FP32: labels in its data (class
    names, indices, in JSONL, an npz or an iterable) are not read, and the evaluation says
    so. Before, names were refused as labels a model "without class names" cannot map."""
    info = replace(classifiers[0]["named"], task="feature-extraction", labels=())
    names = [{"text": f"a short sentence number {i}", "label": ["pos", "neg"][i % 2]}
             for i in range(30)]  # fmt: skip
    feeds = rng_feeds(30, seq=8)
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    sources = {
        "jsonl": jsonl(tmp_path / "names.jsonl", names),
        "npz": write_npz(tmp_path / "ids.npz", feeds, np.arange(30) % 2),
        "iterable": [{**feeds, "labels": np.array(["pos", "neg"] * 15)}],
    }
    for kind, spec in sources.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
            source = open_source(spec, info, role="evaluation")
        assert not source.has_labels and source.labels_ignored, kind
        assert all(b.labels is None for b in source.batches()), kind
        assert "labels ignored: a feature-extraction model is gated on its agreement with FP32" in (
            caplog.text
        ), kind
        caplog.clear()
        with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
            open_source(spec, info, role="calibration")  # labels never matter there
        assert "labels ignored" not in caplog.text, kind


def _stars() -> ModelInfo:
    """A classifier of star ratings: class 0 is named "1"."""
    from quantgate.bundle import TensorSpec

    spec = lambda name: TensorSpec(name, "int64", ("batch", "sequence"))  # noqa: E731
    return ModelInfo(
        inputs=(spec("input_ids"), spec("attention_mask")), task="sequence-classification",
        max_seq_len=16, labels=("1", "2", "3", "4", "5"),
    )  # fmt: skip


def test_labels_in_a_dict_of_arrays_are_read_as_given_as_an_iterables_are():
    """numpy made a list mixing indices and names one array of strings: [1, 2, 3, "5"] of
    star ratings became classes 0, 1, 2, 4 (each index read as a name), where an iterable
    of the same rows is refused. A pandas column of names (object dtype) is names."""
    ids = np.arange(1, 33).reshape(4, 8)
    mask = np.ones_like(ids)
    for given in ([{"input_ids": ids, "attention_mask": mask, "labels": [1, 2, 3, "5"]}],
                  {"input_ids": ids, "attention_mask": mask, "labels": [1, 2, 3, "5"]}):  # fmt: skip
        with pytest.raises(DataError, match=r"labels are both class indices \(1 in row 0\)"):
            open_source(given, _stars(), role="evaluation")
    names = np.array(["5", "1", "2", "5"], dtype=object)  # df["label"].to_numpy()
    src = open_source({"input_ids": ids, "attention_mask": mask, "labels": names}, _stars(),
                      role="evaluation")  # fmt: skip
    assert np.concatenate([b.labels for b in src.batches()]).tolist() == [4, 0, 1, 4]


def test_inputs_of_other_widths_are_refused_not_cut():
    """input_ids (4, 8) beside an attention_mask (4, 5) ran on 5 of each row's 8 tokens;
    arrays of no column made rows of no token."""
    ids = np.arange(1, 33).reshape(4, 8)
    narrow = {"input_ids": ids, "attention_mask": np.ones((4, 5), np.int64)}
    with pytest.raises(DataError, match="inputs disagree on their sequence axis: input_ids 8, "
                       "attention_mask 5"):  # fmt: skip
        open_source(narrow, _stars(), role="evaluation")
    empty = {"input_ids": ids[:, :0], "attention_mask": np.ones((4, 0), np.int64)}
    with pytest.raises(DataError, match="a sequence axis of 0: a row needs a token"):
        open_source(empty, _stars(), role="evaluation")


def test_write_npz_writes_labels_as_given_for_the_reader_to_check(tmp_path):
    """Class names failed with a traceback (cast to int64), and 1.7 was written as 1."""
    ids = np.arange(1, 33).reshape(4, 8)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    named = write_npz(tmp_path / "named.npz", feeds, labels=["5", "1", "2", "5"])
    src = open_source(named, _stars(), role="evaluation")
    assert np.concatenate([b.labels for b in src.batches()]).tolist() == [4, 0, 1, 4]
    odd = write_npz(tmp_path / "odd.npz", feeds, labels=[0, 1.7, 2, 3])
    with pytest.raises(DataError, match="labels must be class indices \\(whole numbers\\)"):
        open_source(odd, _stars(), role="evaluation")


def test_an_iterable_whose_rows_change_between_passes_is_refused():
    """A callable giving the rows in another order each pass (a DataLoader with shuffle) had
    FP32's and a candidate's outputs compared across different rows, without a word."""
    rng = np.random.default_rng(0)
    ids = np.arange(1, 65).reshape(8, 8)
    rows = [{"input_ids": ids[i : i + 1], "attention_mask": np.ones((1, 8), np.int64)}
            for i in range(8)]  # fmt: skip
    same = open_source(lambda: rows, _stars(), role="evaluation")
    assert [b.feeds["input_ids"].tolist() for b in same.batches()] == [
        b.feeds["input_ids"].tolist() for b in same.batches()
    ]
    shuffled = open_source(lambda: rng.permutation(rows), _stars(), role="evaluation")
    with pytest.raises(DataError, match="holds other rows than when the data was first read"):
        list(shuffled.batches())
