"""report.md sections for the INT8 stage, the candidates plot saved into the bundle, and
report.md rewritten by a re-gate."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantgate.bundle import CPU, CUDA, GateResult, Manifest, speed_shape
from quantgate.quantize.gates import GateConfig
from quantgate.quantize.search import Candidate, SearchResult

log = logging.getLogger(__name__)

PLOT = "candidates.png"
HEADING = "## INT8: gates and recipe search"
REGATED = "## Re-gated"  # + when; the newest re-gate is the first section after the title
CUDA_HEADING = "## On the CUDA execution provider"
VERDICT = "Verdict: "  # opens the paragraph of a section's verdict
# A superseded section (the build's INT8 gates, an earlier re-gate): its heading ends with
# SUPERSEDED, a note opening with NOTE names the re-gate that replaced it, and its verdict
# paragraph opens with VERDICT_THEN.
SUPERSEDED = "(superseded)"
NOTE = "Superseded by the re-gate of "
VERDICT_THEN = "Verdict when measured: "
# The CUDA section after a re-gate on CUDA: a note opening with CUDA_NOTE names the re-gate,
# and the INT8 row's gates cell reads "<verdict> CUDA_THEN".
CUDA_NOTE = "The INT8 variant's gates on CUDA were measured again by the re-gate of "
CUDA_THEN = "when measured (superseded)"


def gate_table(gates: Sequence[GateResult], confidence: float | None = None) -> list[str]:
    """A Markdown table of ``gates``; ``confidence`` is that of their bootstrap intervals."""
    interval = "interval" if confidence is None else f"{confidence:.0%} interval"
    lines = [
        f"| gate | value | {interval} | threshold | result | how |",
        "|---|---|---|---|---|---|",
    ]
    for g in gates:
        ci = f"[{_num(g.ci[0])}, {_num(g.ci[1])}]" if g.ci else ""
        verdict = "pass" if g.passed else "**FAIL**"
        lines.append(
            f"| {g.name} | {_num(g.value)} | {ci} | {g.op} {g.threshold:g} | {verdict} | "
            f"{g.detail} |"
        )
    return lines


def fp16_section(gates: Sequence[GateResult]) -> str:
    """The FP16 variant's gates: fidelity against FP32 here; CUDA speed on a GPU host."""
    verdict = "pass" if all(g.passed for g in gates) else "**FAIL**"
    return "\n".join(
        [
            "## FP16 (for the CUDA execution provider)",
            "",
            f"Verdict: {verdict}. FP32 inputs and outputs, weights and compute in FP16. "
            "On CUDA the fast variant is FP16, not INT8. Its accuracy here is measured on the "
            "CPU provider; where a GPU is present its accuracy and speed are gated on CUDA too "
            "(the section on the CUDA execution provider); elsewhere `bench/gpu_check.py` "
            "measures them on a GPU host.",
            "",
            *gate_table(gates),
        ]
    )


def fp16_left_out(why: str) -> str:
    """The FP16 section of a bundle shipped without FP16, and why."""
    return "\n".join(
        [
            "## FP16 (for the CUDA execution provider)",
            "",
            f"Left out: {why}. The bundle has no FP16 variant, so CUDA serves FP32; "
            "the other variants are measured and gated as usual.",
        ]
    )


def cuda_section(gates: dict, timings: Sequence, where: dict, cfg) -> str:
    """Every variant timed on the CUDA provider (``cfg``, a cuda.CudaGateConfig): what
    decided where each one runs."""
    shapes = [f"b{t.shape[0]} s{t.shape[1]}" for t in timings]
    lines = [
        CUDA_HEADING,
        "",
        "Timed against FP32, interleaved, outputs on the device; median of per-pair ratios. "
        f"FP16 must be {cfg.min_speedup:g}x FP32 at the throughput shape and at least "
        f"{cfg.min_latency_ratio:g}x (not slower, within noise) at batch {cfg.latency[0]}, "
        "and keep its cosine to FP32 on CUDA; INT8 that fails is marked not for CUDA.",
        "",
        "| variant | " + " | ".join(f"{s} ms (vs FP32)" for s in shapes) + " | placement | gates |",
        "|---|" + "---|" * len(shapes) + "---|---|",
    ]
    for name in ("fp32", *gates):
        cells = [f"{t.ms[name]:.2f} ({t.speedup[name]:.2f}x)" for t in timings]
        verdict = (
            "" if name == "fp32" else ("pass" if all(g.passed for g in gates[name]) else "**FAIL**")
        )
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {where[name].reason()} | {verdict} |"
        )
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def sections(
    result: SearchResult,
    shipped: Candidate,
    gate_cfg: GateConfig,
    data: dict[str, Any],
    *,
    plot: str | None = PLOT,
) -> list[str]:
    """Markdown for report.md: verdict, the shipped candidate's gates, all candidates, nodes."""
    ok = shipped.passed
    head = [
        HEADING,
        "",
        (
            f"{VERDICT}**{'pass' if ok else 'FAIL'}**. "
            + (
                f"Shipped `{shipped.name}`, the fastest of {sum(c.passed for c in result.candidates)} "
                f"candidate(s) that passed every gate."
                if ok
                else f"No candidate passed every gate; `{shipped.name}`, the closest, went into "
                "the bundle marked failed (serving refuses a failed bundle). The closest is the "
                "candidate passing the most accuracy gates (speed depends on the machine, "
                "accuracy does not), then the fastest at its slowest shape (the speed gate "
                "requires every shape, and serving promises the slowest)."
            )
        ),
        "",
        f"Calibration: {data['calibration']['source']} (sha256 `{data['calibration']['sha256'][:12]}`). "
        f"Evaluation: {data['evaluation']['source']} (sha256 `{data['evaluation']['sha256'][:12]}`).",
        "",
        f"Thresholds: accuracy drop <= {gate_cfg.max_accuracy_drop:g} points "
        f"({'upper CI bound' if gate_cfg.ci_rule == 'upper' else 'point estimate; CI reported'}), "
        f"speedup >= {gate_cfg.min_speedup:g}x on {gate_cfg.provider}, without labels cosine >= "
        f"{gate_cfg.min_cosine:g}, top-1 agreement >= {gate_cfg.min_top1_agreement:g}, "
        f"KL <= {gate_cfg.max_kl:g}.",
        "",
        f"### Gates of `{shipped.name}`",
        "",
        *gate_table(shipped.gates, gate_cfg.confidence),
        "",
    ]
    return ["\n".join(head), "\n".join(candidates_table(result, shipped, plot))]


def candidates_table(result: SearchResult, shipped: Candidate, plot: str | None) -> list[str]:
    acc_names = sorted({g.name for c in result.candidates for g in c.accuracy})
    speed_names = sorted(
        {g.name for c in result.candidates for g in c.speed},
        key=speed_shape,
    )
    lines = [
        "### Candidates tried",
        "",
        f"{len(result.candidates)} candidate(s) in {result.seconds:.0f}s "
        f"(budget {result.budget_s:.0f}s"
        + (f", at most {result.max_candidates}" if result.max_candidates else "")
        + ")"
        + (
            f"; not tried, as {result.stopped}: {', '.join(result.skipped)}"
            if result.skipped
            else ""
        )
        + ". Dynamic recipes quantize activations at run time (no calibration).",
        "",
        "| # | candidate | method | "
        + " | ".join([*acc_names, *speed_names])
        + " | FP32 nodes | result |",
        "|---|---|---|" + "---|" * (len(acc_names) + len(speed_names)) + "---|---|",
    ]
    for i, c in enumerate(result.candidates):
        acc = {g.name: g for g in c.accuracy}
        spd = {g.name: g for g in c.speed}
        cells = [_cell(acc.get(n)) for n in acc_names] + [
            _cell(spd.get(n), "x") for n in speed_names
        ]
        if c.error:
            verdict = f"error: {c.error.splitlines()[0][:80]}"
        else:
            verdict = "pass" if c.passed else "fail"
        mark = " **(shipped)**" if c is shipped else ""
        lines.append(
            f"| {i} | `{c.name}`{mark} | {c.method} | " + " | ".join(cells)
            + f" | {len(c.kept_fp32)} | {verdict} |"
        )  # fmt: skip
    lines.append("")
    costs = result.node_costs()
    if costs:
        lines += [
            "### Nodes kept in FP32",
            "",
            "Chosen by sensitivity (FP32 vs INT8 intermediate outputs on calibration rows). "
            "Cost: the round's loss of speedup (geometric mean over shapes), split evenly over "
            "its nodes; gain: the accuracy gate before and after the round.",
            "",
            "| node | sensitivity | kept in | accuracy gate before -> after | speedup before -> after | cost per node |",
            "|---|---|---|---|---|---|",
            *(
                f"| `{n.node}` | {n.sensitivity:.4g} | `{n.candidate}` | {n.accuracy_gate} "
                f"{_num(n.accuracy_before)} -> {_num(n.accuracy_after)} | "
                f"{n.speedup_before:.2f}x -> {n.speedup_after:.2f}x | {n.speedup_cost:+.3f}x |"
                for n in costs
            ),
            "",
        ]
    elif shipped.kept_fp32:
        lines += [
            "### Nodes kept in FP32",
            "",
            f"The recipe keeps {len(shipped.kept_fp32)} node(s) in FP32: "
            + ", ".join(f"`{n}`" for n in shipped.kept_fp32)
            + ".",
            "",
        ]
    if plot:
        lines += [f"![accuracy vs speedup of every candidate]({plot})", ""]
    return lines


def _cell(g: GateResult | None, unit: str = "") -> str:
    if g is None:
        return ""
    text = f"{g.value:.2f}{unit}" if unit else _num(g.value)
    if g.ci and g.name == "accuracy_drop":
        text += f" [{g.ci[0]:.2f}, {g.ci[1]:.2f}]"
    return text if g.passed else f"**{text}**"


def regated(old: str, section: str, manifest: Manifest, when: str, *, provider: str = CPU) -> str:
    """report.md ``old`` after the re-gate at ``when`` on ``provider``: ``section`` (its
    verdict and gates) first after the title block, the verdicts that describe the bundle as
    it is now set to ``manifest``'s, and the INT8 verdicts it replaces marked superseded.

    The current verdicts are the title block's "Verdict: **pass**." and the rows ``| file |
    precision | verdict | sha256 |`` of "## Variants" (``export.writer.render_report``). The
    build's INT8 section and earlier re-gates stay as the record of what was measured when,
    marked superseded by this re-gate (``superseded``). The CUDA section's INT8 row gives the
    verdict of INT8's gates on CUDA: a re-gate on CUDA replaces those gates, and marks the row
    as measured earlier (``cuda_superseded``); a re-gate elsewhere keeps them, in this
    re-gate's table too, and the row stays current. The FP16 section, and the CUDA section's
    timings and other rows, are not re-gated and stay as they are. So every INT8 verdict
    still given as current is of gates in this re-gate's table. A report that opens with a
    section rather than a title gets the title ``# NAME``; one of another layout keeps its
    sections as they are.

    The report is edited, not rendered again: the manifest does not hold the build's
    sections in full (every candidate tried, the nodes kept in FP32, the CUDA timings).
    """
    head, *rest = ("\n" + old).split("\n## ")  # "\n" first: a report may open with a section
    head = head.strip() or f"# {manifest.name}"
    head = re.sub(r"Verdict: \*\*\w+\*\*\.", f"Verdict: **{manifest.verdict}**.", head, count=1)
    sections = []
    for body in rest:
        s = "## " + body.rstrip()
        if s.startswith((HEADING, REGATED)):
            s = superseded(s, when)
        elif s.startswith(CUDA_HEADING) and provider == CUDA:
            s = cuda_superseded(s, when)
        elif s.startswith("## Variants\n"):
            for v in manifest.variants:
                row = rf"^(\| {re.escape(v.file)} \| {re.escape(v.precision)} \| )\w+ \|"
                s = re.sub(row, rf"\g<1>{v.verdict} |", s, flags=re.M)  # pass or fail
        sections.append(s)
    return "\n\n".join([head, section.rstrip(), *sections]) + "\n"


def superseded(section: str, when: str) -> str:
    """``section``, one that gave the INT8 variant a verdict, marked as replaced by the
    re-gate at ``when``: its heading says so, a note under it says what now decides, and
    its verdict reads as the one measured then. Marking it again only changes the note."""
    title, _, body = section.partition("\n")
    lines = [line for line in body.split("\n") if not line.startswith(NOTE)]
    body = re.sub(rf"^{VERDICT}", VERDICT_THEN, "\n".join(lines).strip(), count=1, flags=re.M)
    return "\n".join(
        [
            f"{title.removesuffix(' ' + SUPERSEDED)} {SUPERSEDED}",
            "",
            f"{NOTE}{when}, the first section of this report: its gates decide the INT8 "
            "variant's verdict. What follows is an earlier measurement, kept as a record.",
            "",
            body,
        ]
    )


def cuda_superseded(section: str, when: str) -> str:
    """The CUDA section (``cuda_section``) after the re-gate at ``when`` measured the INT8
    variant on CUDA: the INT8 row's gates cell reads as the verdict measured then, and a note
    under the heading names the re-gate that replaced it. The timings, the placements and the
    other rows stay as they are. Marking it again only changes the note."""
    title, _, body = section.partition("\n")
    lines = [line for line in body.split("\n") if not line.startswith(CUDA_NOTE)]
    int8_row = r"^(\| int8 \|.*\| )(pass|\*\*FAIL\*\*) \|$"
    body = re.sub(int8_row, rf"\g<1>\g<2> {CUDA_THEN} |", "\n".join(lines).strip(), flags=re.M)
    return "\n".join(
        [
            title,
            "",
            f"{CUDA_NOTE}{when} (its section is above): the INT8 row's gates below are the "
            "earlier measurement, kept as a record.",
            "",
            body,
        ]
    )


def plot_candidates(result: SearchResult, shipped: Candidate, path: Path) -> Path | None:
    """accuracy (the first accuracy gate) vs speedup of every candidate, the shipped one marked."""
    made = [c for c in result.candidates if c.path is not None and c.accuracy and c.speed]
    if not made:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gate = made[0].accuracy[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        for c in made:
            y = next((g.value for g in c.accuracy if g.name == gate.name), None)
            if y is None:
                continue
            color = "tab:green" if c.passed else "tab:red"
            if c is shipped:
                ax.scatter(c.speedup, y, s=220, marker="*", color=color, zorder=3, label="shipped")
            else:
                ax.scatter(c.speedup, y, s=40, color=color, zorder=2)
            ax.annotate(
                c.name, (c.speedup, y), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        ax.axhline(
            gate.threshold,
            color="grey",
            ls="--",
            lw=1,
            label=f"{gate.name} {gate.op} {gate.threshold:g}",
        )
        ax.axvline(made[0].speed[0].threshold, color="grey", ls=":", lw=1, label="min speedup")
        ax.set_xlabel("speedup vs FP32 (geometric mean over shapes)")
        ax.set_ylabel(gate.name + (" (points)" if gate.name == "accuracy_drop" else ""))
        ax.set_title("INT8 candidates (green: passed every gate)")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


__all__ = [
    "CUDA_HEADING",
    "HEADING",
    "PLOT",
    "REGATED",
    "VERDICT",
    "cuda_superseded",
    "gate_table",
    "plot_candidates",
    "regated",
    "sections",
    "superseded",
]
