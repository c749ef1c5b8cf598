"""PyTorch -> ONNX FP32 with dynamic batch and sequence axes, by either of torch's exporters."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch

from quantgate.bundle import TensorSpec
from quantgate.errors import ExportError
from quantgate.export.config import Exporter
from quantgate.export.validation import BATCH, SEQUENCE, Case
from quantgate.model.loaders import LoadedModel

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MIN_DYNAMO_OPSET = 18  # torch.export's ONNX translator starts at opset 18


def export_legacy(
    model: LoadedModel, path: Path, *, example: Case, outputs: Sequence[TensorSpec], opset: int
) -> None:
    """TorchScript tracing, with the axes named in ``dynamic_axes``."""
    axes = {n: {0: BATCH, 1: SEQUENCE} for n in model.input_names}
    for spec in outputs:
        axes[spec.name] = {d: v for d, v in enumerate(spec.dims) if isinstance(v, str)}
    with _quiet():
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


def export_dynamo(
    model: LoadedModel, path: Path, *, example: Case, outputs: Sequence[TensorSpec], opset: int
) -> None:
    """torch.export + onnxscript, with the axes declared as ``torch.export.Dim``."""
    # torch logs a warning per torchvision op it cannot register; they are not ours to fix.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim(BATCH)
    seq = torch.export.Dim(SEQUENCE, max=model.max_seq_len)
    with _quiet():
        program = torch.onnx.export(
            model.module,
            _args(model, example),
            input_names=list(model.input_names),
            output_names=[o.name for o in outputs],
            # One entry: TupleOutputs takes its inputs as *tensors, a single parameter.
            dynamic_shapes=(tuple({0: batch, 1: seq} for _ in model.inputs),),
            opset_version=max(opset, MIN_DYNAMO_OPSET),
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))


EXPORTERS: dict[Exporter, Callable[..., None]] = {
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
) -> None:
    """Export ``model`` to ``path``; any failure becomes one ``ExportError`` naming the cause."""
    log.info("exporting %s with the %s exporter (opset %d)", model.spec, exporter.value, opset)
    try:
        EXPORTERS[exporter](model, path, example=example, outputs=outputs, opset=opset)
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - exporters raise anything from deep inside torch
        log.info("the %s exporter failed", exporter.value, exc_info=True)  # shown by -v
        raise ExportError(
            f"the {exporter.value} exporter failed on {model.spec}: {_last_line(e)}. "
            "The model's forward must be traceable: tensor operations only, no Python values "
            "computed from tensor data. Run `quantgate -v export ...` for the full trace."
        ) from e


def opset_of(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def _args(model: LoadedModel, example: Case) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(example.feeds[n]) for n in model.input_names)


@contextlib.contextmanager
def _quiet():
    """Keep the exporters' own chatter (progress prints, tracer warnings) out of the CLI."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        yield
    for w in {str(w.message).splitlines()[0] for w in caught}:
        log.debug("exporter warning: %s", w)


def _last_line(e: BaseException) -> str:
    """The root cause in one line: torch wraps the real error in several layers of advice."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ANSI.sub("", s).strip() for s in str(e).strip().splitlines()]
    first = next((s for s in lines if s), "")
    return f"{type(e).__name__}: {first[:300]}"
