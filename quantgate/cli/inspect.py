"""`quantgate inspect`: a bundle's manifest as a readable summary, with what `serve` would
pick from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantgate.cli._app import command
from quantgate.cli._bundle import export_notes, fusions
from quantgate.cli._console import out
from quantgate.cli._gates import gate_cells
from quantgate.fsutil import size_said, size_with
from quantgate.tasks import QA_TASKS


@command()
def inspect(
    path: Annotated[
        Path, typer.Argument(metavar="BUNDLE", help="A bundle directory.", show_default=False)
    ],
    verify: Annotated[bool, typer.Option(help="Check every variant's file and sha256.")] = True,
) -> None:
    """Print a readable summary of a bundle's manifest."""
    from rich.table import Table

    from quantgate.bundle import check_files, held_bundles, is_bundle, load
    from quantgate.errors import BundleError

    try:
        b = load(path, verify=False)  # a bundle that cannot be read is refused as it is
    except BundleError as e:
        if path.is_dir() and not is_bundle(path) and held_bundles(path):  # a repository
            raise BundleError(
                f"{e} To see what each model would serve: `quantgate serve {path} --check`."
            ) from e
        raise
    if verify:
        try:
            check_files(b)
        except BundleError as e:  # a file that fails its check: the manifest itself reads
            raise BundleError(f"{e} To read its manifest anyway, pass --no-verify.") from e
    m = b.manifest
    export = m.export
    verdict = "[green]pass[/]" if m.verdict == "pass" else "[bold red]fail[/]"
    out.print(f"[bold]{m.name}[/]  {m.task}  verdict {verdict}  created {m.created}")
    out.print(
        f"source: {m.source.get('kind')} {m.source.get('spec')} ({str(m.source.get('sha256'))[:12]})"
    )
    out.print("tools: " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    regates = [r for r in m.extra.get("regates") or [] if isinstance(r, dict)]
    if regates and isinstance(regates[-1].get("tools"), dict):  # what measured the gates last
        last = regates[-1]
        out.print(
            f"last re-gated {last.get('at')} with "
            + ", ".join(f"{k} {v}" for k, v in last["tools"].items()),
            highlight=False,
            soft_wrap=True,
        )
    tensors = Table("", "name", "dtype", "dims", box=None, title_justify="left")
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for t in specs:
            tensors.add_row(kind, t.name, t.dtype, "(" + ", ".join(map(str, t.dims)) + ")")
    out.print(tensors)
    missing = _missing(b)
    variants = Table(
        "file", "precision", "size", "verdict", "gates", "providers", "recipe", box=None
    )
    for v in m.variants:
        passed = sum(g.passed for g in v.gates)
        variants.add_row(
            v.file,
            v.precision,
            "missing" if v.file in missing else size_said(_size(b.path / v.file)),
            v.verdict,
            f"{passed}/{len(v.gates)} passed",
            ", ".join(v.providers),
            # the candidate that shipped: smooth-static-u8s8+fp32x4 kept 4 nodes FP32
            (v.recipe or {}).get("candidate") or (v.recipe or {}).get("name", ""),
        )
    out.print(variants)
    out.print(_served(m, missing), highlight=False, soft_wrap=True)
    if not verify:
        out.print(
            "files not verified (--no-verify): their sha256 were not checked; serve checks them",
            highlight=False,
            soft_wrap=True,
        )
    if m.files:
        groups: dict[str, int] = {}
        for name in m.files:
            top, sep, _ = name.partition("/")
            groups[top + sep] = groups.get(top + sep, 0) + 1
        listed = ", ".join(f"{g} ({n} files)" if g.endswith("/") else g for g, n in groups.items())
        out.print(
            f"other files (sha256 in the manifest): {listed}", highlight=False, soft_wrap=True
        )
    hf = m.extra.get("huggingface") or {}
    if hf.get("tokenizer"):  # how text becomes its inputs: quantgate.tokenizer
        how = (
            "its tokenizer.json, by the tokenizers library (checked at export to answer as "
            "transformers does)"
            if hf.get("tokenizers")
            else "transformers"
        )
        out.print(f"text is tokenized by {how}", highlight=False, soft_wrap=True)
    if m.task in QA_TASKS:  # how its gates, and infer, read its answers
        out.print(_answers_read(m), highlight=False, soft_wrap=True)
    if not b.report.is_file():
        out.print(f"report: {b.report} is missing", highlight=False, soft_wrap=True)
    if export:
        out.print(
            f"export: {export.get('exporter')} exporter, opset {m.opset}, "
            f"max sequence {m.max_seq_len}"
        )
        for line in _export_lines(export):
            out.print(line, highlight=False, soft_wrap=True)
    gates = [(v.precision, g) for v in m.variants for g in v.gates]
    if gates:
        table = Table("variant", "gate", "value", "threshold", "", box=None)
        for precision, g in gates:
            label, value, _, bound, mark, unsure = gate_cells(g)
            style = "green" if g.passed else "bold red"
            note = " (uncertain)" if unsure else ""
            table.add_row(precision, label, value, bound, f"[{style}]{mark}[/]{note}")
        out.print(table)


def _export_lines(export: dict) -> list[str]:
    """How the bundle was made: the export's notes, its fusions and its validation; in place
    of a record this cannot read, what is wrong with it, in the schema's words. The schema
    checks only what serving reads, so serve loads a bundle whose record of its making is
    damaged, and so the rest of it is shown here."""
    from quantgate.schema import described, validation_problems

    def unread(what: str, problem: str) -> str:
        return f"{what}: not shown: {problem} (`quantgate export` writes it anew)"

    strings = [
        f"export.{k}: expected a list of strings, found {described(export[k])}"
        for k in ("attempts", "tracer_notes")
        if not _strings(export.get(k, []))
    ]
    lines = [unread("export notes", strings[0])] if strings else export_notes(export)
    if isinstance(export.get("fusions", {}), dict):
        lines.append(f"fusions: {fusions(export)}")
    else:
        found = described(export["fusions"])
        lines.append(unread("fusions", f"export.fusions: expected an object, found {found}"))
    val = export.get("validation")
    if val and (problems := validation_problems(val)):
        lines.append(unread("validation", problems[0]))
    elif val:
        shapes = ", ".join(
            f"{c['batch']}x{c['sequence']}" + ("p" if c["padded_rows"] else "")
            for c in val["cases"]
        )
        diffs = ", ".join(f"{k} {d:.1e}" for k, d in val["max_abs_diff"].items())
        lines.append(f"validation: max abs diff {diffs} at shapes {shapes} (p: padded rows)")
    return lines


def _strings(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _answers_read(m) -> str:
    """How a question answerer's answers are read (its last gating's settings): what its span
    gates judged and `quantgate infer` prints."""
    from quantgate.quantize.regating import DEFAULT_GATES, recorded_gate_config

    cfg = recorded_gate_config(m)
    if cfg is None:
        cfg, since = DEFAULT_GATES, " (not gated: the defaults)"
    else:
        since = " (its last gating's settings)"
    none = "or none (SQuAD 2.0: --null-answer)" if cfg.null_answer else "never none"
    return f"answers: a span of at most {cfg.max_answer_tokens} tokens, {none}{since}"


def _missing(b) -> list[str]:
    """The files ``b``'s manifest lists (its variants', and the others) that are not there,
    or not files: a check of names, not of sha256, that --no-verify still makes. Serve
    refuses a bundle that lacks any of them, whichever variant it would pick."""
    m = b.manifest
    return [f for f in (*(v.file for v in m.variants), *m.files) if not (b.path / f).is_file()]


def _served(m, missing: list[str]) -> str:
    """Which variant `quantgate serve` would pick on each provider (serve.variants'
    rule), or that it refuses the bundle (``missing`` files, or a failed gate)."""
    from quantgate.bundle import CPU, CUDA, PASS
    from quantgate.errors import BundleError
    from quantgate.serve.variants import choose_variant

    if missing:
        gone = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        one = len(missing) == 1
        return (
            f"serve: refuses it: {gone} {'is' if one else 'are'} missing (restore "
            f"{'it' if one else 'them'} from the original bundle, or re-create the bundle with "
            "`quantgate export`)"
        )
    picks = []
    for provider, name in ((CPU, "CPU"), (CUDA, "CUDA")):
        try:  # quiet: its reasons are for the server's log
            v = choose_variant(m, provider, allow_failed=True, quiet=True)
            picks.append(f"{v.precision} on {name}")
        except BundleError:
            picks.append(f"nothing on {name}")
    chosen = ", ".join(picks)
    if m.verdict != PASS:
        return f"serve: refuses it (a gate failed); with --allow-failed-gates: {chosen}"
    return f"serve picks: {chosen}"


def _size(model: Path) -> int:
    """Bytes of the model at ``model`` with the weights it keeps beside it (0: missing)."""
    from quantgate import onnxfiles

    if not model.is_file():
        return 0
    try:
        beside = onnxfiles.external_locations(model)
    except Exception:  # noqa: BLE001 - not ONNX (a damaged file: --check says so): its own size
        beside = []
    return size_with(model, beside)
