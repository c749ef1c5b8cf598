"""Numeric validation: PyTorch against ONNX Runtime on real samples at several shapes.

The checks run in optimum's order — input and output names, then shapes, then values
against ``atol + rtol * |torch|`` — and every failure is collected before one
``ValidationError`` lists them all. A failure is never downgraded to a warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate import cpus
from quantgate.bundle import CPU, TensorSpec
from quantgate.errors import ExportError, ModelLoadError, ValidationError
from quantgate.model.loaders import InputSpec, LoadedModel, Samples
from quantgate.padding import MASK, sequence_axis
from quantgate.quiet import warnings_caught

log = logging.getLogger(__name__)


BATCH, SEQUENCE = "batch", "sequence"
Feeds = dict[str, np.ndarray]
TorchOutputs = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Case:
    """One validation shape: a named batch of real rows, as ONNX Runtime feeds."""

    name: str  # "batch 1", "batch 8", "longest", "shortest", "padded"
    feeds: Feeds
    padded_rows: int = 0  # rows whose attention stops before the sequence does
    # padded on the left (a client's tokenizer may pad so; the server pads on the right):
    # checked against PyTorch on the same rows, not against the rows alone
    left: bool = False

    @property
    def batch(self) -> int:
        return next(iter(self.feeds.values())).shape[0]

    @property
    def sequence(self) -> int:
        return next(iter(self.feeds.values())).shape[1]

    def describe(self) -> str:
        pad = f", {self.padded_rows} rows padded" if self.padded_rows else ""
        return f"{self.name} (batch {self.batch}, sequence {self.sequence}{pad})"


@dataclass(frozen=True)
class CaseResult:
    case: str
    batch: int
    sequence: int
    padded_rows: int
    max_abs_diff: dict[str, float]  # per output
    # per output, the largest |ort - torch| / (atol + rtol * |torch|): passing means <= 1
    tolerance_used: dict[str, float]


@dataclass(frozen=True)
class ValidationReport:
    """What validating one ONNX file measured; it exists only when every check passed."""

    model: str  # the validated file's name
    atol: float
    rtol: float
    cases: tuple[CaseResult, ...]

    @property
    def max_abs_diff(self) -> dict[str, float]:
        """Per output, the largest difference over every case."""
        return self._worst("max_abs_diff")

    @property
    def tolerance_used(self) -> dict[str, float]:
        """Per output, the largest fraction of the tolerance used over every case."""
        return self._worst("tolerance_used")

    def _worst(self, field: str) -> dict[str, float]:
        worst: dict[str, float] = {}
        for c in self.cases:
            for name, d in getattr(c, field).items():
                worst[name] = max(worst.get(name, 0.0), d)
        return worst

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_diff": self.max_abs_diff,
            "cases": [asdict(c) for c in self.cases],
        }


def build_cases(model: LoadedModel, *, mid_batch: int = 8) -> list[Case]:
    """Batch 1, a middle batch, the longest and the shortest sequence, lengths between
    them, and padded rows: on the right, as the server pads, and on the left, as a
    client's tokenizer may (``padding_side="left"``).

    "Longest" is the model's ``max_seq_len``, the longest sequence the bundle says it takes.
    Samples narrower than that (a factory's ``example_inputs`` of 20 tokens for a model
    declaring 128) are stretched to it by repeating each row's real tokens
    (``stretch``): a graph that only holds up to the example's width (a length traced as
    a constant, a position table shorter than declared) would otherwise pass validation
    and fail, or answer wrongly, in serving. The lengths between (2, a quarter and a half
    of the longest: ``_between``) find a branch on the sequence's length that the trace kept
    one side of: a model pooling rows of more than 8 tokens one way and shorter ones
    another agreed at lengths 1, 11 and 64, and was served wrong at 2 to 8.
    """
    s = model.samples
    longest = model.max_seq_len
    long = stretch(s, longest) if longest > s.width else s
    typical = int(np.clip(np.median(s.lengths), 1, min(longest, s.width)))
    seen = {1, typical, longest}
    spread = sorted(set(_between(longest)) - seen)
    return [
        _case("batch 1", s, model.inputs, batch=1, seq=typical),
        _case(f"batch {mid_batch}", s, model.inputs, batch=mid_batch, seq=typical),
        _case("longest", long, model.inputs, batch=2, seq=longest),
        _case("shortest", s, model.inputs, batch=2, seq=1),
        *(_case(f"sequence {n}", long, model.inputs, batch=2, seq=n) for n in spread),
        # its 4 rows at the longest length bound validation's memory (huggingface's
        # VALIDATION_ROWS sizes the default length by them)
        _padded_case("padded", long, model.inputs, batch=4, seq=longest),
        # a fused attention that took the mask for a count of leading tokens answered rows
        # padded on the left wrongly (cosine 0.37 on all-MiniLM-L6-v2), and passed the rest
        _padded_case("padded on the left", s, model.inputs, batch=4, seq=typical, left=True),
    ]


def _between(longest: int) -> tuple[int, ...]:
    """The lengths between the shortest and the longest that validation runs too."""
    return tuple(n for n in (2, longest // 4, longest // 2) if 1 < n < longest)


def stretch(samples: Samples, width: int) -> Samples:
    """``samples`` widened to ``width`` tokens: each row's real tokens (its first
    ``length`` positions: right padding, as every validation case assumes) repeated until
    the row is full, in every input alike. ``source`` is kept as it was:
    ``ExportResult.samples_used`` describes the stretching from the cases."""
    lengths = np.maximum(samples.lengths.astype(np.int64), 1)  # (N,)
    idx = np.arange(width)[None, :] % lengths[:, None]  # (N, width): position to copy
    arrays = {}
    for name, a in samples.arrays.items():
        take = idx.reshape(idx.shape + (1,) * (a.ndim - 2))  # broadcast over fixed dims
        arrays[name] = np.take_along_axis(a, take, axis=1)
    return Samples(arrays, np.full(len(lengths), width), samples.source)


def _rows(samples: Samples, batch: int, seq: int) -> list[int]:
    """Rows with at least ``seq`` real tokens (repeated if too few), else the longest rows."""
    fit = [i for i, n in enumerate(samples.lengths) if n >= seq]
    if not fit:
        fit = list(np.argsort(-samples.lengths, kind="stable"))
    return [int(fit[k % len(fit)]) for k in range(batch)]


def _case(name: str, s: Samples, inputs: Sequence[InputSpec], *, batch: int, seq: int) -> Case:
    idx = _rows(s, batch, seq)
    return Case(name, {i.name: np.ascontiguousarray(s.arrays[i.name][idx, :seq]) for i in inputs})


def _padded_case(
    name: str, s: Samples, inputs: Sequence[InputSpec], *, batch: int, seq: int, left: bool = False
) -> Case:
    """Rows of decreasing real length padded to ``seq``, as a tokenizer pads a batch: on the
    right, or with ``left`` on the left (each row's first tokens moved to its end)."""
    case = _case(name, s, inputs, batch=batch, seq=seq)
    lengths = np.linspace(seq, max(1, seq // 4), batch).round().astype(int)
    for i in inputs:
        a = case.feeds[i.name]
        for row, n in enumerate(lengths):
            if left:
                a[row, seq - n :] = a[row, :n].copy()
                a[row, : seq - n] = i.pad_value
            else:
                a[row, n:] = i.pad_value
    return Case(name, case.feeds, padded_rows=int((lengths < seq).sum()), left=left)


def reference_outputs(model: LoadedModel, cases: Sequence[Case]) -> list[TorchOutputs]:
    """PyTorch's outputs for every case: the ground truth the ONNX files must match."""
    import torch

    refs = []
    # the model's own warnings (torch's prototype notices...), logged once for every case
    with torch.no_grad(), warnings_logged("the model warned"):
        for case in cases:
            args = [torch.from_numpy(case.feeds[n]) for n in model.input_names]
            try:
                out = model.module(*args)
            except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                if "more than 1 value per channel" in str(e):  # BatchNorm's, on one row
                    raise ExportError(
                        f"the model's forward failed in PyTorch on validation case "
                        f"{case.describe()}: {type(e).__name__}: {str(e).rstrip('.')}. The "
                        "server runs a lone request as a batch of one: batch statistics (a "
                        "BatchNorm in training mode, or built with track_running_stats=False) "
                        "cannot answer it, and would make each row's answer depend on its "
                        "batch-mates. Put the module in eval mode with running statistics, or "
                        "normalize each row alone (LayerNorm)."
                    ) from e
                raise ExportError(
                    f"the model's forward failed in PyTorch on validation case {case.describe()}: "
                    f"{type(e).__name__}: {str(e).rstrip('.')}. Exported models must accept "
                    f"every batch size and sequence length up to {model.max_seq_len}, the "
                    f"model's max_seq_len ({_whence_max_seq_len(model.kind)}; --max-seq-len "
                    "lowers it). Dimension 1 of every input is read as the sequence: a model whose "
                    "dimension 1 is of a fixed size (a fixed window, an image's channels) pads "
                    "its input to that size inside forward, or is not one quantgate exports."
                ) from e
            if len(out) != len(model.outputs):
                raise ExportError(
                    f"the model returned {len(out)} outputs; expected {len(model.outputs)} "
                    f"({', '.join(model.outputs)})"
                )
            named = list(zip(model.outputs, out, strict=True))
            if odd := [(n, type(t).__name__) for n, t in named if not isinstance(t, torch.Tensor)]:
                tensors = [n for n, t in named if isinstance(t, torch.Tensor)]
                raise ExportError(
                    "the model's forward returned "
                    + ", ".join(f"{n!r} as {'None' if k == 'NoneType' else k}" for n, k in odd)
                    + " among its outputs; expected only tensors (a tensor, a tuple of tensors "
                    "or a dict of tensors). Return Python values as tensors, or leave them out"
                    + (
                        f" (where forward returns a dict or a dataclass, output_names = "
                        f"{tensors!r} on the module keeps only those)"
                        if tensors
                        else ""
                    )
                    + "."
                )
            arrays = tuple(t.detach().numpy() for t in out)
            if nan := [
                f"{name} ({int(np.isnan(a).sum())} of {a.size} values)"
                for name, a in zip(model.outputs, arrays, strict=True)
                if a.dtype.kind in "fc" and np.isnan(a).any()
            ]:
                raise ExportError(
                    f"the model's forward gives NaN in PyTorch on validation case "
                    f"{case.describe()}: {', '.join(nan)}. The model is broken on real input, "
                    "and an export cannot be checked against NaN; fix the model first."
                )
            refs.append(arrays)
        _check_repeats(model, cases[0], refs[0])
    return refs


def _check_repeats(model: LoadedModel, case: Case, ref: TorchOutputs) -> None:
    """ExportError where PyTorch answers ``case`` otherwise a second time: no graph can
    match a model that does not match itself (a ``F.dropout(x, p)`` left on, which
    ``eval()`` does not turn off; a random draw in forward), and its mismatches were told
    as the export's, or as its padding's."""
    import torch

    args = [torch.from_numpy(case.feeds[n]) for n in model.input_names]
    again = tuple(t.detach().numpy() for t in model.module(*args))
    moved = [  # beyond float error: a thread pool may sum in another order
        name for name, a, b in zip(model.outputs, ref, again, strict=True)
        if not (np.allclose(a, b, rtol=1e-5, atol=1e-6) if a.dtype.kind == "f"
                else np.array_equal(a, b))
    ]  # fmt: skip
    if moved:
        raise ExportError(
            f"the model answers validation case {case.describe()} otherwise each time it runs "
            f"in PyTorch ({', '.join(moved)} moved between two runs of the same input): it "
            "draws at random in forward, with the module in eval mode. A dropout called as "
            "F.dropout(x, p) stays on (pass training=self.training, or use nn.Dropout); no "
            "exported graph can match a model that does not match itself."
        )


def check_rows_alone(
    model: LoadedModel, cases: Sequence[Case], refs: Sequence[TorchOutputs]
) -> None:
    """ExportError where a row of the middle batch (``cases[1]``, rows of one width) is
    answered otherwise alone than in its batch: the server batches requests of different
    clients, and each would change the others' answers. Batch statistics do it (a BatchNorm
    in training mode, or built with track_running_stats=False), and the padding check said
    it was the padding. After ``check_batched``: a row is a slice of axis 0."""
    import torch

    case, ref = cases[1], refs[1]
    moved: dict[str, float] = {}
    for row in range(case.batch):
        args = [torch.from_numpy(case.feeds[n][row : row + 1]) for n in model.input_names]
        try:
            with torch.no_grad(), warnings_logged("the model warned"):
                alone = tuple(t.detach().numpy() for t in model.module(*args))
        except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
            raise ExportError(
                f"the model's forward failed in PyTorch on row {row} of validation case "
                f"{case.describe()} run alone: {type(e).__name__}: {str(e).rstrip('.')}. The "
                "server runs a lone request as a batch of one (a BatchNorm in training mode "
                "fails so: it needs more than one row)"
            ) from e
        for name, a, r in zip(model.outputs, alone, ref, strict=True):
            r = r[row : row + 1]
            if a.shape != r.shape:
                moved[name] = math.inf
            elif a.dtype.kind == "f" and not np.allclose(a, r, rtol=1e-4, atol=1e-5):
                moved[name] = max(moved.get(name, 0.0), float(np.abs(a - r).max()))
            elif a.dtype.kind != "f" and not np.array_equal(a, r):
                moved[name] = math.inf
    if moved:
        said = ", ".join(
            f"{name} {'changes shape' if err == math.inf else f'by up to {err:.3g}'}"
            for name, err in moved.items()
        )
        raise ExportError(
            f"the model answers a row of validation case {case.describe()} otherwise alone "
            f"than in its batch ({said}): a row's answer depends on the other rows of its "
            "batch (batch statistics: a BatchNorm in training mode or built with "
            "track_running_stats=False, a normalization over the batch axis). The server "
            "batches requests of different clients, so each would change the others' "
            "answers: compute each row's answer from that row alone."
        )


def check_batched(outputs: Sequence[TensorSpec]) -> None:
    """ExportError for an output whose first axis is not the batch (a scalar, or a
    sequence-first model's (sequence, ...)): the server stacks requests along axis 0 and
    cuts each answer from it, and would hand back another row's values, or drop some."""
    for t in outputs:
        if not t.dims or t.dims[0] != BATCH:
            shape = f"({', '.join(map(str, t.dims))})" if t.dims else "a scalar (rank 0)"
            raise ExportError(
                f"output {t.name} is {shape}: its first axis is not the batch (the inputs' "
                "axis 0), and the server stacks requests along it and cuts each answer from "
                "it. Return the batch first, one value per row at least ((batch,) or (batch, "
                "1)); nn.TransformerEncoder and nn.MultiheadAttention take (sequence, batch, "
                "...) unless built with batch_first=True: transpose inside forward."
            )


def check_padding(
    model: LoadedModel,
    cases: Sequence[Case],
    refs: Sequence[TorchOutputs],
    outputs: Sequence[TensorSpec],
    *,
    atol,
    rtol,
) -> None:
    """A row's answer must not move with its padding: the server batches requests of
    different lengths by padding them (each input with its pad value, the attention mask 0
    there). Every padded row of ``cases``, run alone without its padding in PyTorch, must
    give what it gave padded in ``refs`` (on its real positions, for an output with a
    sequence axis), within ``atol + rtol * |padded|``. ValidationError listing the rows that
    moved. Models the server does not pad (``server_pads``) are not checked."""
    import torch

    if not server_pads(model.inputs, outputs):
        return
    failures = []
    with torch.no_grad(), warnings_logged("the model warned"):
        for case, ref in zip(cases, refs, strict=True):
            # rows padded on the left are not the server's: its batcher pads on the right
            lengths = case.feeds[MASK].sum(1) if case.padded_rows and not case.left else ()
            for row, n in enumerate(int(n) for n in lengths):
                if n == case.sequence:
                    continue
                args = [torch.from_numpy(case.feeds[name][row : row + 1, :n].copy())
                        for name in model.input_names]  # fmt: skip
                try:
                    alone = [a.detach().numpy() for a in model.module(*args)]
                except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
                    raise ExportError(
                        f"the model's forward failed in PyTorch on row {row} of validation case "
                        f"{case.describe()} run alone ({n} tokens, its padding cut): "
                        f"{type(e).__name__}: {e}; the server runs a lone request so"
                    ) from e
                for name, a, r in zip(model.outputs, alone, ref, strict=True):
                    r = r[row : row + 1]
                    if r.ndim >= 2 and r.shape[1] == case.sequence and a.shape[1:2] == (n,):
                        r = r[:, :n]  # its real positions
                    err = np.abs(a.astype(np.float64) - r) if a.shape == r.shape else None
                    if err is None or (err > atol + rtol * np.abs(r)).any():
                        moved = "its shape" if err is None else f"by up to {err.max():.3g}"
                        failures.append(
                            f"{name}, row {row} of {case.describe()} ({n} tokens, padded "
                            f"to {case.sequence}): alone it differs {moved}"
                        )
    if failures and _mask_unread(model, cases, refs):
        raise ValidationError(
            f"{MASK}: not read by the model (its outputs are the same with the padding "
            "attended), so a row padded to be batched gets another answer than alone: "
            + "; ".join(failures[:2])
            + f". Use {MASK} (in attention and pooling), or leave it out of the model's "
            "inputs: the server then batches only requests of one length."
        )
    if failures:
        pads = {i.name: i.pad_value for i in model.inputs if i.name != MASK}
        raise ValidationError(
            f"the model's answer for a row changes when the row is padded ({len(failures)} "
            f"of its outputs' rows, at atol={atol:g}, rtol={rtol:g}): "
            + "; ".join(failures[:4])
            + f". The server batches requests by padding them so (pad values {pads}, the "
            "attention mask 0), and would answer a request differently alone and batched. "
            "Known causes: a classifier that finds each row's last token by config.json's "
            "pad_token_id while rows are padded with another id; pooling or attention that "
            "does not read the attention mask. Fix the model; if the differences are float "
            "noise, loosen --atol/--rtol."
        )


def _whence_max_seq_len(kind: str) -> str:
    """Where a model of loader ``kind`` gets the longest sequence it is validated at."""
    return {
        "factory": "the factory's attribute, else its example's width",
        "huggingface": "the fewer of its position embeddings and its tokenizer's longest input",
    }.get(kind, "its checkpoint's config")


def server_pads(inputs: Sequence[InputSpec], outputs: Sequence[TensorSpec]) -> bool:
    """Whether the server pads requests of different lengths into one batch, by its rule
    (``padding.sequence_axis``)."""
    axes: dict[str, tuple[int | str, ...]] = {
        i.name: (BATCH, SEQUENCE, *i.fixed_dims) for i in inputs
    }
    return sequence_axis(axes, [t.dims for t in outputs]) is not None


def check_class_names(model: LoadedModel, outputs: Sequence[TensorSpec]) -> None:
    """Refuse class names that are not as many as the classes any float output scores (by
    its last axis; two for a single logit, a binary classifier's): the server left them out
    of its answers without a word, and labels given by name would stand for other classes."""
    names = model.extra.get("labels") or ()
    scored = [
        t for t in outputs if t.dtype.startswith("float") and t.dims and isinstance(t.dims[-1], int)
    ]
    if not names or not scored:
        return
    if any(t.dims[-1] == len(names) or (t.dims[-1] == 1 and len(names) == 2) for t in scored):
        return
    shown = ", ".join(f"{t.name} {list(t.dims)}" for t in scored)
    raise ModelLoadError(
        f"{model.spec}: class_names has {len(names)} names, but no output scores as many "
        f"classes ({shown}): name each class, by index, once"
    )


def _mask_unread(model: LoadedModel, cases: Sequence[Case], refs: Sequence[TorchOutputs]) -> bool:
    """Whether the model's outputs on the padded case stay what they are with every position
    attended (the attention mask all 1s): it does not read its mask."""
    import torch

    k = next(i for i, c in enumerate(cases) if c.padded_rows)
    feeds = {**cases[k].feeds, MASK: np.ones_like(cases[k].feeds[MASK])}
    with torch.no_grad(), warnings_logged("the model warned"):
        attended = model.module(*(torch.from_numpy(feeds[n]) for n in model.input_names))
    return all(
        np.array_equal(a.detach().numpy(), r) for a, r in zip(attended, refs[k], strict=True)
    )


@contextlib.contextmanager
def warnings_logged(
    what: str, *, level: int = logging.INFO, logger: logging.Logger = log
) -> Iterator[list[warnings.WarningMessage]]:
    """Warnings raised inside, caught instead of printed and yielded; on a normal exit each
    first line is logged once, in order, as ``what: line`` at ``level`` (INFO is shown by -v)."""
    with warnings_caught() as caught:
        yield caught
    for text in dict.fromkeys(str(w.message).splitlines()[0] for w in caught):
        logger.log(level, "%s: %s", what, text)


def input_specs(model: LoadedModel) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(i.name, i.dtype, (BATCH, SEQUENCE, *i.fixed_dims)) for i in model.inputs
    )


def output_specs(
    names: Sequence[str], cases: Sequence[Case], refs: Sequence[TorchOutputs]
) -> tuple[TensorSpec, ...]:
    """Name each output dim by how it moved across the cases: batch, sequence, or fixed."""
    specs = []
    for k, name in enumerate(names):
        shapes = [r[k].shape for r in refs]
        if len({len(s) for s in shapes}) != 1:
            raise ExportError(f"output {name} changes rank with the input shape: {shapes}")
        dims: list[int | str] = []
        for d in range(len(shapes[0])):
            values = [s[d] for s in shapes]
            if all(v == c.batch for v, c in zip(values, cases, strict=True)):
                dims.append(BATCH)
            elif all(v == c.sequence for v, c in zip(values, cases, strict=True)):
                dims.append(SEQUENCE)
            elif len(set(values)) == 1:
                dims.append(int(values[0]))
            else:
                dims.append(f"{name}_dim{d}")
        specs.append(TensorSpec(name, str(refs[0][k].dtype), tuple(dims)))
    return tuple(specs)


def validate(
    onnx_path: Path,
    cases: Sequence[Case],
    refs: Sequence[TorchOutputs],
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    atol: float,
    rtol: float,
) -> ValidationReport:
    """Run ``onnx_path`` in ONNX Runtime on every case and compare with ``refs``.

    Raises ``ValidationError`` listing every mismatch: names, then shapes, then values.
    """
    import onnxruntime as ort

    what = f"{onnx_path.name} against PyTorch"
    try:
        opts = ort.SessionOptions()
        # 4, fatal only: ORT's error lines are hidden too, since the ValidationError already
        # reports each failed run, with its shape.
        opts.log_severity_level = 4
        opts.intra_op_num_threads = cpus.threads()
        sess = ort.InferenceSession(str(onnx_path), opts, providers=[CPU])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ValidationError(
            f"ONNX Runtime cannot load {onnx_path.name}", [f"{type(e).__name__}: {e}"]
        ) from e

    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    failures = []
    if got_in != list(inputs):
        failures.append(f"inputs are {got_in}, expected {list(inputs)}")
        if dropped := [n for n in inputs if n not in got_in]:
            failures.append(
                f"{', '.join(dropped)}: not read by the exported graph. The exporter drops an "
                "input that forward does not use, or uses only in a Python decision that "
                "tracing fixed (`if mask.any():`); use it in tensor operations, or leave it out "
                "of the model's inputs"
            )
    if got_out != list(outputs):
        failures.append(f"outputs are {got_out}, expected {list(outputs)}")
    if failures:
        raise ValidationError(f"{what}: names differ", failures)

    results, not_run, first_node = [], [], ""
    for case, ref in zip(cases, refs, strict=True):
        try:
            got = sess.run(list(outputs), case.feeds)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case.describe()}: ONNX Runtime failed: {type(e).__name__}: {e}")
            not_run.append(case.name)
            first_node = first_node or _failing_node(str(e))
            continue
        diffs: dict[str, float] = {}
        used: dict[str, float] = {}
        for name, g, r in zip(outputs, got, ref, strict=True):
            if g.shape != r.shape:
                failures.append(
                    f"{case.describe()}: {name} has shape {list(g.shape)}, PyTorch {list(r.shape)}"
                )
                continue
            failures.extend(_compare(case, name, g, r, atol, rtol, diffs, used))
        results.append(
            CaseResult(case.name, case.batch, case.sequence, case.padded_rows, diffs, used)
        )
    if not_run:
        # Not a tolerance question: the graph cannot take these shapes at all (a size traced
        # as a constant, typically). Said first: it is what a user must fix.
        raise ValidationError(
            f"{what}: ONNX Runtime cannot run it at {len(not_run)} of {len(cases)} shapes "
            f"({', '.join(not_run)}): the graph does not take those shapes{first_node}, usually "
            "a size that was traced as a constant"
            + (
                f"; {len(failures) - len(not_run)} other check(s) failed too."
                if len(failures) > len(not_run)
                else "."
            ),
            failures,
        )
    if failures:
        raise ValidationError(
            f"{what}: {len(failures)} check(s) failed at atol={atol:g}, rtol={rtol:g}. If the "
            "differences are float noise, loosen --atol/--rtol; otherwise the export is wrong.",
            failures,
        )
    report = ValidationReport(onnx_path.name, atol, rtol, tuple(results))
    log.info("validated %s: max abs diff %s", onnx_path.name, report.max_abs_diff)
    return report


def _failing_node(error: str) -> str:
    """' (its <Op> node '<name>' failed first)' from ONNX Runtime's error text, or ''."""
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", error)
    return f" (its {found[1]} node {found[2]!r} failed first)" if found else ""


def _compare(
    case: Case, name: str, got: np.ndarray, ref: np.ndarray, atol, rtol, diffs: dict, used: dict
) -> list[str]:
    g, r = got.astype(np.float64), ref.astype(np.float64)
    nan_g, nan_r = np.isnan(g), np.isnan(r)
    if (nan_g != nan_r).any():
        return [f"{case.describe()}: {name} has NaN where PyTorch has none (or the reverse)"]
    # an infinity must be PyTorch's exactly: its tolerance, atol + rtol * inf, passed any value
    with np.errstate(invalid="ignore"):  # inf - inf: NaN where equal, which g == r zeroes
        err = np.where(nan_r | (g == r), 0.0, np.abs(g - r))  # inf against anything else: inf
    tol = atol + rtol * np.abs(np.where(nan_r | np.isinf(r), 0.0, r))
    with np.errstate(divide="ignore", invalid="ignore"):  # tol 0: exact match or infinitely off
        fraction = np.where(err == 0, 0.0, err / tol)
    diffs[name] = float(err.max()) if err.size else 0.0
    used[name] = float(fraction.max()) if err.size else 0.0
    bad = err > tol
    if not bad.any():
        return []
    where = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), err.shape)
    return [
        f"{case.describe()}: {name} differs at {int(bad.sum())} of {bad.size} values; "
        f"max abs diff {diffs[name]:.3g} (at {list(map(int, where))}: ONNX Runtime "
        f"{g[where]:.6g}, PyTorch {r[where]:.6g})" + _at_padding_only(case, bad)
    ]


def _at_padding_only(case: Case, bad: np.ndarray) -> str:
    """What to say where every value of an output that differs lies at a padded position
    (the attention mask 0 there): the model's own answer there, PyTorch's fast path's."""
    mask = case.feeds.get(MASK)
    if mask is None or not case.padded_rows or bad.ndim < 2 or bad.shape[:2] != mask.shape:
        return ""
    real = mask.astype(bool).reshape(mask.shape + (1,) * (bad.ndim - 2))
    if (bad & real).any():
        return ""
    return (
        "; only at padded positions (attention_mask 0), which the server cuts from every "
        "answer, but where the model answers otherwise in PyTorch than its graph does: "
        "nn.TransformerEncoder's fast path (nested tensors) answers 0 there; build it with "
        "enable_nested_tensor=False"
    )
