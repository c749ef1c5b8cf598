"""report.md rewritten by a re-gate (``report.regated``), on report texts: the title, the
sections that open a report, and the CUDA section's INT8 row after a re-gate on CUDA."""

from __future__ import annotations

import re

from quantgate.bundle import CPU, CUDA, GateResult, Manifest, Variant
from quantgate.placement import PlacementReport
from quantgate.quantize.cuda import CudaGateConfig, CudaTiming
from quantgate.quantize.report import cuda_section, regated

FIRST, SECOND = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"


def manifest(int8: str) -> Manifest:
    """A bundle named "digits" whose INT8 variant's verdict is ``int8``."""
    return Manifest(
        name="digits",
        task="classification",
        inputs=(),
        outputs=(),
        variants=(
            Variant("model.onnx", "fp32", "0" * 64),
            Variant("model.int8.onnx", "int8", "1" * 64, verdict=int8),
            Variant("model.fp16.onnx", "fp16", "2" * 64, providers=(CUDA,)),
        ),
        opset=17,
        source={},
    )


def regate_section(when: str, verdict: str) -> str:
    return f"## Re-gated {when}\n\nVerdict: **{verdict}**. The INT8 variant's gates were re-run.\n"


def current(report: str) -> set[str]:
    """The verdicts report.md states as current."""
    return {v.lower() for v in re.findall(r"Verdict: \*\*(\w+)\*\*", report)}


def test_a_report_opening_with_the_int8_section_keeps_it_as_the_superseded_record():
    old = "## INT8: gates and recipe search\n\nVerdict: **FAIL**. No candidate passed.\n"
    report = regated(old, regate_section(FIRST, "pass"), manifest("pass"), FIRST)
    title, newest, build = report.split("\n\n## ")
    assert title == "# digits"
    assert newest.startswith(f"Re-gated {FIRST}\n")
    assert build.startswith("INT8: gates and recipe search (superseded)\n")
    assert "Verdict when measured: **FAIL**. No candidate passed." in build
    assert current(report) == {"pass"}


def test_an_empty_report_gets_a_title_and_the_regate():
    report = regated("", regate_section(FIRST, "FAIL"), manifest("fail"), FIRST)
    assert report == f"# digits\n\n{regate_section(FIRST, 'FAIL')}"


def test_the_title_block_and_variants_table_take_the_new_verdicts():
    old = "\n".join(
        [
            "# digits",
            "",
            "Task **classification**. Verdict: **fail**.",
            "",
            "## Variants",
            "",
            "| file | precision | verdict | sha256 |",
            "|---|---|---|---|",
            "| model.onnx | fp32 | pass | `000000000000` |",
            "| model.int8.onnx | int8 | fail | `111111111111` |",
            "",
        ]
    )
    report = regated(old, regate_section(FIRST, "pass"), manifest("pass"), FIRST)
    assert report.startswith("# digits\n\nTask **classification**. Verdict: **pass**.\n\n")
    assert "| model.int8.onnx | int8 | pass | `111111111111` |" in report


def cuda_report(int8_passed: bool) -> str:
    """A report whose CUDA section (``cuda_section``, as a GPU host's build writes it) gave
    INT8's CUDA gates the verdict ``int8_passed``."""
    cfg = CudaGateConfig(throughput=(128, 64), latency=(1, 64))
    int8 = 3.1 if int8_passed else 5.0  # ms at the throughput shape, FP32's 4.0
    ms = {
        (128, 64): {"fp32": 4.0, "int8": int8, "fp16": 2.0},
        (1, 64): {"fp32": 1.0, "int8": 0.9, "fp16": 0.8},
    }
    timings = [
        CudaTiming(shape, t, {k: t["fp32"] / v for k, v in t.items()}, pairs=9)
        for shape, t in ms.items()
    ]
    on_cuda = PlacementReport(CUDA, (CUDA, CPU), nodes=40, memcpy=0, to_host=0, from_host=0)
    gates = {
        "int8": (
            GateResult("speedup_b128_s64", 4.0 / int8, 1.2, ">=", int8_passed, provider=CUDA),
        ),
        "fp16": (GateResult("speedup_b128_s64", 2.0, 1.2, ">=", True, provider=CUDA),),
    }
    where = dict.fromkeys(("fp32", "int8", "fp16"), on_cuda)
    build = "## INT8: gates and recipe search\n\nVerdict: **pass**. Shipped `dynamic`.\n"
    return "\n\n".join(["# digits", build, cuda_section(gates, timings, where, cfg)]) + "\n"


def cuda_rows(report: str) -> dict[str, str]:
    """The CUDA section's rows, by variant."""
    section = report.split("\n## On the CUDA execution provider\n", 1)[1].split("\n## ")[0]
    return {row.split(" | ")[0][2:]: row for row in section.splitlines() if row.startswith("| ")}


def test_a_regate_on_cuda_marks_the_cuda_sections_int8_row_as_measured_then():
    old = cuda_report(int8_passed=True)
    report = regated(old, regate_section(FIRST, "FAIL"), manifest("fail"), FIRST, provider=CUDA)
    rows, before = cuda_rows(report), cuda_rows(old)
    assert rows["int8"].endswith(" | pass when measured (superseded) |")
    assert rows["int8"].rsplit(" | ", 2)[0] == before["int8"].rsplit(" | ", 2)[0]  # timings kept
    assert rows["fp16"] == before["fp16"] and rows["fp32"] == before["fp32"]  # not re-gated
    note = "The INT8 variant's gates on CUDA were measured again by the re-gate of "
    assert report.count(note) == 1 and f"{note}{FIRST} (its section is above)" in report

    # A second re-gate on CUDA names itself in the note and marks the row once.
    again = regated(report, regate_section(SECOND, "FAIL"), manifest("fail"), SECOND, provider=CUDA)
    assert cuda_rows(again) == rows
    assert again.count(note) == 1 and f"{note}{SECOND} (its section is above)" in again

    # A failed row is marked the same way.
    failed = cuda_report(int8_passed=False)
    report = regated(failed, regate_section(FIRST, "pass"), manifest("pass"), FIRST, provider=CUDA)
    assert cuda_rows(report)["int8"].endswith(" | **FAIL** when measured (superseded) |")


def test_a_regate_on_the_cpu_keeps_the_cuda_sections_int8_row_current():
    """A re-gate on the CPU keeps INT8's gates on CUDA, so their row still holds."""
    old = cuda_report(int8_passed=True)
    report = regated(old, regate_section(FIRST, "pass"), manifest("pass"), FIRST, provider=CPU)
    assert cuda_rows(report) == cuda_rows(old)
    assert "measured again" not in report
