"""The pipeline through the CLI: a failing gate exits 3 with a bundle and report; re-gating."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import (  # noqa: E402
    english,
    rng_feeds,
    tiny_checkpoint,
    verdict_code,
    write_jsonl,
)

from quantgate.bundle import GateResult, load, write_manifest  # noqa: E402
from quantgate.quantize.data import write_npz  # noqa: E402


def test_a_failed_export_over_a_passing_bundle_says_it_replaced_it(cli, tmp_path, gate_file):
    """A bundle that fails is written in every case, so a noisy speed gate on a busy CI
    machine turned a bundle serve would serve into one it refuses, and said nothing of it."""
    out = tmp_path / "b"
    args = (tiny_checkpoint(), "--out", out, "--search-budget", "1", "--gate-config", gate_file)
    assert cli("export", *args, "--min-speedup", "0.01").code == 0
    created = load(out).manifest.created
    r = cli("export", *args, "--min-speedup", "100")
    assert r.code == 3 and load(out).manifest.verdict == "fail"
    said = " ".join(r.stderr.split())
    assert f"It replaced the bundle there that had passed its gates (written {created})" in said


def test_impossible_threshold_exits_3_with_a_failed_bundle_and_report(
    cli, tmp_path, gate_file, caplog
):
    out = tmp_path / "b"
    r = cli("export", tiny_checkpoint(), "--out", out, "--min-speedup", "100",
            "--search-budget", "1", "--gate-config", gate_file)  # fmt: skip
    assert r.code == 3, r.stderr
    assert "gate(s) failed" in r.stderr and "FAIL" in r.stdout
    # A search stopped by its budget is not a model that cannot be quantized: said, with the fix.
    stderr = " ".join(r.stderr.split())
    assert "The search stopped early: the 1 s budget was spent, with " in stderr
    assert "Raise --search-budget (now 1 s; this search took " in stderr
    assert "calibrated on only" not in stderr  # 200 rows, and only speed failed
    assert "It replaced" not in stderr  # there was no bundle there
    b = load(out)  # written, and every hash verifies
    assert b.manifest.verdict == "fail"
    int8 = b.manifest.variant("int8")
    assert int8.verdict == "fail" and int8.recipe["candidate"]
    speed = [g for g in int8.gates if g.name.startswith("speedup_")]
    assert speed and not any(g.passed for g in speed) and all(g.threshold == 100 for g in speed)
    report = b.report.read_text()
    assert "Verdict: **FAIL**" in report and "accuracy_drop" in report and "95% interval" in report
    assert (out / "candidates.png").stat().st_size > 1000
    quant = b.manifest.extra["quantization"]
    assert quant["passed"] is False and quant["candidates"]
    assert (
        b.manifest.calibration["sha256"] and b.manifest.calibration["evaluation"]["samples"] == 360
    )

    # The same bundle re-gated with reachable thresholds: exit 0, manifest and report rewritten.
    r = cli("gate", out, "--min-speedup", "0.01", "--gate-config", gate_file)
    assert r.code == 0, r.stderr
    b = load(out)
    assert b.manifest.verdict == "pass" and b.manifest.variant("int8").passed
    assert (
        "## Re-gated" in b.report.read_text()
        and b.manifest.extra["regates"][-1]["verdict"] == "pass"
    )
    report = b.report.read_text()  # the title and the variants table: the new verdicts
    assert "Verdict: **pass**." in report.partition("\n## ")[0]
    assert "| model.int8.onnx | int8 | pass |" in report
    # The build's INT8 section is kept as the earlier measurement, and says no more verdict.
    assert verdicts(report) == {"pass"}
    build = section(report, "## INT8: gates and recipe search (superseded)")
    first = b.manifest.extra["regates"][-1]["at"]
    assert f"Superseded by the re-gate of {first}," in build
    assert "Verdict when measured: **FAIL**" in build and "| **FAIL** |" in build
    # The loosened threshold is named; the settings are recorded for the next re-gate.
    newest = report.split("## Re-gated", 1)[1]
    assert (
        "Thresholds and rules changed since the last gating: min_speedup 100.0 -> 0.01 (looser)."
        in (newest.partition("\n## ")[0])
    )
    assert b.manifest.extra["regates"][-1]["gate_config"]["min_speedup"] == 0.01

    r = cli("gate", out, "--min-speedup", "100", "--gate-config", gate_file)
    assert r.code == 3 and load(out).manifest.verdict == "fail"
    assert "min_speedup 0.01 -> 100.0." in load(out).report.read_text()  # tighter: not looser
    report = load(out).report.read_text()
    head = report.partition("\n## ")[0]  # the gates that failed it, named at the top
    assert "Verdict: **fail** (failed: int8 speedup_b1_s64, int8 speedup_b4_s64)." in head, head
    assert "| model.int8.onnx | int8 | fail |" in report
    assert verdicts(report) == {"fail"}
    newest, older = report.split("## Re-gated")[1:]  # the newest first
    assert "Verdict: **FAIL**" in newest and "(superseded)" not in newest.partition("\n")[0]
    assert older.partition("\n")[0].endswith(" (superseded)")
    assert "set by the re-gate" not in r.stderr  # 100 is the build's own threshold
    assert "Verdict when measured: **pass**" in older
    # Each superseded section is marked once, and names the newest re-gate.
    latest = load(out).manifest.extra["regates"][-1]["at"]
    assert report.count("(superseded)") == 2 and report.count("Superseded by the re-gate") == 2
    assert report.count(f"Superseded by the re-gate of {latest},") == 2

    # Without a threshold flag a re-gate keeps the bundle's last ones (100x): it fails again,
    # instead of passing on the defaults.
    r = cli("gate", out, "--gate-config", gate_file)
    assert r.code == 3, r.stderr
    regated = load(out).manifest.extra["regates"][-1]
    assert regated["gate_config"]["min_speedup"] == 100 and regated["verdict"] == "fail"
    assert "Thresholds and rules: those of the last gating." in load(out).report.read_text()

    # A gate the last gating did not measure (one a newer quantgate adds) is named: a failure
    # there would be new evidence, not a changed threshold.
    m = load(out).manifest
    older = tuple(
        dataclasses.replace(v, gates=tuple(g for g in v.gates if g.name != "accuracy_drop"))
        for v in m.variants
    )
    write_manifest(out, dataclasses.replace(m, variants=older))
    cli("gate", out, "--gate-config", gate_file)
    said = "now also gated on accuracy_drop, which its last gating did not measure"
    assert said in caplog.text
    newest = load(out).report.read_text().split("## Re-gated", 2)[1]
    assert "Gates its last gating did not measure: accuracy_drop." in newest

    # A read-only bundle is refused before its gates are measured, and left as it was.
    from quantgate.errors import BundleError
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.regating import regate

    before = (out / "manifest.json").read_bytes()
    events = []
    out.chmod(0o555)
    try:
        with pytest.raises(BundleError, match="is read-only"):
            regate(out, None, GateConfig(), on_progress=lambda *event: events.append(event))
    finally:
        out.chmod(0o755)
    assert events == [] and (out / "manifest.json").read_bytes() == before

    # A threshold a re-gate set is kept by the next, plain, re-gate: its failure says where
    # the threshold came from, the re-gate that set it, not the newest.
    r = cli("gate", out, "--min-speedup", "50", "--gate-config", gate_file)
    assert r.code == 3
    set_at = load(out).manifest.extra["regates"][-1]["at"]
    r = cli("gate", out, "--gate-config", gate_file)
    assert r.code == 3 and "required >= 50" in r.stderr, r.stderr
    assert f"The thresholds are those set by the re-gate of {set_at}" in " ".join(r.stderr.split())


def verdicts(report: str) -> set[str]:
    """The verdicts report.md states as current: the title's and each section's."""
    return {v.lower() for v in re.findall(r"Verdict: \*\*(\w+)\*\*", report)}


def section(report: str, heading: str) -> str:
    """The section of report.md under ``heading``, up to the next one."""
    assert f"\n{heading}\n" in report, heading
    return report.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_gate_fails_when_any_variant_fails_and_keeps_the_cuda_gates(cli, tmp_path, gate_file):
    out = tmp_path / "b"
    args = ("--min-speedup", "0.01", "--gate-config", gate_file)
    r = cli("export", tiny_checkpoint(), "--out", out, "--search-budget", "1", *args)
    assert r.code == 0, r.stderr
    # The bundle a GPU host writes when INT8 passed its CUDA gates and FP16 failed its own.
    cuda = "CUDAExecutionProvider"
    on_cuda = GateResult("speedup_b128_s64", 1.5, 1.2, ">=", True, provider=cuda)
    f16_bad = GateResult("cosine:logits", 0.9, 0.999, ">=", False, provider=cuda)
    m = load(out).manifest
    int8 = m.variant("int8")
    edits = {
        "int8": dict(gates=(*int8.gates, on_cuda), providers=(*int8.providers, cuda), not_for=()),
        "fp16": dict(gates=(f16_bad,), verdict="fail"),
    }
    variants = tuple(dataclasses.replace(v, **edits.get(v.precision, {})) for v in m.variants)
    write_manifest(out, dataclasses.replace(m, variants=variants))
    # A report that opens with the build's INT8 section, without a title.
    (out / "report.md").write_text(
        "## INT8: gates and recipe search\n\nVerdict: **FAIL**. No candidate passed.\n"
    )

    r = cli("gate", out, *args)
    assert r.code == 3 and "fp16 cosine:logits on CUDA = 0.9, required >= 0.999" in r.stderr
    m = load(out).manifest
    assert m.verdict == "fail" and m.extra["regates"][-1]["verdict"] == "fail"
    int8 = m.variant("int8")
    assert int8.passed and on_cuda in int8.gates  # measured on another provider: kept
    assert sum(g.name == "accuracy_drop" for g in int8.gates) == 1  # the CPU ones replaced
    report = load(out).report.read_text()
    latest = report.split("## Re-gated")[1]
    assert "Verdict: **FAIL**" in latest and "not re-gated here: fp16" in latest
    assert report.startswith(f"# {m.name}\n\n## Re-gated ")  # a title, then the re-gate
    build = section(report, "## INT8: gates and recipe search (superseded)")
    assert "Verdict when measured: **FAIL**. No candidate passed." in build


def test_gate_with_an_eval_file_and_bad_input(cli, tmp_path, gate_file, caplog):
    out = tmp_path / "b"
    # two candidates by count: by time (a 1 s budget), a busy host's search ended at one
    r = cli("export", tiny_checkpoint(), "--out", out, "--min-speedup", "0.01", "--samples", "32",
            "--max-candidates", "2", "--gate-config", gate_file)  # fmt: skip
    assert r.code == 0, r.stderr
    assert load(out).manifest.calibration["samples"] == 32
    # chosen on the rows that gave its figures: said, with how to get figures free of that
    tried = len(load(out).manifest.extra["quantization"]["candidates"])
    chosen = f"It was chosen among {tried} candidates on the same evaluation rows"
    assert tried == 2 and chosen in load(out).report.read_text()
    feeds = rng_feeds(50)
    ev = write_npz(tmp_path / "eval.npz", feeds, labels=np.arange(50) % 10)
    r = cli("gate", out, "--eval", ev, "--min-speedup", "0.01", "--gate-config", gate_file)
    # random pixels: the gate decides, either way it ran
    assert r.code == verdict_code(out), r.stderr
    m = load(out).manifest
    assert m.extra["regates"][-1]["evaluation"]["samples"] == 50
    if m.variant("fp16").passed:  # a CPU re-gate keeps FP16's gates, and says so
        latest = load(out).report.read_text().split("## Re-gated")[1]
        assert "The FP16 variant's gates (it is for CUDA) are kept as last measured" in latest
    assert "50 labelled rows" in next(
        g.detail for g in m.variant("int8").gates if g.name == "accuracy_drop"
    )
    assert "has no labels" not in caplog.text
    # Unlabelled data for a bundle gated on labelled accuracy: refused before any measuring
    # (a CI gate must not loosen because a label key went missing), unless asked for.
    unlabelled = write_npz(tmp_path / "unlabelled.npz", rng_feeds(50, seed=3))
    before = (out / "manifest.json").read_bytes()
    args = ("--min-speedup", "0.01", "--gate-config", gate_file)
    r = cli("gate", out, "--eval", unlabelled, *args)
    assert r.code == 2, r.stderr
    said = " ".join(r.stderr.split())
    assert "has no labels, but this bundle's INT8 was gated on labelled accuracy" in said, said
    assert "--allow-unlabelled" in said and (out / "manifest.json").read_bytes() == before
    r = cli("gate", out, "--eval", unlabelled, *args, "--allow-unlabelled")
    assert r.code == verdict_code(out), r.stderr
    assert (
        "in place of its labelled accuracy gate (accuracy_drop <= 1 points), as --allow-unlabelled asks"
        in caplog.text
    )
    assert {"top1_agreement", "kl"} <= {g.name for g in load(out).manifest.variant("int8").gates}

    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=feeds["input_ids"])
    r = cli("gate", out, "--eval", bad)
    assert r.code == 2 and "missing input" in r.stderr
    r = cli("gate", out, "--eval", tmp_path / "missing.jsonl")
    assert r.code == 2 and "no such file" in r.stderr
    r = cli(
        "export", tiny_checkpoint(), "--out", tmp_path / "c", "--calibration", tmp_path / "x.csv"
    )
    assert r.code == 2 and not (tmp_path / "c").exists()
    r = cli("gate", tmp_path / "nowhere")
    assert r.code == 2


def test_max_candidates_bounds_the_search_whatever_the_time(cli, tmp_path, gate_file):
    out = tmp_path / "b"
    r = cli("export", tiny_checkpoint(), "--out", out, "--max-candidates", "2",
            "--search-budget", "3600", "--min-speedup", "100", "--no-fp16",
            "--gate-config", gate_file)  # fmt: skip
    assert r.code == 3, r.stderr  # nothing passes 100x: the search would go on if it could
    stderr = " ".join(r.stderr.split())
    assert "The search stopped early: the limit of 2 candidate(s) was reached" in stderr
    assert "Raise --max-candidates (now 2) to try them." in stderr
    search = load(out).manifest.extra["quantization"]
    assert len(search["candidates"]) == 2 and search["skipped"]
    assert search["stopped"] == "the limit of 2 candidate(s) was reached"
    assert (
        "not tried, as the limit of 2 candidate(s) was reached:" in (out / "report.md").read_text()
    )
    r = cli("export", tiny_checkpoint(), "--out", tmp_path / "c", "--max-candidates", "0")
    assert r.code == 2 and "--max-candidates" in r.stderr
    r = cli("export", tiny_checkpoint(), "--out", tmp_path / "c", "--no-quantize",
            "--max-candidates", "3")  # fmt: skip
    assert r.code == 2 and "--max-candidates is for quantization" in " ".join(r.stderr.split())


def test_no_quantize_keeps_fp32_only(cli, tmp_path):
    out = tmp_path / "fp32"
    r = cli("export", tiny_checkpoint(), "--out", out, "--no-quantize")
    assert r.code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [v["precision"] for v in m["variants"]] == ["fp32"]


def test_fp16_variant_for_cuda_is_gated_on_fidelity(cli, tmp_path, gate_file):
    out = tmp_path / "b"
    args = ("--min-speedup", "0.01", "--search-budget", "1", "--gate-config", gate_file)
    r = cli("export", tiny_checkpoint(), "--out", out, *args)
    assert r.code == 0, r.stderr
    m = load(out).manifest
    f16 = m.variant("fp16")
    assert f16.providers == ("CUDAExecutionProvider",) and f16.passed
    assert [(g.name, g.op, g.threshold) for g in f16.gates] == [
        ("cosine:logits", ">=", 0.999), ("cosine_tail:logits", "<=", 0.02)
    ]  # fmt: skip
    assert f16.gates[0].value >= 0.999
    assert "CUDAExecutionProvider" in m.variant("int8").not_for  # INT8 is never served on CUDA
    assert "## FP16 (for the CUDA execution provider)" in load(out).report.read_text()

    r = cli("export", tiny_checkpoint(), "--out", out, "--force", "--no-fp16", *args)
    assert r.code == 0, r.stderr
    assert [v.precision for v in load(out).manifest.variants] == ["fp32", "int8"]


def test_an_fp16_variant_below_its_fidelity_gate_fails_the_bundle(tmp_path):
    """The refusing side of FP16's gate, in a whole build: every other FP16 test builds one
    that passes, and a build that dropped FP16's failed gates passed them all. No FP16 model
    has a cosine of exactly 1 to FP32."""
    from quantgate.errors import GateFailed
    from quantgate.quantize import QuantConfig, build
    from quantgate.quantize.decide import GateConfig

    out = tmp_path / "b"
    quant = QuantConfig(recipes=("ort-dynamic-per-channel",), fp16_min_cosine=1.0)
    gates = GateConfig(min_speedup=0.01, iterations=3, warmup=1, batch_sizes=(1,), bootstrap=200)
    with pytest.raises(GateFailed) as err:
        build(tiny_checkpoint(), out, quant_cfg=quant, gate_cfg=gates)
    assert err.value.bundle_path == str(out)
    m = load(out).manifest
    assert m.verdict == "fail" and m.variant("int8").passed and not m.variant("fp16").passed
    failed = [g for g in m.variant("fp16").gates if not g.passed]
    assert [(g.name, g.threshold) for g in failed] == [("cosine:logits", 1.0)]
    assert 0.999 < failed[0].value < 1.0


def test_evaluating_on_the_calibration_rows_is_refused_whatever_the_file(
    cli, tmp_path, gate_file, caplog
):
    """The rows, not the file's bytes: calibration rows in another order and padding are
    refused by export, and by gate against the row hashes the manifest keeps."""
    from quantgate.quantize.data import stratified

    feeds = rng_feeds(64, seed=1)
    feeds["attention_mask"][::2, 40:] = 0  # every other row 40 tokens long, then padding
    cal = write_npz(tmp_path / "cal.npz", feeds)
    same = tmp_path / "same.npz"
    same.write_bytes(cal.read_bytes())
    order = np.random.default_rng(0).permutation(64)
    shuffled = {k: v[order] for k, v in feeds.items()}
    shuffled["input_ids"][shuffled["attention_mask"] == 0] = 0  # other ids where padding
    moved = write_npz(tmp_path / "moved.npz", shuffled)
    for ev in (same, moved):
        r = cli("export", tiny_checkpoint(), "--out", tmp_path / "x", "--calibration", cal,
                "--eval", ev)  # fmt: skip
        assert r.code == 2 and not (tmp_path / "x").exists()
        assert (
            f"--eval {ev}: 64 of 64 evaluation rows (100%) are also calibration rows (the same "
            f"token ids, whatever the order of the rows or their spacing) of --calibration {cal}"
        ) in " ".join(r.stderr.split())

    out = tmp_path / "b"
    new = rng_feeds(60, seed=2)
    kept = stratified(feeds["attention_mask"].sum(1), 32)  # the rows --samples 32 keeps
    for k in new:  # two of them: natural duplicates
        new[k][:2] = feeds[k][kept[:2]]
    ev = write_npz(tmp_path / "ev.npz", new, labels=np.arange(60) % 10)
    r = cli("export", tiny_checkpoint(), "--out", out, "--calibration", cal, "--eval", ev,
            "--samples", "32", "--no-fp16", "--min-speedup", "0.01", "--search-budget", "1",
            "--gate-config", gate_file)  # fmt: skip
    # random pixels: the gate decides, either way it ran
    assert r.code == verdict_code(out), r.stderr
    assert "2 of 60 evaluation rows (3%) are also calibration rows" in caplog.text
    m = load(out).manifest
    assert (
        m.calibration["row_hashes"]["rows"] == 32 and m.calibration["row_hashes"]["sample"] == "all"
    )
    assert m.calibration["evaluation"]["in_calibration"] == 2
    assert m.calibration["evaluation"]["samples"] == 58  # the gates measured the other rows
    assert "ev.npz: 60 rows (npz); 2 calibration rows left out" in load(out).report.read_text()

    before = (out / "manifest.json").read_bytes()
    for other in (same, moved):  # 32 of their 64 rows calibrated the bundle
        r = cli("gate", out, "--eval", other, "--gate-config", gate_file)
        assert r.code == 2, r.stderr
        assert (
            f"--eval {other}: 32 of 64 evaluation rows (50%) are also calibration rows (the same "
            "token ids, whatever the order of the rows or their spacing) of the data this bundle "
            "was calibrated on (cal.npz: 32 of 64 rows (npz))."
        ) in " ".join(r.stderr.split())
    assert (out / "manifest.json").read_bytes() == before

    # A bundle from before the manifest kept row hashes: the calibration file, by its sha256.
    calibration = {k: v for k, v in m.calibration.items() if k != "row_hashes"}
    write_manifest(out, dataclasses.replace(m, calibration=calibration))
    r = cli("gate", out, "--eval", same, "--gate-config", gate_file)
    assert r.code == 2 and "is the data this bundle was calibrated on" in r.stderr


def test_too_few_evaluation_rows_are_refused_before_the_export_with_the_fix_that_fits(
    cli, tmp_path, gate_file
):
    """A file of 20 rows needs more rows; an eval_samples cap of 10 on 60 needs a higher cap.
    Both are known when the data are read, not after the export."""
    from quantgate.errors import DataError
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.pipeline import build

    small = write_npz(tmp_path / "small.npz", rng_feeds(20), labels=np.arange(20) % 10)
    events = []
    with pytest.raises(DataError) as e:
        build(tiny_checkpoint(), tmp_path / "out", evaluation=small,
              on_progress=lambda *event: events.append(event))  # fmt: skip
    assert str(e.value) == (
        f"--eval {small} has 20 row(s); the accuracy and agreement gates (top-1, decisions, "
        "spans, nearest neighbours) need at least 30 evaluation rows (with 20, each row is 5 points of accuracy). Pass more "
        "held-out rows (hundreds for a 1-point accuracy gate)."
    )
    assert [status for task, _, _, status in events] == ["loading the model"]
    ev = write_npz(tmp_path / "ev.npz", rng_feeds(60), labels=np.arange(60) % 10)
    with pytest.raises(DataError) as e:
        build(tiny_checkpoint(), tmp_path / "out", evaluation=ev,
              gate_cfg=GateConfig(eval_samples=10))  # fmt: skip
    assert str(e.value).startswith(
        f"eval_samples 10 (--gate-config) keeps 10 of its 60 rows of --eval {ev}; the accuracy and "
    )
    assert str(e.value).endswith(
        "Raise eval_samples to 30 or more, or leave it out to use every row."
    )
    assert not (tmp_path / "out").exists()

    out = tmp_path / "b"  # and a re-gate, on the same terms
    r = cli("export", tiny_checkpoint(), "--out", out, "--no-fp16", "--min-speedup", "0.01",
            "--search-budget", "1", "--gate-config", gate_file)  # fmt: skip
    assert r.code == 0, r.stderr
    r = cli("gate", out, "--eval", small, "--gate-config", gate_file)
    assert r.code == 2 and f"--eval {small} has 20 row(s)" in r.stderr


def test_a_failure_after_a_handful_of_calibration_rows_names_them(cli, tmp_path, gate_file, caplog):
    """Three calibration rows are warned about when read, and named as a likely cause when
    the INT8 accuracy gates then fail."""
    strict = tmp_path / "strict.toml"  # no KL at all: any INT8 model fails it
    strict.write_text(gate_file.read_text() + "max_kl = 0.0\n")
    ev = write_npz(tmp_path / "ev.npz", rng_feeds(60, seed=2))  # unlabelled: top-1 and KL
    r = cli("export", tiny_checkpoint(), "--out", tmp_path / "b", "--samples", "3", "--eval", ev,
            "--no-fp16", "--min-speedup", "0.01", "--search-budget", "1",
            "--gate-config", strict)  # fmt: skip
    assert r.code == 3, r.stderr
    assert "3 calibration row(s) (--samples 3 keeps 3 of 200); static INT8" in caplog.text
    assert "int8 kl = " in r.stderr
    said = " ".join(r.stderr.split())
    few = (
        "The INT8 model was calibrated on only 3 row(s), fewer than 32: activation ranges "
        "taken from so few rows are noise, a likely cause of its failed accuracy gates."
    )
    assert few in said
    # before the recipes not tried, which cannot mend a calibration's noise
    assert "The search stopped early" in said and said.index(few) < said.index("stopped early")


def test_a_bundle_carries_its_tokenizer_and_gates_text_wherever_it_goes(
    cli, tmp_path, tiny_bert, monkeypatch, gate_file
):
    """docs/quantize.md's CI job: `quantgate gate BUNDLE --eval heldout.jsonl` on a machine
    without the model's directory. The bundle's own tokenizer reads the text."""
    from transformers import BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_bert(tmp_path / "model", BertModel)
    cal = write_jsonl(tmp_path / "cal.jsonl", english(40, source="pydoc")[:40])
    ev = write_jsonl(tmp_path / "ev.jsonl", english(120, source="pydoc")[80:])
    out = tmp_path / "built"
    r = cli("export", model, "--out", out, "--calibration", cal, "--eval", ev, "--no-fp16",
            "--min-speedup", "0.01", "--search-budget", "1", "--gate-config", gate_file)  # fmt: skip
    # a random model: the gates decide, either way it ran
    assert r.code == verdict_code(out), r.stderr
    hf = load(out).manifest.extra["huggingface"]
    assert hf["tokenizer"] == "tokenizer" and hf["pad_token_id"] == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(out, moved.parent / "bundle")
    shutil.rmtree(model)  # the model's directory is not on the CI machine
    r = cli("gate", moved, "--eval", ev, "--min-speedup", "0.01", "--gate-config", gate_file)
    assert r.code == verdict_code(moved), r.stderr
    m = load(moved).manifest
    # 40 texts, one of them also a calibration text (pydoc repeats a line): left out
    gated = m.extra["regates"][-1]["evaluation"]
    assert (gated["samples"], gated["in_calibration"]) == (39, 1), gated
    assert (moved / "tokenizer" / "tokenizer.json").is_file()  # kept by the re-gate's rewrite
    # from Python, text as the moved bundle's inputs, by its own tokenizer
    from quantgate.quantize import text_inputs

    feeds = text_inputs(moved, ["hello world", "a somewhat longer line of text"])
    assert set(feeds) == {i.name for i in m.inputs}
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2 and ids[0, 0] == 101  # [CLS]
    assert mask[0].sum() < mask[1].sum() == ids.shape[1]  # padded to the longer one


def test_bad_rows_are_refused_before_the_model_is_exported(tmp_path):
    """A row the gates cannot use is found when the data are read, right after the model
    loads: not after minutes of export."""
    from quantgate.errors import DataError
    from quantgate.quantize.pipeline import build

    feeds = rng_feeds(40)
    feeds["attention_mask"][7] = 0  # a row of padding alone
    events = []
    with pytest.raises(DataError, match=r"attention_mask: expected at least one 1 per row"):
        build(tiny_checkpoint(), tmp_path / "out", calibration=write_npz(tmp_path / "c.npz", feeds),
              on_progress=lambda *event: events.append(event))  # fmt: skip
    assert [status for task, _, _, status in events] == ["loading the model"]
    assert not (tmp_path / "out").exists()


def test_a_regate_keeps_the_bundles_policy_not_the_machine_it_was_measured_on():
    """The thresholds, the interval rule and the shapes carry over; a CUDA provider or a
    thread count recorded by one re-gate does not follow the bundle to a CPU runner."""
    from quantgate.bundle import Manifest
    from quantgate.errors import BundleError
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.regating import recorded_gate_config

    def manifest(*records):
        build = {"gate_config": {"min_cosine": 0.9999, "provider": "CPUExecutionProvider"}}
        regates = [{"gate_config": r} for r in records]
        return Manifest("m", "x", (), (), (), 17, {}, extra={"quantization": build,
                                                              "regates": regates})  # fmt: skip

    assert recorded_gate_config(Manifest("m", "x", (), (), (), 17, {})) is None
    assert recorded_gate_config(manifest()).min_cosine == 0.9999
    cuda = {"min_cosine": 0.995, "batch_sizes": [1, 8], "provider": "CUDAExecutionProvider",
            "threads": 4, "future_setting": 1}  # fmt: skip
    kept = recorded_gate_config(manifest(cuda))
    assert (kept.min_cosine, kept.batch_sizes) == (0.995, (1, 8))  # the newest re-gate's
    assert (kept.provider, kept.threads) == (GateConfig().provider, 0)
    for bad in ({"min_cosine": "0.99"}, {"ci_rule": "lower"}):
        with pytest.raises(BundleError, match="records are not valid"):
            recorded_gate_config(manifest(bad))


def test_a_failure_on_rows_far_longer_than_calibrated_names_their_lengths():
    """Calibrated on texts of up to 25 tokens, judged on texts cut at 256: the failed cosine
    is named with that likely cause (and not where the lengths match)."""
    from quantgate.bundle import Manifest, TensorSpec, Variant
    from quantgate.quantize.verdict import failure_message

    failed = GateResult("cosine", 0.962, 0.99, ">=", False)
    int8 = Variant("model.int8.onnx", "int8", "0" * 64, gates=(failed,))

    def manifest(ev_longest: int):
        return Manifest(
            "m", "feature-extraction", (TensorSpec("input_ids", "int64", ("b", "s")),), (),
            (int8,), 17, {"kind": "test"},
            calibration={"samples": 64, "lengths": [9, 25],
                         "evaluation": {"samples": 64, "lengths": [180, ev_longest]}},
        )  # fmt: skip

    said = " ".join(failure_message(manifest(256), "b").split())
    assert (
        "The evaluation rows run to 256 tokens, the calibration rows only to 25: the INT8 "
        "activation ranges were calibrated on shorter sequences than it was judged on"
    ) in said
    assert "calibration rows only to" not in failure_message(manifest(40), "b")


def test_dropping_a_timed_batch_size_is_a_looser_setting():
    """Batch 32 is what the server batches to: a re-gate that no longer times it lets a
    variant through that was never measured there, as a lower threshold would."""
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.regating import _changed_settings

    before = GateConfig(batch_sizes=(1, 32))
    assert _changed_settings(before, GateConfig(batch_sizes=(1, 8))) == [
        ("batch_sizes (1, 32) -> (1, 8)", True)
    ]
    assert _changed_settings(before, GateConfig(batch_sizes=(1, 8, 32))) == [
        ("batch_sizes (1, 32) -> (1, 8, 32)", False)
    ]


def test_a_cuda_re_gate_reads_fp16s_threshold_from_its_r2_gates_too():
    """An FP16 whose outputs are all scores has R² gates only: their threshold, 1 - 2 (1 -
    c), gives back the cosine c it was built with."""
    from quantgate.bundle import GateResult, Manifest, Variant
    from quantgate.quantize.regating import _fp16_min_cosine

    def fp16(*gates):
        v = Variant("model.fp16.onnx", "fp16", "0" * 64, gates=gates)
        return Manifest("m", "custom", (), (), (v,), 17, {})

    assert _fp16_min_cosine(fp16(GateResult("r2:s", 1.0, 0.9996, ">=", True))) == pytest.approx(
        0.9998
    )
    tail = GateResult("cosine_tail:h", 0.0, 0.02, "<=", True)  # a share, not a cosine
    assert _fp16_min_cosine(fp16(GateResult("cosine:h", 1.0, 0.9995, ">=", True), tail)) == 0.9995


def test_a_lower_tail_cosine_or_a_larger_tail_share_is_looser():
    """The tail gate's two settings are policy: a re-gate keeps them, and loosening either
    lets more rows under the cosine through."""
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.regating import _changed_settings
    from quantgate.quantize.verdict import POLICY

    assert {"tail_cosine", "max_tail_share"} <= set(POLICY)
    before = GateConfig()
    assert _changed_settings(before, GateConfig(tail_cosine=0.9, max_tail_share=0.01)) == [
        ("tail_cosine 0.95 -> 0.9", True),
        ("max_tail_share 0.02 -> 0.01", False),
    ]
    assert _changed_settings(before, GateConfig(max_tail_share=0.05)) == [
        ("max_tail_share 0.02 -> 0.05", True)
    ]


def test_ids_outside_a_users_tables_are_refused_after_the_export_before_the_search(cli, tmp_path):
    """A user's own module says no table sizes before its export (a Hugging Face config
    does): the exported graph does, and the data is checked against it before minutes of
    search, not failed by ONNX Runtime inside a recipe."""
    module = Path(__file__).resolve().parents[1] / "export" / "qg_usermodels.py"
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, (40, 20))  # the tagger's table has 40 rows
    mask = np.ones_like(ids)
    cal = write_npz(tmp_path / "cal.npz", {"input_ids": ids, "attention_mask": mask})
    ids = rng.integers(1, 40, (40, 20))  # held out
    ids[7, 3] = 45
    ev = write_npz(tmp_path / "ev.npz", {"input_ids": ids, "attention_mask": mask})
    out = tmp_path / "b"
    r = cli("export", f"{module}:tagger", "--out", out, "--calibration", cal, "--eval", ev,
            "--no-fp16", "--max-candidates", "1")  # fmt: skip
    said = " ".join(r.stderr.split())
    assert r.code == 2, r.stderr
    # the row as the file holds it (row 7), not where the search's length order put it
    assert "does not fit the exported model (row indices as in its arrays, from 0)" in said
    assert "input_ids: expected ids 0..39 (its embedding table has 40 rows), found 1..45" in said
    assert "out of range in 1 row (index 7)" in said, said
    assert "search" not in said and not out.exists()


def test_a_single_logit_is_gated_on_its_value_and_with_labels_as_a_binary_choice(
    cli, tmp_path, gate_file
):
    """A reranker's (batch, 1) logit: one class would agree on every row and give KL 0 to
    any INT8. Its R² against FP32 gates it; labelled 0/1, the accuracy of its sign too."""
    module = Path(__file__).resolve().parents[1] / "export" / "qg_usermodels.py"
    rng = np.random.default_rng(0)

    def rows(n):
        ids = rng.integers(1, 40, (n, 16))
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    cal = write_npz(tmp_path / "cal.npz", rows(64))
    ev = rows(60)
    plain = write_npz(tmp_path / "ev.npz", ev)
    args = ("--calibration", cal, "--no-fp16", "--max-candidates", "1", "--min-speedup",
            "0.01", "--gate-config", gate_file)  # fmt: skip
    r = cli("export", f"{module}:reranker", "--out", tmp_path / "a", "--eval", plain, *args)
    assert r.code == verdict_code(tmp_path / "a"), r.stderr
    gates = {g.name: g for g in load(tmp_path / "a").manifest.variant("int8").gates}
    assert "top1_agreement" not in gates and "kl" not in gates
    r2 = gates["r2"]
    assert r2.threshold == pytest.approx(0.98) and r2.ci[0] <= r2.value <= r2.ci[1]
    assert "output vs FP32 on 60 rows; one value per row: R²" in r2.detail
    assert "R² >= 0.98" in (tmp_path / "a" / "report.md").read_text()

    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(tmp_path / "a" / "model.fp32.onnx"))
    scores = fp32.run(None, ev)[0][:, 0]
    assert (scores > 0).all()  # this untrained head says class 1 for every row ...
    labels = (scores > np.median(scores)).astype(np.int64)  # ... and half the rows are 1
    labelled = write_npz(tmp_path / "lab.npz", {**ev, "labels": labels})
    r = cli("export", f"{module}:reranker", "--out", tmp_path / "b", "--eval", labelled, *args)
    assert r.code == verdict_code(tmp_path / "b"), r.stderr
    gates = {g.name: g for g in load(tmp_path / "b").manifest.variant("int8").gates}
    drop = gates["accuracy_drop"]
    assert "top-1 accuracy FP32 50.00% -> INT8" in drop.detail and "r2" in gates


def _exported_with_a_dynamic_recipe(cli, model, tmp_path, gate_file):
    """``model`` exported to tmp_path/b, calibrated on license text (tmp_path/cal.jsonl) and
    gated on pydoc text labelled 1 (tmp_path/ev.jsonl: labels these models ignore), by a
    dynamic recipe (so batch consistency is gated too): its manifest."""
    cal = write_jsonl(tmp_path / "cal.jsonl", english(64, source="licenses"))
    ev = write_jsonl(tmp_path / "ev.jsonl", english(40, source="pydoc"), labels=[1] * 40)
    out = tmp_path / "b"
    r = cli("export", model, "--out", out, "--calibration", cal, "--eval", ev, "--no-fp16",
            "--recipe", "ort-dynamic-per-channel", "--min-speedup", "0.01",
            "--gate-config", gate_file)  # fmt: skip
    assert r.code == verdict_code(out), r.stderr
    return load(out).manifest


def test_a_hugging_face_multi_label_classifier_is_gated_on_its_decisions(
    cli, tmp_path, tiny_bert, caplog, gate_file
):
    """A sigmoid-per-label classifier end to end: its task from its config, its INT8 judged
    on FP32's decisions and its scores' cosine (labels ignored, with a word), and a dynamic
    recipe also on its decisions' batch consistency."""
    from transformers import BertForSequenceClassification

    tags = tiny_bert(tmp_path / "tags", BertForSequenceClassification, num_labels=4,
                     problem_type="multi_label_classification")  # fmt: skip
    m = _exported_with_a_dynamic_recipe(cli, tags, tmp_path, gate_file)
    assert m.task == "multi-label-classification"
    gates = {g.name: g for g in m.variant("int8").gates}
    assert {"decision_agreement", "cosine:logits", "batch_decision_agreement"} <= set(gates)
    assert not any(n.startswith(("top1_agreement", "kl", "accuracy")) for n in gates), gates
    assert "rows of 4 labels" in gates["decision_agreement"].detail
    assert "labels ignored: a multi-label-classification model is gated on its agreement" in (
        caplog.text
    )


def test_a_hugging_face_token_classifier_is_gated_per_token(
    cli, tmp_path, tiny_bert, caplog, gate_file
):
    """A NER model end to end: its head exported, its INT8 judged token by token against
    FP32 (labels ignored, with a word), and a dynamic recipe also on the tokens' batch
    consistency."""
    from transformers import BertForTokenClassification

    ner = tiny_bert(tmp_path / "ner", BertForTokenClassification, num_labels=5)
    m = _exported_with_a_dynamic_recipe(cli, ner, tmp_path, gate_file)
    out, cal, ev = tmp_path / "b", tmp_path / "cal.jsonl", tmp_path / "ev.jsonl"  # its files
    assert m.task == "token-classification" and [o.dims for o in m.outputs] == [
        ("batch", "sequence", 5)
    ]
    gates = {g.name: g for g in m.variant("int8").gates}
    assert {"token_top1_agreement", "token_kl", "batch_token_top1_agreement"} <= set(gates)
    assert not any(n.startswith(("cosine", "top1_agreement", "accuracy")) for n in gates)
    tokens = gates["token_top1_agreement"]
    assert "real tokens of 40 unlabelled rows" in tokens.detail and tokens.value > 0.5
    assert "labels ignored: a token-classification model's labels are one per token" in caplog.text

    # labels per token (-100 where none), as Hugging Face aligns them: the accuracy drop
    from transformers import AutoTokenizer

    texts = english(40, source="pydoc")
    tokenize = AutoTokenizer.from_pretrained(ner)
    feeds = dict(tokenize(texts, padding=True, truncation=True, max_length=64, return_tensors="np"))
    tags = np.where(feeds["attention_mask"] == 1, np.arange(40)[:, None] % 5, -100)
    tags[:, 0] = -100  # [CLS]
    bad = write_npz(tmp_path / "bad.npz", feeds, labels=tags[:, :-1])
    r = cli("export", ner, "--out", tmp_path / "x", "--calibration", cal, "--eval", bad)
    assert (
        r.code == 2
        and "labels are one class index per token: an integer array of shape" in r.stderr
    )
    labelled = write_npz(tmp_path / "tags.npz", feeds, labels=tags)
    r = cli("export", ner, "--out", out, "--force", "--calibration", cal, "--eval", labelled,
            "--no-fp16", "--max-candidates", "1", "--min-speedup", "0.01",
            "--gate-config", gate_file)  # fmt: skip
    assert r.code == verdict_code(out), r.stderr
    gates = {g.name: g for g in load(out).manifest.variant("int8").gates}
    labelled_tokens = int(((feeds["attention_mask"] == 1) & (tags >= 0)).sum())
    assert f"over {labelled_tokens} labelled tokens of 40 rows" in (
        gates["token_accuracy_drop"].detail
    )
    # the untrained head does not follow these made-up tags: agreement with FP32 as well
    agree = gates["token_top1_agreement"]
    assert "rows whose labels tell too little (FP32's own top class is the label" in agree.detail
    assert "the labels do not follow the model's answers" in caplog.text
    r = cli("gate", out, "--eval", ev)  # JSONL: its labels cannot be token labels
    said = " ".join(r.stderr.split())
    assert r.code == 2 and "(token_accuracy_drop <= 1 points)" in said, said
    assert "agreement with FP32 (token_top1_agreement, token_kl)" in said
    assert "a .npz array 'labels' of shape (rows, sequence), -100 where" in said


_EMBEDDED_BUILD = """
import logging, sys
from quantgate.errors import GateFailed
from quantgate.quantize import QuantConfig, build
from quantgate.quantize.decide import GateConfig
try:  # a tiny model's INT8 is no faster: whether it passes is not the point here (nor is
    # its timing: a few pairs at one shape)
    build(sys.argv[1], sys.argv[2], quant_cfg=QuantConfig(recipes=("ort-dynamic-per-channel",),
          fp16=False, calibration_samples=8),  # 8 rows: quantgate warns of so few
          gate_cfg=GateConfig(iterations=4, warmup=1, batch_sizes=(1,), bootstrap=200))
except GateFailed:
    pass
print("root handlers:", logging.getLogger().handlers)
logging.basicConfig(level=logging.INFO, format="APP %(message)s")
logging.getLogger("app").info("the program's own line")
"""


def test_a_build_leaves_the_programs_logging_as_it_found_it(tmp_path):
    """From Python, with logging not yet configured: ONNX Runtime's quantizer logged with
    logging.warning, which gave the root logger a stderr handler, so the program's own
    basicConfig did nothing afterwards; and quantgate's warnings went to logging's
    last-resort stderr. The build prints nothing, and the program's logging is its own."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _EMBEDDED_BUILD, str(tiny_checkpoint()), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["root handlers: []"], done.stdout
    assert done.stderr == "APP the program's own line\n"


def test_a_model_past_protobufs_limit_is_quantized_with_its_weights_beside_it(
    tmp_path, monkeypatch
):
    """Weights past 2 GB cannot be serialized inside their model: the INT8 recipes failed
    ("Failed to serialize proto") and nothing was written. Every model made from such a model
    (smoothed, INT8, FP16), and every session opened on one in memory, keeps its weights in a
    file beside it. The limit is lowered to nothing here, so the tiny model takes that path:
    a real 2 GB model would take the test minutes and gigabytes."""
    import contextlib

    import onnxruntime as ort

    from quantgate import onnxfiles
    from quantgate.errors import GateFailed
    from quantgate.quantize import QuantConfig, build

    monkeypatch.setattr(onnxfiles, "INLINE_LIMIT", 0)
    out = tmp_path / "b"
    with contextlib.suppress(GateFailed):  # a tiny model's INT8 is no faster: not the point
        build(tiny_checkpoint(), out, quant_cfg=QuantConfig(max_candidates=2))
    bundle = load(out)
    feeds = {"input_ids": np.full((2, 64), 5), "attention_mask": np.ones((2, 64), np.int64)}
    fp32 = ort.InferenceSession(str(bundle.file("fp32"))).run(None, feeds)[0]
    for precision in ("int8", "fp16"):
        assert onnxfiles.external_locations(bundle.file(precision)), precision
        got = ort.InferenceSession(str(bundle.file(precision))).run(None, feeds)[0]
        assert got.shape == fp32.shape and np.abs(got - fp32).max() < 0.5, precision
    weights = [f for f in bundle.manifest.files if f.endswith(".data")]
    assert len(weights) >= 2, bundle.manifest.files  # hashed in the manifest, checked at load
    from quantgate.cli.inspect import _size  # `inspect` counts the weights beside a file

    int8 = bundle.file("int8")
    assert (
        _size(int8)
        == int8.stat().st_size
        + sum((out / f).stat().st_size for f in onnxfiles.external_locations(int8))
        > int8.stat().st_size
    )


_MODULES_DURING_SEARCH = """
import gc, sys
from quantgate.errors import GateFailed
from quantgate.model.transformer import EncoderClassifier
from quantgate.quantize import QuantConfig, build

counts = {}
def count(task, done, total, status):
    if task == "search" and task not in counts:
        gc.collect()
        counts[task] = sum(isinstance(o, EncoderClassifier) for o in gc.get_objects())
    if task == "export" and task not in counts and done:
        counts[task] = sum(isinstance(o, EncoderClassifier) for o in gc.get_objects())
try:
    build(sys.argv[1], sys.argv[2], quant_cfg=QuantConfig(max_candidates=1, fp16=False),
          on_progress=count)
except GateFailed:
    pass
print(counts)
"""


def test_the_pytorch_model_is_let_go_once_exported(tmp_path):
    """The search and the bundle read ONNX files: the PyTorch model (a copy of the weights,
    gigabytes for a large model) was held to the end of the build."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _MODULES_DURING_SEARCH, str(tiny_checkpoint()), str(tmp_path / "b")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'export': 1, 'search': 0}", done.stdout


def test_an_exception_from_on_progress_ends_the_build_as_the_callers(tmp_path):
    """A caller cancelling from its progress callback: the search took the exception for
    each recipe's failure, went on, and ended in QuantizeFailed blaming ONNX Runtime ("the
    INT8 model does not run"). The caller's own exception comes out, and nothing is written."""
    from quantgate.quantize import QuantConfig, build

    class Stop(Exception):
        pass

    seen = []

    def cancel(task: str, done: int, total: int | None, status: str) -> None:
        seen.append(task)
        if task == "timing":
            raise Stop("cancelled by the caller")

    out = tmp_path / "b"
    with pytest.raises(Stop, match="cancelled by the caller"):
        build(tiny_checkpoint(), out, quant_cfg=QuantConfig(max_candidates=2, fp16=False),
              on_progress=cancel)  # fmt: skip
    assert seen.count("timing") == 1 and not out.exists()
