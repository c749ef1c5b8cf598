"""report.md: the INT8 section of a search (gate table, candidates, plot), on candidates
built from gate results; and report.md rewritten by a re-gate (``report.regated``), on
report texts: the title, the sections that open a report, and which sections a re-gate on
the CPU or on CUDA supersedes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from quantgate.bundle import CPU, CUDA, GateResult, Manifest, Variant
from quantgate.placement import PlacementReport
from quantgate.quantize.cuda import CudaGateConfig, CudaGating, CudaTiming
from quantgate.quantize.decide import GateConfig
from quantgate.quantize.report import (
    MAX_PANELS,
    cuda_regated,
    cuda_section,
    gate_table,
    merged_labels,
    plot_candidates,
    plotted_gates,
    regated,
    sections,
    thresholds,
)
from quantgate.quantize.search import Candidate, SearchResult
from quantgate.quantize.speed import TimingConditions

FIRST, SECOND = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"


def manifest(int8: str) -> Manifest:
    """A bundle named "digits" whose INT8 variant's verdict is ``int8`` (its gate's)."""
    drop = GateResult("accuracy_drop", 0.2 if int8 == "pass" else 3.0, 1.0, "<=", int8 == "pass")
    fidelity = GateResult("cosine:logits", 0.9999, 0.999, ">=", True, provider=CUDA)
    return Manifest(
        name="digits",
        task="sequence-classification",
        inputs=(),
        outputs=(),
        variants=(
            Variant("model.onnx", "fp32", "0" * 64),
            Variant("model.int8.onnx", "int8", "1" * 64, gates=(drop,)),
            Variant("model.fp16.onnx", "fp16", "2" * 64, providers=(CUDA,), gates=(fidelity,)),
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
    build = "## INT8: gates and recipe search\n\nVerdict: **pass**. Shipped `dynamic`.\n"
    section = cuda_section(cuda_gating(int8_passed))
    return "\n\n".join(["# digits", build, section]) + "\n"


def cuda_gating(int8_passed: bool) -> CudaGating:
    """FP16 and INT8 timed on CUDA; FP16 passes, INT8 as ``int8_passed``."""
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
    return CudaGating(gates, timings, where, cfg)


def cuda_rows(report: str) -> dict[str, str]:
    """The CUDA section's rows, by variant."""
    section = report.split("\n## On the CUDA execution provider", 1)[1].split("\n## ")[0]
    return {row.split(" | ")[0][2:]: row for row in section.splitlines() if row.startswith("| ")}


def cuda_regate_section(when: str, verdict: str) -> str:
    return f"## Re-gated on CUDA {when}\n\nVerdict: **{verdict}**. Every variant's CUDA gates.\n"


def headings(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("## ")]


def test_a_regate_on_cuda_supersedes_the_cuda_section_and_keeps_the_cpu_gates_current():
    old = cuda_report(int8_passed=True)
    report = regated(
        old, cuda_regate_section(FIRST, "pass"), manifest("pass"), FIRST, provider=CUDA
    )
    assert headings(report) == [
        f"## Re-gated on CUDA {FIRST}",
        "## INT8: gates and recipe search",  # the CPU gates: still what decides INT8 ships
        "## On the CUDA execution provider (superseded)",
    ]
    assert cuda_rows(report) == cuda_rows(old)  # the earlier timings, kept as the record
    note = f"Superseded by the re-gate of {FIRST}, in its section above: its gates decide "
    assert f"{note}where each variant runs on CUDA, and whether FP16 ships." in report

    # A second re-gate on CUDA supersedes the first; one on the CPU then supersedes only the
    # build's INT8 section, and leaves the newest re-gate on CUDA current.
    again = regated(
        report, cuda_regate_section(SECOND, "pass"), manifest("pass"), SECOND, provider=CUDA
    )
    third = "2025-03-01T00:00:00+00:00"
    cpu = regated(again, regate_section(third, "pass"), manifest("pass"), third, provider=CPU)
    assert headings(cpu) == [
        f"## Re-gated {third}",
        f"## Re-gated on CUDA {SECOND}",
        f"## Re-gated on CUDA {FIRST} (superseded)",
        "## INT8: gates and recipe search (superseded)",
        "## On the CUDA execution provider (superseded)",
    ]
    assert current(cpu) == {"pass"} and cpu.count(f"Superseded by the re-gate of {SECOND}") == 2


def test_a_cuda_regate_section_says_what_cudas_gates_decided_not_the_variants_verdicts():
    """FP16 failed on the CPU at build time but passes every gate on CUDA: the section says
    it passed its CUDA gates (the bundle's verdict, above them, still says FAIL)."""
    section = cuda_regated(
        manifest("fail"), FIRST, "on eval.npz", "Thresholds and rules: those of the last gating.",
        cuda_gating(int8_passed=False), 0.95,
    )  # fmt: skip
    first = section.split("\n\n")[1]
    assert first.startswith("Verdict: **FAIL**.")
    assert "INT8 is not for CUDA; FP16 passed its CUDA gates." in first
    assert "| speedup_b128_s64 on CUDA | 0.8000 |  | >= 1.2 | **FAIL** |" in section
    assert section.count("| gate | value | 95% interval |") == 2


def test_a_regate_on_the_cpu_keeps_the_cuda_section_current():
    """A re-gate on the CPU keeps every variant's gates on CUDA, so their section holds."""
    old = cuda_report(int8_passed=True)
    report = regated(old, regate_section(FIRST, "pass"), manifest("pass"), FIRST, provider=CPU)
    assert cuda_rows(report) == cuda_rows(old)
    assert "## On the CUDA execution provider\n" in report


def embedding_candidate(
    name: str, cosine: float, nn: float, speedup: float, load: float = 0.5
) -> Candidate:
    """A candidate gated as an embedding model (cosine 0.99, neighbours 0.95, speed 1.2x),
    its intervals +-0.02 around the agreement and +-0.001 around the cosine."""
    accuracy = (
        GateResult("cosine", cosine, 0.99, ">=", cosine >= 0.99, ci=(cosine - 1e-3, cosine + 1e-3)),
        GateResult("nn_top1_agreement", nn, 0.95, ">=", nn >= 0.95, ci=(nn - 0.02, nn + 0.02)),
    )
    speed = tuple(
        GateResult(f"speedup_b{b}_s128", speedup, 1.2, ">=", speedup >= 1.2, ci=(1.0, 3.0))
        for b in (1, 32)
    )
    return Candidate(
        name, {}, "static", Path(name), accuracy=accuracy, speed=speed,
        timing=TimingConditions(threads=0, cpus=2, load=load),
    )  # fmt: skip


DATA = {
    "calibration": {"source": "calib.jsonl", "sha256": "0" * 64},
    "evaluation": {"source": "heldout.jsonl", "sha256": "1" * 64},
}


def test_a_gate_whose_interval_straddles_its_threshold_is_marked_uncertain():
    rows = gate_table(
        [
            GateResult("nn_top1_agreement", 0.95, 0.95, ">=", True, ci=(0.9275, 0.97)),
            GateResult("nn_top1_agreement", 0.96, 0.95, ">=", True, ci=(0.95, 0.97)),
            GateResult("kl", 0.06, 0.05, "<=", False, ci=(0.04, 0.08)),
            GateResult("cosine", 0.98, 0.99, ">=", False, ci=(0.97, 0.985)),
        ],
        0.95,
    )
    assert [row.split(" | ")[4] for row in rows[2:]] == [
        "pass (uncertain)",
        "pass",  # its lower bound is the threshold: the interval is on the passing side
        "**FAIL** (uncertain)",
        "**FAIL**",
    ]


def test_a_failed_bundles_candidate_is_not_called_shipped():
    """The user's MiniLM bundle: every candidate failed on neighbour agreement."""
    slow = embedding_candidate("slow", 0.9990, 0.9400, 1.1)
    close = embedding_candidate("close", 0.9982, 0.9475, 2.3, load=3.1)
    found = SearchResult((slow, close), chosen=None, seconds=60.0, budget_s=900.0)
    head, table = sections(found, found.best, GateConfig(), DATA, plot=None)
    assert found.best is close
    assert "2 candidate(s) in 60 s (budget 900 s)" in table  # SI, as the console's "(13.7 s)"
    assert (
        "| 1 | `close` **(in the bundle, marked failed)** |" in table and "(shipped)" not in table
    )
    assert "| **0.9475 [0.9275, 0.9675]** |" in table  # the interval of the gate that failed
    assert (
        "Timed on a busy machine: #1 (load 3.10 on 2 CPUs); their speedups may not "
        "reproduce." in table
    )
    assert (
        "Speed timed with ONNX Runtime's default intra-op threads (one per physical core), "
        "2 CPUs, 1-minute load average 3.10 before timing (above the CPU count: timed on a "
        "busy machine, may not reproduce)." in head
    )
    assert "gate is decided by its point estimate, with its 95% interval reported" in head
    assert (
        "| nn_top1_agreement | 0.9475 | [0.9275, 0.9675] | >= 0.95 | **FAIL** (uncertain) |" in head
    )
    good = embedding_candidate("good", 0.9990, 0.9700, 1.5)
    passing = SearchResult((good, close), chosen=good, seconds=60.0, budget_s=900.0)
    _, table = sections(passing, good, GateConfig(), DATA, plot=None)
    assert "| 0 | `good` **(shipped)** |" in table and "marked failed" not in table
    assert "#1 (load 3.10 on 2 CPUs)" in table  # a busy candidate is named, shipped or not
    head, _ = sections(passing, good, GateConfig(ci_rule="upper", confidence=0.9), DATA, plot=None)
    assert "decided by the bound of its 90% interval on the failing side" in head


def test_the_plot_has_a_panel_for_each_gate_a_candidate_failed_first(tmp_path):
    cands = [
        embedding_candidate("a", 0.9990, 0.9400, 2.0),
        embedding_candidate("b", 0.9985, 0.9600, 1.5),
        embedding_candidate("c", 0.9985, 0.9600, 1.5),  # where b is
    ]
    assert plotted_gates(cands) == ["nn_top1_agreement", "cosine"]  # the one that decided first
    assert plotted_gates(cands[1:]) == ["cosine", "nn_top1_agreement"]  # none failed: in order
    many = Candidate(
        "many", {}, "static", Path("m"),
        accuracy=tuple(GateResult(f"cosine:o{i}", 0.9, 0.99, ">=", i != 5) for i in range(8)),
    )  # fmt: skip
    names = plotted_gates([many])
    assert len(names) == MAX_PANELS and names[0] == "cosine:o5"
    tails = Candidate(
        "tails", {}, "static", Path("t"),
        accuracy=tuple(
            GateResult(name, value, threshold, op, passed)
            for name, value, threshold, op, passed in [
                ("cosine_tail", 0.0, 0.02, "<=", True),  # a row of zeros: last
                ("cosine", 0.999, 0.99, ">=", True),
                ("cosine_tail:h", 0.05, 0.02, "<=", False),  # it decided: first
                ("cosine:h", 0.995, 0.99, ">=", True),
            ]
        ),
    )  # fmt: skip
    assert plotted_gates([tails]) == ["cosine_tail:h", "cosine", "cosine:h", "cosine_tail"]
    found = SearchResult(tuple(cands), chosen=cands[1], seconds=1.0, budget_s=10.0)
    import matplotlib

    matplotlib.use("svg")  # a caller's own backend (a notebook's inline one, say)
    try:
        png = plot_candidates(found, cands[1], tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg"  # not switched, and no figure left open
        pyplot = sys.modules.get("matplotlib.pyplot")
        assert pyplot is None or not pyplot.get_fignums()
    finally:
        matplotlib.use("Agg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_without_matplotlib_the_bundle_ships_without_its_plot(monkeypatch, caplog, tmp_path):
    """The plot is an illustration: a missing matplotlib ended an export after all its work,
    its bundle unwritten."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails, as when absent
    cand = Candidate(
        name="a", recipe={}, method="static", path=tmp_path / "a.onnx",
        accuracy=(GateResult("accuracy_drop", 0.1, 1.0, "<=", True),),
        speed=(GateResult("speedup_b1_s8", 1.5, 1.2, ">=", True),),
    )  # fmt: skip
    found = SearchResult((cand,), chosen=cand, seconds=1.0, budget_s=10.0)
    with caplog.at_level("WARNING", logger="quantgate.quantize.report"):
        assert plot_candidates(found, cand, tmp_path / "c.png") is None
    assert "no c.png in the bundle: matplotlib cannot be imported" in caplog.text
    assert not (tmp_path / "c.png").exists()


def test_labels_of_points_that_would_overlap_are_joined():
    points = [(1.5, 0.96, "1"), (1.5, 0.96, "2"), (1.501, 0.9601, "4"), (2.0, 0.94, "0")]
    assert merged_labels(points, (1.0, 2.5), (0.93, 0.97)) == [
        (1.5, 0.96, "1, 2, 4"),
        (2.0, 0.94, "0"),
    ]


def test_the_thresholds_named_are_those_of_the_gates_measured():
    """An embedding model ran no accuracy or KL gate: its report must not send a reader
    looking for them; a candidate that never ran gets every threshold."""
    cfg = GateConfig()
    embedding = [
        GateResult("cosine", 0.998, 0.99, ">=", True),
        GateResult("nn_top1_agreement", 0.97, 0.95, ">=", True),
        GateResult("speedup_b1_s128", 1.8, 1.2, ">=", True),
    ]
    said = thresholds(embedding, cfg)
    assert (
        said == "speedup >= 1.2x on CPUExecutionProvider, cosine >= 0.99, top-1 agreement >= 0.95"
    )
    labelled = [GateResult("accuracy_drop", 0.3, 1.0, "<=", True)]
    assert thresholds(labelled, cfg) == "accuracy drop <= 1 points"
    assert "KL <= 0.05" in thresholds([], cfg) and "accuracy drop" in thresholds([], cfg)


def test_a_failed_verdict_names_its_failed_gates_first():
    """A reviewer read the verdict, then looked for the bold row in a 6-column table: the
    verdict's paragraph names the gates that failed, and a bound that failed one."""
    from quantgate.quantize.report import failed_gates

    gates = [
        ("int8", GateResult("accuracy_drop", 1.4, 1.0, "<=", False, ci=(0.5, 2.3))),
        (
            "int8",
            GateResult(
                "cosine_tail",
                0.0,
                0.02,
                "<=",
                False,
                ci=(0.0, 0.037),
                detail="; its upper bound must be <= the threshold",
            ),
        ),
        ("int8", GateResult("top1_agreement", 0.99, 0.95, ">=", True)),
    ]
    assert failed_gates(gates) == (
        " Failed: int8 accuracy_drop 1.4 (must be <= 1); int8 cosine_tail 0 (its upper bound "
        "0.037 must be <= 0.02)."
    )
    assert failed_gates(gates[2:]) == ""


def test_a_stopped_search_is_not_blamed_where_no_recipe_could_pass():
    """Every row agreeing, a top-1 agreement failed on its interval's bound (ci_rule
    'upper', few rows): only more evaluation rows can pass it, yet the message said a recipe
    not tried "may pass. Raise --max-candidates". Said only where another could do better:
    a drop of 0 still can (its interval widens with rows flipped both ways)."""
    from quantgate.quantize.verdict import failure_message

    def failed_with(gate: GateResult) -> str:
        m = manifest("fail")
        int8 = Variant("model.int8.onnx", "int8", "1" * 64, gates=(gate,), verdict="fail")
        m = Manifest(**{**m.__dict__, "variants": (m.variants[0], int8)})
        search = SearchResult((), None, 10.0, 120.0, max_candidates=2, skipped=("static-u8s8",),
                              stopped="the limit of 2 candidate(s) was reached")  # fmt: skip
        return " ".join(failure_message(m, "b", search).split())

    rule = "; its lower bound must be >= the threshold: the point estimate passes, its lower bound does not"
    all_agree = GateResult("top1_agreement", 1.0, 0.95, ">=", False, ci=(0.9, 1.0), detail=rule)
    said = failed_with(all_agree)
    assert (
        "its lower bound 0.9 is not, and ci_rule 'upper' decides by it (more rows narrow it)"
        in said
    )
    assert "The search stopped early" not in said, said
    # failed for another reason (too few distinct rows), under the point rule: the bound is
    # not blamed (it was, naming a ci_rule the run did not use)
    invalid = GateResult(
        "nn_top1_agreement", 1.0, 0.95, ">=", False, ci=(0.9, 1.0),
        detail="(12 distinct); fewer than the 30 distinct rows it needs; the point estimate "
        "must be >= the threshold",
    )  # fmt: skip
    assert "ci_rule" not in failed_with(invalid)
    # 3 rows newly wrong and 3 newly right: a recipe that flips none has a narrower interval
    no_net_drop = GateResult("accuracy_drop", 0.0, 2.0, "<=", False, ci=(-2.02, 2.02))
    assert "and one of them may pass. Raise --search-budget" in failed_with(no_net_drop)
    some_drop = GateResult("accuracy_drop", 1.3, 2.0, "<=", False, ci=(-0.4, 3.1))
    assert "and one of them may pass. Raise --search-budget" in failed_with(some_drop)
    too_slow = GateResult("speedup_b1_s64", 1.1, 1.2, ">=", False, ci=(1.0, 1.2))
    assert "The search stopped early" in failed_with(too_slow)
    assert "Raise --search-budget (now 120 s; this search took 10 s)" in failed_with(too_slow)
