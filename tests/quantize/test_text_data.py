"""scripts/text_data.py, the README's way to calibration and evaluation text: two sources
that share no sentence, in files quantgate's text reader takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import minilm_info  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "text_data.py"


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _text_data():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import text_data
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return text_data


def test_it_writes_two_sources_that_share_no_sentence_and_quantgate_reads_them(tmp_path):
    from quantgate.quantize.data import open_source

    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "data"), "--eval", "40"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    calib, heldout = (
        _texts(tmp_path / "data" / "calib.jsonl"),
        _texts(tmp_path / "data" / "heldout.jsonl"),
    )
    assert len(calib) == 160 and len(heldout) == 40
    assert not set(calib) & set(heldout) and len(set(calib)) == 160
    assert all(40 <= len(t) <= 400 for t in calib + heldout)
    assert (
        f"{tmp_path / 'data' / 'heldout.jsonl'}: 40 sentences from Python's help topics"
        in run.stdout
    )
    info = minilm_info()
    assert open_source(tmp_path / "data" / "calib.jsonl", info, role="calibration").samples == 160
    assert open_source(tmp_path / "data" / "heldout.jsonl", info, role="evaluation").samples == 40


def test_without_debians_licenses_calibration_comes_from_python_docstrings(tmp_path, monkeypatch):
    text_data = _text_data()
    monkeypatch.setattr(text_data, "LICENSES", str(tmp_path / "none"))
    texts, source = text_data.calibration_sentences(160)
    assert source == "docstrings of Python's standard library" and len(texts) == 160
    assert not set(texts) & set(text_data.pydoc_sentences(1000))
    assert texts == text_data.calibration_sentences(160)[0]  # the same on every run


def test_counts_below_one_are_refused(tmp_path):
    """--eval -5 wrote all the sentences but five; --calibration 0 an empty file."""
    for flag, value in (("--calibration", "0"), ("--eval", "-5")):
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(tmp_path / "never"), flag, value],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 2 and "expected a number of sentences >= 1" in run.stderr
        assert not (tmp_path / "never").exists()


def test_new_writes_rows_heldout_does_not_have_and_leaves_heldout_as_it_was(tmp_path):
    """`--new N`, the README's way to rows for a re-gate: N more help-topic sentences, none
    of them heldout.jsonl's, which stays what an export evaluated on."""
    runs = {}
    for name, extra in (("plain", []), ("new", ["--new", "50"])):
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(tmp_path / name), "--eval", "40", *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        runs[name] = run.stdout
    heldout = _texts(tmp_path / "new" / "heldout.jsonl")
    new = _texts(tmp_path / "new" / "new-heldout.jsonl")
    assert heldout == _texts(tmp_path / "plain" / "heldout.jsonl")
    assert len(new) == len(set(new)) == 50 and not set(new) & set(heldout)
    assert not (tmp_path / "plain" / "new-heldout.jsonl").exists()
    assert "new-heldout.jsonl: 50 sentences from Python's help topics" in runs["new"]
