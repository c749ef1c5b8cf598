"""report.md sections for the INT8 stage, the candidates plot saved into the bundle, and
report.md rewritten by a re-gate."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantgate.bundle import (
    CPU,
    CUDA,
    PASS,
    PLOT,
    VERDICT_PHRASE,
    GateResult,
    Manifest,
    all_passed,
    speed_shape,
    verdict_phrase,
)
from quantgate.quantize.cuda import CudaGating
from quantgate.quantize.decide import GateConfig, failed_by_bound, uncertain
from quantgate.quantize.fidelity import r2_threshold
from quantgate.quantize.search import Candidate, SearchResult
from quantgate.quantize.speed import TimingConditions

log = logging.getLogger(__name__)

HEADING = "## INT8: gates and recipe search"
REGATED = "## Re-gated"  # + when; the newest re-gate is the first section after the title
REGATED_CUDA = "## Re-gated on CUDA"  # + when: a re-gate of every variant's CUDA gates
CUDA_HEADING = "## On the CUDA execution provider"
VERDICT = "Verdict: "  # opens the paragraph of a section's verdict
# A superseded section (the build's INT8 or CUDA gates, an earlier re-gate): its heading ends
# with SUPERSEDED, a note opening with NOTE names the re-gate that replaced it, and its
# verdict paragraph opens with VERDICT_THEN.
SUPERSEDED = "(superseded)"
NOTE = "Superseded by the re-gate of "
VERDICT_THEN = "Verdict when measured: "
# What the gates of the re-gate that supersedes a section decide, by where it ran.
DECIDES_INT8 = "its gates decide the INT8 variant's verdict"
DECIDES_CUDA = "its gates decide where each variant runs on CUDA, and whether FP16 ships"
UNCERTAIN = "(uncertain)"  # after a gate's result: its interval straddles the threshold
MAX_PANELS = 4  # accuracy gates in the candidates plot, a panel each (report.md has them all)


def gate_table(gates: Sequence[GateResult], confidence: float | None = None) -> list[str]:
    """A Markdown table of ``gates``; ``confidence`` is that of their intervals."""
    interval = "interval" if confidence is None else f"{confidence:.0%} interval"
    lines = [
        f"| gate | value | {interval} | threshold | result | how |",
        "|---|---|---|---|---|---|",
    ]
    for g in gates:
        ci = f"[{_num(g.ci[0])}, {_num(g.ci[1])}]" if g.ci else ""
        verdict = ("pass" if g.passed else "**FAIL**") + (f" {UNCERTAIN}" if uncertain(g) else "")
        lines.append(
            f"| {g.label} | {_num(g.value)} | {ci} | {g.op} {g.threshold:g} | {verdict} | "
            f"{g.detail} |"
        )
    return lines


def fp16_section(gates: Sequence[GateResult], kept: str = "") -> str:
    """The FP16 variant's gates: fidelity against FP32 here; CUDA speed on a GPU host.
    ``kept``: the nodes kept FP32 where FP32's values leave FP16's range
    (``fp16.OutOfRange.describe``), "" where none."""
    verdict = _verdict(gates)
    return "\n".join(
        [
            "## FP16 (for the CUDA execution provider)",
            "",
            f"Verdict: {verdict}. FP32 inputs and outputs, weights and compute in FP16"
            + (f"; {kept}" if kept else "")
            + ". On CUDA the fast variant is FP16, not INT8. Its accuracy here is measured on "
            "the CPU provider, whose FP16 kernels compute in FP32 between Casts: it measures "
            "the weights' rounding, not FP16 arithmetic, and the values FP16 cannot hold were "
            "found on FP32's run instead. Where a GPU is present its accuracy and speed are "
            "gated on CUDA too (the section on the CUDA execution provider); elsewhere "
            "`bench/gpu_check.py` measures them on a GPU host.",
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


def cuda_section(gated: CudaGating) -> str:
    """Every variant timed on the CUDA provider: what decided where each one runs."""
    return "\n".join([CUDA_HEADING, "", *cuda_table(gated)])


def cuda_table(gated: CudaGating) -> list[str]:
    """How the CUDA gates decide, and a row per variant: its time at each shape against
    FP32's, its placement, and whether its gates there passed."""
    cfg, timings = gated.cfg, gated.timings
    shapes = [f"b{t.shape[0]} s{t.shape[1]}" for t in timings]
    lines = [
        "Timed against FP32, interleaved, outputs on the device; median of per-pair ratios. "
        f"FP16 must be {cfg.min_speedup:g}x FP32 at the throughput shape and at least "
        f"{cfg.min_latency_ratio:g}x (not slower, within noise) at batch {cfg.latency[0]}, "
        "and keep its cosine to FP32 on CUDA; INT8 that fails is marked not for CUDA.",
        "",
        "| variant | " + " | ".join(f"{s} ms (vs FP32)" for s in shapes) + " | placement | gates |",
        "|---|" + "---|" * len(shapes) + "---|---|",
    ]
    for name in ("fp32", *gated.gates):
        cells = [f"{t.ms[name]:.2f} ({t.speedup[name]:.2f}x)" for t in timings]
        verdict = "" if name == "fp32" else _verdict(gated.gates[name])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {gated.where[name].reason()} | {verdict} |"
        )
    return lines


def _verdict(gates: Sequence[GateResult]) -> str:
    return "pass" if all_passed(gates) else "**FAIL**"


def cuda_regated(
    manifest: Manifest,
    when: str,
    measured_on: str,
    settings: str,
    gated: CudaGating,
    confidence: float | None = None,
) -> str:
    """report.md's section on a re-gate on CUDA at ``when``: the bundle's verdict, what CUDA's
    gates decided for each variant, the timings (``cuda_table``) and every gate measured
    there, those of an INT8 marked not for CUDA too. ``measured_on``: with what, on what
    data; ``settings``: the sentence on the gate settings; ``confidence``: the intervals'."""
    decided = []
    for name, gates in gated.gates.items():
        passed = all_passed(gates)
        if name == "int8":
            decided.append("INT8 runs on CUDA" if passed else "INT8 is not for CUDA")
        else:
            decided.append(f"{name.upper()} {'passed' if passed else 'FAILED'} its CUDA gates")
    what = (
        f"Every variant's gates on {CUDA} were re-run {measured_on}, by the build's rule: FP16 "
        "ships only if it is accurate and fast there, INT8's gates there decide only whether "
        f"it runs there. {'; '.join(decided)}. The gates measured on the CPU are kept. "
        f"{settings}"
    )
    lines = [*_regate_opening(REGATED_CUDA, when, manifest, what), *cuda_table(gated)]
    for name, gates in gated.gates.items():
        lines += ["", f"{name.upper()} on CUDA:", "", *gate_table(gates, confidence)]
    return "\n".join([*lines, ""])


def regate_section(
    manifest: Manifest,
    when: str,
    cfg: GateConfig,
    measured_on: str,
    settings: str,
    *,
    kept: bool,
    new: Sequence[str] = (),
) -> str:
    """report.md's section on a re-gate on the CPU: the bundle's new verdict, what was re-run
    ``measured_on`` what (and whether INT8 gates of other providers were ``kept``), the gate
    ``settings`` sentence, the gates measured for the first time (``new``), the INT8 gates."""
    int8 = manifest.variant("int8")
    what = (
        f"The INT8 variant's gates on {cfg.provider} were re-run {measured_on}; they replace its "
        "gates measured there" + (", and its gates on other providers are kept." if kept else ".")
    )
    failing = [v.precision for v in manifest.variants if v is not int8 and not v.passed]
    if failing:
        what += f" Failed, and not re-gated here: {', '.join(failing)}."
    if any(v.precision == "fp16" and v.passed for v in manifest.variants):
        what += (
            " The FP16 variant's gates (it is for CUDA) are kept as last measured, decided by "
            "that gating's rule; `quantgate gate --device cuda` re-runs them on a GPU host."
        )
    what += f" {settings}"
    if new:
        what += f" Gates its last gating did not measure: {', '.join(new)}."
    lines = _regate_opening(REGATED, when, manifest, what)
    return "\n".join([*lines, *gate_table(int8.gates, cfg.confidence), ""])


def _regate_opening(heading: str, when: str, manifest: Manifest, what: str) -> list[str]:
    """A re-gate section's heading and its paragraph: the bundle's verdict, the gates that
    failed it, then ``what``."""
    verdict = "pass" if manifest.verdict == PASS else "FAIL"
    failed = failed_gates([(v.precision, g) for v in manifest.variants for g in v.gates])
    return [f"{heading} {when}", "", f"{VERDICT}**{verdict}**.{failed} {what}", ""]


def failed_gates(gates: Sequence[tuple[str, GateResult]]) -> str:
    """ " Failed: int8 accuracy_drop 1.4 (must be <= 1); ...." for the gates of ``gates``
    ((variant, gate) pairs; "" for the variant: the gate alone) that failed, "" where none
    did: what a reviewer of the report needs first, before the tables."""
    bad = []
    for variant, g in gates:
        if g.passed:
            continue
        bound = failed_by_bound(g)
        why = f"its {bound} must be" if bound else "must be"
        bad.append(f"{variant + ' ' if variant else ''}{g.label} {g.value:.4g} ({why} "
                   f"{g.op} {g.threshold:g})")  # fmt: skip
    return f" Failed: {'; '.join(bad)}." if bad else ""


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
            f"{VERDICT}**{'pass' if ok else 'FAIL'}**."
            + failed_gates([("", g) for g in shipped.gates])
            + " "
            + (
                (
                    f"Shipped `{shipped.name}`, the fastest (geometric mean of its speedups over "
                    f"the timed shapes) of {sum(c.passed for c in result.candidates)} "
                    "candidate(s) that passed every gate, as timed again once chosen."
                    if len(result.retimed) <= 1
                    else f"Shipped `{shipped.name}`, the fastest of the "
                    f"{sum(c.passed for c in result.candidates)} candidate(s) that passed every "
                    f"gate whose speed held when timed again ({len(result.retimed) - 1} faster "
                    "did not hold)."
                )
                + (
                    f" It was chosen among {len(result.candidates)} candidates on the same "
                    "evaluation rows that gave its accuracy figures, which favours one that was "
                    "lucky on them: re-gate it on rows the search did not see (`quantgate gate "
                    "BUNDLE --eval OTHER`) for figures free of that choice."
                    if len(result.candidates) > 1
                    else ""
                )
                if ok
                else (
                    f"{len(result.retimed)} candidate(s) passed every gate in the search, none "
                    "when timed again (below). "
                    if result.retimed
                    else ""
                )
                + f"No candidate passed every gate; `{shipped.name}`, the closest, went into "
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
        f"Thresholds: {thresholds(shipped.gates, gate_cfg)}. {decision_rule(gate_cfg)}",
        "",
        f"### Gates of `{shipped.name}`",
        "",
        *gate_table(shipped.gates, gate_cfg.confidence),
        "",
    ]
    if shipped.timing is not None:
        head += [f"Speed timed with {shipped.timing.describe()}.", ""]
    return ["\n".join(head), "\n".join(search_sections(result, shipped, plot))]


AGREEMENTS = ("top1_agreement", "decision_agreement", "span_agreement")


def thresholds(gates: Sequence[GateResult], cfg: GateConfig) -> str:
    """The thresholds of the kinds of gate among ``gates`` (every kind where there is none:
    a candidate that did not run), so a reader looks for no gate that was not measured."""
    names = {g.name for g in gates}
    kinds = [
        (any(n.endswith("accuracy_drop") for n in names),
         f"accuracy drop <= {cfg.max_accuracy_drop:g} points"),
        (any(g.is_speed for g in gates), f"speedup >= {cfg.min_speedup:g}x on {cfg.provider}"),
        (any(n.startswith(("cosine", "batch_cosine")) for n in names),
         f"cosine >= {cfg.min_cosine:g}"),
        (any(n.startswith("cosine_tail") for n in names),
         f"at most {cfg.max_tail_share:.0%} of rows with cosine < {cfg.tail_cosine:g}"),
        (any(n == "r2" or n.startswith(("r2:", "batch_r2")) for n in names),
         f"R² >= {r2_threshold(cfg.min_cosine):g} (one value per row)"),
        # top-1's, and the other agreements held to its threshold: decisions, answer spans,
        # an integer output's values
        (any(n.endswith(AGREEMENTS) or n.startswith("agreement:") for n in names),
         f"top-1 agreement >= {cfg.min_top1_agreement:g}"),
        (bool(names & {"kl", "token_kl"}), f"KL <= {cfg.max_kl:g}"),
    ]  # fmt: skip
    return ", ".join(text for measured, text in kinds if measured or not gates)


def decision_rule(cfg: GateConfig) -> str:
    """What decides a gate under ``cfg.ci_rule``, and what a result marked UNCERTAIN means."""
    interval = f"{cfg.confidence:.0%} interval"
    decided = (
        f"the bound of its {interval} on the failing side (the upper bound of a drop or a KL, "
        "the lower of a cosine or an agreement)"
        if cfg.ci_rule == "upper"
        else f"its point estimate, with its {interval} reported"
    )
    return (
        f"Each accuracy or fidelity gate is decided by {decided}; each speed gate by its "
        f"median ratio. A result marked {UNCERTAIN} has its interval on both sides of the "
        "threshold: another sample of the rows (or timings) could have decided it the other way."
    )


def _busy(t: TimingConditions) -> str:
    """What made a timing busy: other processes' share of the machine while it ran, or,
    where that was not measured, the load average before it."""
    if t.others is not None:
        return f"other processes took {t.others:.0%} of the CPUs"
    return f"load {t.load:.2f} on {t.cpus} CPUs"


def search_sections(result: SearchResult, shipped: Candidate, plot: str | None) -> list[str]:
    """The search's part of report.md, as lines: "Candidates tried" (what was tried and in
    how long, then a table of every candidate's gates), the re-timing of the winner, "Nodes
    kept in FP32" (each node's sensitivity and cost), and the plot at ``plot``."""
    acc_names = sorted({g.name for c in result.candidates for g in c.accuracy})
    speed_names = sorted(
        {g.name for c in result.candidates for g in c.speed},
        key=lambda name: speed_shape(name) or (0, 0),  # (every speed gate's name has one)
    )
    busy = [(i, c.timing) for i, c in enumerate(result.candidates) if c.timing and c.timing.busy]
    lines = [
        "### Candidates tried",
        "",
        f"{len(result.candidates)} candidate(s) in {result.seconds:.0f} s "
        f"(budget {result.budget_s:.0f} s"
        + (f", at most {result.max_candidates}" if result.max_candidates else "")
        + ")"
        + (
            f"; not tried, as {result.stopped}: {', '.join(result.skipped)}"
            if result.skipped
            else ""
        )
        + ". Dynamic recipes quantize activations at run time (no calibration)."
        + (
            " Timed on a busy machine: "
            + ", ".join(f"#{i} ({_busy(t)})" for i, t in busy)
            + "; their speedups may not reproduce."
            if busy
            else ""
        ),
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
        elif not c.speed:  # inaccurate, and its speed would have served nothing (search._try)
            verdict = "fail (not timed: inaccurate, no refinement left to try, another passed)"
        else:
            verdict = "pass" if c.passed else "fail"
        mark = ""
        if c.name == shipped.name:  # (the shipped one's speed gates are its second timing)
            mark = " **(shipped)**" if shipped.passed else " **(in the bundle, marked failed)**"
        lines.append(
            f"| {i} | `{c.name}`{mark} | {c.method} | " + " | ".join(cells)
            + f" | {len(c.kept_fp32)} | {verdict} |"
        )  # fmt: skip
    lines.append("")
    if result.retimed:
        lines += [
            "The fastest winner was timed again, apart from the search that chose it (the "
            "fastest of several noisy measurements is optimistic), and ships on that "
            "measurement; one that did not hold gave way to the next: "
            + "; ".join(
                f"`{c.name}` {', '.join(f'{g.name} {g.value:.3g}x' for g in c.speed)}: "
                + ("held" if c.passed else "did not hold")
                for c in result.retimed
            )
            + ". The table above has the search's figures.",
            "",
        ]
    costs = result.node_costs()
    if costs:
        lines += [
            "### Nodes kept in FP32",
            "",
            "Chosen by sensitivity: what keeping each node FP32 alone gains in output cosine on calibration rows. "
            "Cost: the round's loss of speedup (geometric mean over shapes), split evenly over "
            "its nodes; gain: the accuracy gate before and after the round.",
            "",
            "| node | sensitivity | kept in | accuracy gate before -> after | speedup before -> after | cost per node |",
            "|---|---|---|---|---|---|",
            *(
                f"| `{n.node}` | {n.sensitivity:.4g} | `{n.candidate}` | {n.accuracy_gate} "
                f"{_num(n.accuracy_before)} -> {_num(n.accuracy_after)} | "
                f"{n.speedup_before:.2f}x -> "
                + (
                    f"{n.speedup_after:.2f}x | {n.speedup_cost:+.3f}x |"
                    if n.speedup_after is not None and n.speedup_cost is not None
                    else "not timed | |"
                )
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
    if g.ci and not g.is_speed:
        text += f" [{_num(g.ci[0])}, {_num(g.ci[1])}]"
    return text if g.passed else f"**{text}**"


def regated(old: str, section: str, manifest: Manifest, when: str, *, provider: str = CPU) -> str:
    """report.md ``old`` after the re-gate at ``when`` on ``provider``: ``section`` (its
    verdict and gates) first after the title block, the verdicts that describe the bundle as
    it is now set to ``manifest``'s, and the sections whose gates it measured again marked
    superseded.

    The current verdicts are the title block's "Verdict: **pass**." and the rows ``| file |
    precision | verdict | sha256 |`` of "## Variants" (``export.writer.render_report``). A
    re-gate on the CPU measures the INT8 variant's gates there again: the build's INT8
    section and earlier re-gates on the CPU are superseded. A re-gate on CUDA measures every
    variant's CUDA gates again: the build's CUDA section and earlier re-gates on CUDA are
    superseded. Each stays as the record of what was measured when (``superseded``); the
    sections of the other provider's gates stay current, and so does the FP16 section
    (FP16's accuracy measured on the CPU). A report that opens with a section rather than a
    title gets the title ``# NAME``; one of another layout keeps its sections as they are.

    The report is edited, not rendered again: the manifest does not hold the build's
    sections in full (every candidate tried, the nodes kept in FP32, the CUDA timings).
    """
    head, *rest = ("\n" + old).split("\n## ")  # "\n" first: a report may open with a section
    head = head.strip() or f"# {manifest.name}"
    head = VERDICT_PHRASE.sub(lambda _: verdict_phrase(manifest), head, count=1)
    decides = DECIDES_CUDA if provider == CUDA else DECIDES_INT8
    sections = []
    for body in rest:
        s = "## " + body.rstrip()
        if _measured_again(s, provider):
            s = superseded(s, when, decides=decides)
        elif s.startswith("## Variants\n"):
            for v in manifest.variants:
                row = rf"^(\| {re.escape(v.file)} \| {re.escape(v.precision)} \| )\w+ \|"
                s = re.sub(row, rf"\g<1>{v.verdict} |", s, flags=re.M)  # pass or fail
        sections.append(s)
    return "\n\n".join([head, section.rstrip(), *sections]) + "\n"


def _measured_again(section: str, provider: str) -> bool:
    """Whether a re-gate on ``provider`` measured again the gates ``section`` reports."""
    # CUDA's first: REGATED is a prefix of REGATED_CUDA
    if section.startswith((CUDA_HEADING, REGATED_CUDA)):
        return provider == CUDA
    return provider != CUDA and section.startswith((HEADING, REGATED))


def superseded(section: str, when: str, *, decides: str = DECIDES_INT8) -> str:
    """``section``, one that gave verdicts, marked as replaced by the re-gate at ``when``:
    its heading says so, a note under it says what now ``decides``, and its verdict reads as
    the one measured then. Marking it again only changes the note."""
    title, _, body = section.partition("\n")
    lines = [line for line in body.split("\n") if not line.startswith(NOTE)]
    body = re.sub(rf"^{VERDICT}", VERDICT_THEN, "\n".join(lines).strip(), count=1, flags=re.M)
    return "\n".join(
        [
            f"{title.removesuffix(' ' + SUPERSEDED)} {SUPERSEDED}",
            "",
            f"{NOTE}{when}, in its section above: {decides}. What follows is an earlier "
            "measurement, kept as a record.",
            "",
            body,
        ]
    )


def plot_candidates(result: SearchResult, shipped: Candidate, path: Path) -> Path | None:
    """Every candidate's accuracy gates against its speedup at its slowest shape (the one the
    speed gate fails on): a panel per gate with its threshold and each candidate's interval,
    so a candidate sits below (or above) the line of the gate it failed. Points are numbered
    as in report.md's table of candidates; the shipped one is a star. None where there is
    nothing to plot, or no matplotlib (warned: the bundle ships without its plot)."""
    made = [
        (i, c)
        for i, c in enumerate(result.candidates)
        if c.path is not None and c.accuracy and c.speed
    ]
    if not made:
        return None
    # A Figure of its own, not pyplot's: no backend switched, no figure left open, in the
    # caller's process (a notebook keeps its inline plots)
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # the plot is an illustration: the bundle ships without it
        log.warning(
            "no %s in the bundle: matplotlib cannot be imported (%s); it comes with the "
            "`export` extra (pip install 'quantgate[export]')",
            path.name,
            e,
        )
        return None

    names = plotted_gates([c for _, c in made])
    fig = Figure(figsize=(6.4, 1.2 + 2.4 * len(names)), dpi=110)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    points = [_panel(ax, made, name, shipped) for ax, name in zip(axes[:, 0], names, strict=True)]
    # Labels once every panel has set the shared x range.
    for ax, pts in zip(axes[:, 0], points, strict=True):
        for x, y, label in merged_labels(pts, ax.get_xlim(), ax.get_ylim()):
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axes[-1, 0].set_xlabel("speedup vs FP32 at the slowest shape (every shape must pass)")
    others = len({g.name for _, c in made for g in c.accuracy}) - len(names)
    fig.suptitle(
        "INT8 candidates, numbered as in report.md (green: passed every gate)"
        + (f"; {others} more gate(s) in report.md" if others else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    return path


def plotted_gates(candidates: Sequence[Candidate]) -> list[str]:
    """The accuracy gates the plot shows, at most MAX_PANELS: those some candidate failed
    first (they decided), then the rest, each in the order the candidates report them; a
    cosine's tail that no candidate failed last (a row of zeros)."""
    names = list(dict.fromkeys(g.name for c in candidates for g in c.accuracy))
    failed = {g.name for c in candidates for g in c.accuracy if not g.passed}
    return sorted(names, key=lambda n: (n not in failed, n.startswith("cosine_tail")))[:MAX_PANELS]


def _panel(ax, made, name: str, shipped: Candidate) -> list[tuple[float, float, str]]:
    """Gate ``name`` of every candidate in ``made`` (index, candidate) on ``ax``; the points
    drawn, (x, y, label)."""
    points, gate = [], None
    for i, c in made:
        g = next((g for g in c.accuracy if g.name == name), None)
        x = c.slowest
        if g is None or not (math.isfinite(g.value) and math.isfinite(x)):
            continue
        gate = g
        color = "tab:green" if c.passed else "tab:red"
        if g.ci and all(map(math.isfinite, g.ci)):
            ax.vlines(x, *g.ci, color=color, lw=1, alpha=0.6, zorder=1)
        if c.name == shipped.name:
            ax.scatter(x, g.value, s=180, marker="*", color=color, zorder=3, label="shipped")
        else:
            ax.scatter(x, g.value, s=30, color=color, zorder=2)
        points.append((x, g.value, str(i)))
    if gate is not None:
        ax.axhline(
            gate.threshold, color="grey", ls="--", lw=1, label=f"{gate.op} {gate.threshold:g}"
        )
    ax.axvline(made[0][1].speed[0].threshold, color="grey", ls=":", lw=1, label="min speedup")
    ax.set_ylabel(name + (" (points)" if name.endswith("accuracy_drop") else ""), fontsize=8)
    ax.legend(fontsize=7, loc="best")
    return points


def merged_labels(
    points: Sequence[tuple[float, float, str]],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    cells: int = 40,
) -> list[tuple[float, float, str]]:
    """``points`` (x, y, label) with the labels of points that would print over each other
    (in the same 1/``cells`` of both axes) joined onto the first: "2, 5" once, not twice."""
    spans = max(xlim[1] - xlim[0], 1e-12), max(ylim[1] - ylim[0], 1e-12)
    groups: dict[tuple[int, int], tuple[float, float, list[str]]] = {}
    for x, y, label in points:
        cell = (round((x - xlim[0]) / spans[0] * cells), round((y - ylim[0]) / spans[1] * cells))
        groups.setdefault(cell, (x, y, []))[2].append(label)
    return [(x, y, ", ".join(labels)) for x, y, labels in groups.values()]


__all__ = [
    "CUDA_HEADING",
    "HEADING",
    "PLOT",
    "REGATED",
    "REGATED_CUDA",
    "VERDICT",
    "cuda_regated",
    "cuda_section",
    "cuda_table",
    "decision_rule",
    "gate_table",
    "merged_labels",
    "plot_candidates",
    "plotted_gates",
    "regate_section",
    "regated",
    "sections",
    "superseded",
    "thresholds",
]
