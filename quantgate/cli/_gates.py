"""What `export` and `gate` share: the gate threshold flags and the GateConfig they make,
and the gates as the console prints them (`inspect`'s table prints ``gate_cells`` too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantgate.cli._console import out
from quantgate.errors import QuantgateError

# Gate thresholds shared by `export` and `gate`; None: the config file's, else GateConfig's.
# The defaults are written into the help, as export's QuantConfig ones are (--search-budget,
# --max-candidates): reading them would import quantgate.quantize into every command, the
# server's too. tests/test_cli.py checks them against the configs.
MaxDrop = Annotated[
    float | None,
    typer.Option(
        metavar="POINTS",
        help="Accuracy gate: largest drop in points of the task metric [default: 1].",
    ),
]
MinSpeedup = Annotated[
    float | None,
    typer.Option(metavar="RATIO", help="Speed gate: INT8 vs FP32 at every shape [default: 1.2]."),
]
COSINE_HELP = "Fidelity: mean cosine vs FP32 of an embedding and of every other float output"
TOP1_HELP = "Fidelity: top-1 / nearest-neighbour / batch agreement with FP32"
MinCosine = Annotated[
    float | None, typer.Option(metavar="COSINE", help=COSINE_HELP + " [default: 0.99].")
]
MinTop1 = Annotated[
    float | None, typer.Option(metavar="RATE", help=TOP1_HELP + " [default: 0.95].")
]


NULL_HELP = (
    "A question answerer may answer nothing (a SQuAD 2.0 model): where the first token's span "
    "([CLS]) scores above every span of the context, as run_qa.py's version_2 rule; its span "
    "gates and `quantgate infer` read answers so"
)
MAX_TOKENS_HELP = "A question answerer's longest answer, in tokens, for its span gates and infer"
NullAnswer = Annotated[
    bool | None,
    typer.Option(
        "--null-answer/--no-null-answer", help=NULL_HELP + " [default: no].", show_default=False
    ),
]
MaxAnswerTokens = Annotated[
    int | None, typer.Option(metavar="N", help=MAX_TOKENS_HELP + " [default: 30].")
]


def kept_option(what: str, metavar: str):
    """A threshold flag of `quantgate gate`, whose default is the bundle's own."""
    return typer.Option(
        metavar=metavar, help=what + " [default: the one the bundle was last gated with]."
    )


GateFile = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="TOML or JSON file of gate settings (flags override it)."),
]


def gate_flags(
    max_accuracy_drop, min_speedup, min_cosine, min_top1, null_answer=None, max_answer_tokens=None
) -> dict:
    """{GateConfig field: (its flag, the value given or None)}."""
    return {
        "max_accuracy_drop": ("--max-accuracy-drop", max_accuracy_drop),
        "min_speedup": ("--min-speedup", min_speedup),
        "min_cosine": ("--min-cosine", min_cosine),
        "min_top1_agreement": ("--min-top1", min_top1),
        "null_answer": ("--null-answer", null_answer),
        "max_answer_tokens": ("--max-answer-tokens", max_answer_tokens),
    }


def read_gate_config(file, flags: dict):
    """The defaults, then the --gate-config file's settings, then the flags given."""
    from quantgate.errors import ConfigError
    from quantgate.quantize.decide import GateConfig

    overrides = {name: value for name, (_, value) in flags.items()}
    try:
        if file is not None:
            return GateConfig.from_file(file, **overrides)
        return GateConfig().with_overrides(**overrides)
    except ConfigError as e:
        if said := gate_config_error(e, flags, file):
            raise said from e
        raise


def gate_config_error(e, flags: dict, file: Path | None):
    """GateConfig's ConfigError ``e`` as the command line says it: refused values named by
    their flags or the --gate-config file (``named_by_flags``), and the file's own faults (not
    found, not TOML, unknown settings: GateConfig.from_file's, which start with its path) by
    the flag that gave it. None where ``e`` says it already."""
    from quantgate.errors import ConfigError

    if e.problems:
        return named_by_flags(e.problems, flags, file)
    if file is not None and str(e).startswith(str(file)):
        return ConfigError(f"--gate-config {e}")
    return None


def named_by_flags(problems: tuple[tuple[str, str], ...], flags: dict, file: Path | None):
    """GateConfig's ConfigError for ``problems`` (its fields' refused values) with each
    value named by the flag the user typed, else by the --gate-config file that gave it, as
    the file's other errors are."""
    from quantgate.errors import ConfigError

    given = {name: flag for name, (flag, value) in flags.items() if value is not None}

    def named(name: str, what: str) -> str:
        if name in given:
            return f"{given[name]} {what}"
        return f"{name} {what}" if file is None else f"--gate-config {file}: {name} {what}"

    if file is not None and not given.keys() & {name for name, _ in problems}:
        # all the file's: one line, as its other errors are
        listed = "; ".join(f"{name} {what}" for name, what in problems)
        return ConfigError(f"--gate-config {file}: {listed}", problems)
    if file is not None and len(problems) == 1:  # the flag's
        return ConfigError(named(*problems[0]), problems)
    listed = "\n".join(f"  - {named(name, what)}" for name, what in problems)
    return ConfigError(f"invalid gate config:\n{listed}", problems)


def gate_cells(g) -> tuple[str, str, str, str, str, bool]:
    """A gate as `export`, `gate` and `inspect` print it: its label, value, interval ("" where
    it has none), op and threshold, "pass" or "FAIL", and whether another sample could have
    decided it the other way (``decide.uncertain``)."""
    from quantgate.quantize.decide import failed_by_bound, uncertain

    ci = f"[{g.ci[0]:.4g}, {g.ci[1]:.4g}]" if g.ci else ""
    mark = "pass" if g.passed else "FAIL"
    if bound := failed_by_bound(g):  # "0 <= 0.02: FAIL" needs its reason
        mark += f" (its {bound} is not {g.op} {g.threshold:g}: ci_rule upper)"
    return g.label, f"{g.value:.4g}", ci, f"{g.op} {g.threshold:g}", mark, uncertain(g)


def print_gates(path: Path) -> None:
    """The bundle's verdict and the gates of every variant but FP32, on stdout."""
    from quantgate.bundle import load
    from quantgate.quantize.speed import BUSY

    try:
        m = load(path, verify=False).manifest
    except QuantgateError:
        return
    out.print(f"bundle {path}: verdict {m.verdict}", highlight=False, soft_wrap=True)
    for v in m.variants:
        if v.precision == "fp32":
            continue
        out.print(
            f"  {v.file} ({v.notes or v.precision}): {v.verdict}", highlight=False, soft_wrap=True
        )
        for g in v.gates:
            label, value, ci, bound, mark, unsure = gate_cells(g)
            if unsure:
                mark += " (uncertain: its interval crosses the threshold)"
            ci = f" {ci}" if ci else ""
            out.print(f"    {label} {value}{ci} {bound}: {mark}", highlight=False, soft_wrap=True)
        if any(g.is_speed and BUSY in g.detail for g in v.gates):
            out.print(
                "    (speed timed while the machine was busy, its detail says how: the "
                "speedups may not reproduce; time it again on a quiet one)",
                highlight=False,
                soft_wrap=True,
            )
    out.print(
        f"  report: {path / 'report.md'} (how each gate was measured; what each means: "
        'docs/quantize.md, "Gates")',
        highlight=False,
        soft_wrap=True,
    )
