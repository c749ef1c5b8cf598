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
    of them those of the heldout.jsonl an export evaluated on, which stays as it was, as
    does calib.jsonl. --new started after this run's --eval (100), not the 300 of the
    README's `--eval 300`, and rewrote both files (heldout.jsonl to 100 rows)."""

    def run(out: Path, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(out), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    data = tmp_path / "data"
    run(data, "--calibration", "20", "--eval", "300")  # the export's
    before = {name: (data / name).read_bytes() for name in ("calib.jsonl", "heldout.jsonl")}
    said = run(data, "--new", "50")
    assert {name: (data / name).read_bytes() for name in before} == before
    heldout, new = _texts(data / "heldout.jsonl"), _texts(data / "new-heldout.jsonl")
    assert len(heldout) == 300 and len(new) == len(set(new)) == 50
    assert not set(new) & set(heldout)
    assert (
        f"new-heldout.jsonl: 50 sentences from Python's help topics (pydoc_data), after the "
        f"300 rows of {data / 'heldout.jsonl'}" in said
    ), said
    # no heldout.jsonl there: after those --eval would write, and nothing else written
    said = run(tmp_path / "fresh", "--eval", "40", "--new", "50")
    assert _texts(tmp_path / "fresh" / "new-heldout.jsonl") == heldout[40:90]
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["new-heldout.jsonl"]
    assert "after the first 40 (--eval's: there is no" in said, said
