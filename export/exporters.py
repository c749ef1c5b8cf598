"""PyTorch -> ONNX FP32 with dynamic batch and sequence axes, by either of torch's exporters."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import linecache
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
import torch

from quantgate import onnxfiles
from quantgate.bundle import TensorSpec
from quantgate.errors import ExportError
from quantgate.export.config import Exporter
from quantgate.export.validation import BATCH, SEQUENCE, Case, warnings_logged
from quantgate.model.loaders import LoadedModel
from quantgate.quiet import (
    GLOBAL_STATE,
    logger_silenced,
    native_stdout_captured,
    stderr_captured,
    stdout_captured,
)

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MIN_DYNAMO_OPSET = 18  # torch.export's ONNX translator starts at opset 18
# The tracer's warnings that a value computed from a tensor became a Python constant
TRACER_CONSTANT = ("Converting a tensor to a ", "Iterating over a tensor")
# The library code whose tracer warnings are not the user's to act on (checked by its
# authors against tracing: shape checks, scales from a fixed head size)
LIBRARIES = ("torch", "transformers", "quantgate")
# Where torch.export names the user's line behind a data-dependent guard
RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+)')
MAX_NOTES = 3


def export_legacy(
    model: LoadedModel, path: Path, *, example: Case, outputs: Sequence[TensorSpec], opset: int
) -> tuple[str, ...]:
    """TorchScript tracing, with the axes named in ``dynamic_axes``. Returns where the tracer
    turned a tensor into a Python value in the model's own code (``tracer_notes``)."""
    axes = {n: {0: BATCH, 1: SEQUENCE} for n in model.input_names}
    for spec in outputs:
        axes[spec.name] = {d: v for d, v in enumerate(spec.dims) if isinstance(v, str)}
    # its TorchScript graph, printed from C++ where it fails: 20-odd lines before the reason
    printed = io.StringIO()
    try:
        with _quiet() as caught, native_stdout_captured() as printed:
            torch.onnx.export(
                model.module,
                _args(model, example),
                str(path),
                input_names=list(model.input_names),
                output_names=[o.name for o in outputs],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:  # filled once the capture has ended
        if text := printed.getvalue().strip():
            log.debug("the legacy exporter printed:\n%s", text)
    return tracer_notes(caught)


def export_dynamo(
    model: LoadedModel, path: Path, *, example: Case, outputs: Sequence[TensorSpec], opset: int
) -> tuple[str, ...]:
    """torch.export + onnxscript, with the axes declared as ``torch.export.Dim``."""
    batch = torch.export.Dim(BATCH)
    seq = torch.export.Dim(SEQUENCE, max=model.max_seq_len)
    with (
        _quiet(),
        # a warning per torchvision op torch cannot register: not ours to fix
        logger_silenced("torch.onnx._internal.exporter._registration"),
        # a model it cannot trace (Longformer's): a warning, and the whole partial FX graph
        # printed to stderr, 300 lines; the export says which exporter failed, and why
        logger_silenced("torch.fx.experimental.symbolic_shapes"),
        stderr_captured() as printed,
    ):
        try:
            program = torch.onnx.export(
                model.module,
                _args(model, example),
                # Placeholder names, the model's given once the graph is made: the
                # exporter names its values after their ops ("embedding", "div"), and an
                # output of such a name failed its SSA check (pytorch/pytorch#158094)
                input_names=[f"{_PLACEHOLDER}in{i}" for i in range(len(model.input_names))],
                output_names=[f"{_PLACEHOLDER}out{i}" for i in range(len(outputs))],
                # One entry: TupleOutputs takes its inputs as *tensors, a single parameter.
                dynamic_shapes=(tuple({0: batch, 1: seq} for _ in model.inputs),),
                opset_version=max(opset, MIN_DYNAMO_OPSET),
                dynamo=True,
                verbose=False,
            )
        finally:
            if text := printed.getvalue().strip():
                log.debug("the dynamo exporter printed to stderr:\n%s", text)
        assert program is not None  # dynamo=True returns the program
        graph = program.model.graph
        _name(graph, graph.inputs, model.input_names)
        _name(graph, graph.outputs, [o.name for o in outputs])
        program.save(str(path))
    return ()  # torch.export refuses a data-dependent value (or keeps it symbolic)


_PLACEHOLDER = "quantgate_placeholder_"


def _name(graph, values: Sequence, names: Sequence[str]) -> None:
    """Give ``values`` (a dynamo graph's inputs or outputs, ``onnx_ir`` values) their
    ``names``, first renaming any other value of the graph, its subgraphs' included, that
    holds one of them (``names`` unique: the model's inputs and outputs are checked so)."""
    import onnx_ir as ir

    others = [*graph.inputs, *graph.initializers.values()]
    others += [v for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs]
    taken = {v.name for v in others} | set(names)  # a fresh name is none of these
    for value in others:
        if value.name in names and not any(value is v for v in values):
            n = 1
            while f"{value.name}_{n}" in taken:
                n += 1
            value.name = f"{value.name}_{n}"
            taken.add(value.name)
    for value, name in zip(values, names, strict=True):
        value.name = name


EXPORTERS: dict[Exporter, Callable[..., tuple[str, ...]]] = {
    Exporter.LEGACY: export_legacy,
    Exporter.DYNAMO: export_dynamo,
}


def to_onnx(
    model: LoadedModel,
    path: Path,
    *,
    exporter: Exporter,
    example: Case,
    outputs: Sequence[TensorSpec],
    opset: int,
) -> tuple[str, ...]:
    """Export ``model`` to ``path``; any failure becomes one ``ExportError`` naming the cause.

    Returns the tracer's notes (``tracer_notes``): places in the model's code where the
    legacy exporter fixed a value computed from a tensor as a constant of the graph.
    """
    log.info("exporting %s with the %s exporter (opset %d)", model.spec, exporter.value, opset)
    try:
        notes = EXPORTERS[exporter](model, path, example=example, outputs=outputs, opset=opset)
        onnx.checker.check_model(str(path))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in (
            "onnxscript",
            "onnx",
            "onnx_ir",
        ):  # not the model's fault
            raise ExportError(
                f"the {exporter.value} exporter needs {e.name}, which is not installed: it "
                "comes with the `export` extra (pip install 'quantgate[export]')"
            ) from e
        raise _failed(exporter, model, e) from e
    except Exception as e:  # noqa: BLE001 - exporters raise anything from deep inside torch
        raise _failed(exporter, model, e) from e
    onnxfiles.gather(path)  # past 2 GB, torch wrote a file per weight (a full disk: not its fault)
    return notes


def _failed(exporter: Exporter, model: LoadedModel, e: Exception) -> ExportError:
    """The ``ExportError`` for an exporter's failure ``e``, with advice for its cause."""
    log.info("the %s exporter failed", exporter.value, exc_info=e)  # shown by -v
    return ExportError(
        f"the {exporter.value} exporter failed on {model.spec}: {_last_line(e)}. "
        f"{_advice(e)} Run `quantgate -v export ...` for the full trace."
    )


def tracer_notes(caught: Sequence[warnings.WarningMessage]) -> tuple[str, ...]:
    """Where tracing turned a tensor into a Python value (``if mask.any():``, ``int(n)``,
    ``math.sqrt(x.size(-1))``) in code outside torch, transformers and quantgate: the graph
    holds the value the example batch gave there. Harmless for a size that never changes
    (a head's width); wrong for anything computed from the data or the sequence length,
    where validation at other shapes and rows is the only check. One note per line, as
    ``file:line `code` (what the tracer said)``, at most ``MAX_NOTES`` and a count."""
    tracer = getattr(torch.jit, "TracerWarning", Warning)
    libraries = _library_dirs()
    checked: set[tuple[str, int]] = set()  # places already looked at, kept or not
    seen: dict[tuple[str, int], str] = {}
    for w in caught:
        text = str(w.message)
        if not (issubclass(w.category, tracer) and text.startswith(TRACER_CONSTANT)):
            continue
        place = (w.filename, w.lineno)
        if place in checked:
            continue
        checked.add(place)
        where = Path(w.filename).resolve()
        if any(where.is_relative_to(d) for d in libraries):
            continue
        seen[place] = text.split(" might ")[0].replace("Converting a tensor to", "tensor to")
    notes = [f"{_code_at(f, n)} ({what})" for (f, n), what in seen.items()]
    if len(notes) > MAX_NOTES:
        notes = notes[:MAX_NOTES] + [f"... and {len(notes) - MAX_NOTES} more place(s)"]
    return tuple(notes)


def tracer_advice(notes: Sequence[str], *, dynamo_untried: bool = True) -> str:
    """What the tracer's notes mean for a user, in one paragraph; ``dynamo_untried``: the
    dynamo exporter is still to suggest (it was not tried, nor is it next)."""
    return (
        "the legacy exporter's tracer fixed values computed from tensors as constants at "
        + "; ".join(notes)
        + ". The graph keeps what the example batch gave there (the branch it took, the "
        "length it had): check that it depends on neither the data nor the sequence length "
        "(unpacking an axis of a fixed size, q, k, v = qkv.unbind(0), depends on neither). "
        "Where it does, compute it with tensor operations (torch.where, a mask) instead"
        + (", or export with --exporter dynamo." if dynamo_untried else ".")
    )


def _library_dirs() -> set[Path]:
    dirs: set[Path] = set()
    for name in LIBRARIES:
        spec = importlib.util.find_spec(name)
        for d in (spec.submodule_search_locations or []) if spec else []:
            dirs.add(Path(d).resolve())
    # quantgate's subpackages live in folders of their own (model/, export/, ...)
    for name, mod in list(sys.modules.items()):
        if name.startswith("quantgate.") and (file := getattr(mod, "__file__", None)):
            dirs.add(Path(file).resolve().parent)
    return dirs


def _code_at(file: str, line: int, *, sep: str = " ") -> str:
    """``name.py:line `code``` for a place in the source (``?`` where it cannot be read);
    ``sep`` goes between the line number and the code."""
    return f"{Path(file).name}:{line}{sep}`{linecache.getline(file, line).strip() or '?'}`"


def _advice(e: BaseException) -> str:
    """What to change in the model for the failure ``e`` (its root cause)."""
    root = _root(e)
    text = ANSI.sub("", str(root))
    name = type(root).__name__
    if isinstance(root, OSError) and root.errno is not None:  # the system's, not the model's
        return (
            f"Writing or reading the export's files failed ({root.strerror or root}): the "
            "working directory is under $TMPDIR; check its filesystem (free space, a file size "
            "limit: ulimit -f) or point TMPDIR elsewhere."
        )
    if name == "UnsupportedOperatorError" or "No ONNX function found" in text:
        return (
            "An operator in forward has no ONNX translation: replace it with operators ONNX "
            "has, or compute it outside the model."
        )
    if "data-dependent" in text or name.startswith("GuardOnDataDependent"):
        at = RAISED_AT.search(text)
        line = ""
        if at:
            line = f" (at {_code_at(at.group(1), int(at.group(2)), sep=': ')})"
        return (
            f"forward decides something in Python from the values of a tensor{line}: an `if` "
            "on tensor data, or a length read with int() or .item(). Compute it with tensor "
            "operations (torch.where, a mask) so that the graph holds it for every input."
        )
    return (
        "The model's forward must be traceable: tensor operations only, no Python values "
        "computed from tensor data."
    )


def opset_of(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _args(model: LoadedModel, example: Case) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(example.feeds[n]) for n in model.input_names)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Keep the exporters' own chatter (progress prints, tracer warnings) out of the CLI;
    yields the warnings caught, for ``tracer_notes``."""
    # warnings_logged outermost: stdout is restored before the warnings are logged. Held
    # throughout: torch's exporters keep process-global state (quantgate.quiet)
    with (
        GLOBAL_STATE,
        warnings_logged("exporter warning", level=logging.DEBUG, logger=log) as caught,
        stdout_captured(),
    ):
        yield caught


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _last_line(e: BaseException) -> str:
    """The root cause in one line: torch wraps the real error in several layers of advice."""
    e = _root(e)
    lines = [ANSI.sub("", s).strip() for s in str(e).strip().splitlines()]
    first = next((s for s in lines if s), "")
    return f"{type(e).__name__}: {first[:300]}"
