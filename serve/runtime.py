"""The served model: a verified bundle, the variant ``quantgate.serve.variants`` chose for
its provider, and the ONNX Runtime session that runs it. ``open_model`` opens one (and
serves FP32 instead of a variant that falls back to the CPU unvouched); ``Model.check``
refuses a bad request before it runs.

This module never imports torch or quantgate.quantize: a serving host has neither.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from quantgate import bundle as qb
from quantgate import fsutil, placement, sessions
from quantgate.bundle import CPU, CUDA
from quantgate.errors import (
    BadRequest,
    BundleError,
    InferenceFailed,
    QuantgateError,
    ServeError,
)
from quantgate.padding import MASK, sequence_axis
from quantgate.serve import modelfile
from quantgate.serve.config import ServeConfig
from quantgate.serve.dtypes import datatype
from quantgate.serve.variants import choose_variant, provider_options, speed_gates_on, speedup
from quantgate.serve.watch import Outlook, Served, bundle_stamp, stamp
from quantgate.tables import index_limits as read_index_limits

log = logging.getLogger(__name__)


_ORT_TYPES = {
    "tensor(bool)": np.dtype("bool"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(float)": np.dtype("float32"),
    "tensor(double)": np.dtype("float64"),
}


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the server sees it."""

    name: str
    dtype: np.dtype
    axes: tuple[int | str, ...]  # ints for fixed dimensions, names for symbolic ones

    @property
    def shape(self) -> tuple[int, ...]:
        """KServe v2 shape: -1 for every variable dimension."""
        return tuple(a if isinstance(a, int) else -1 for a in self.axes)

    @classmethod
    def from_ort(cls, arg: ort.NodeArg, declared: Sequence[int | str] = ()) -> TensorInfo:
        """The tensor as ONNX Runtime reads it from the graph; a variable axis the graph
        leaves unnamed takes its name from ``declared`` (the manifest's dims), else one of
        its own (``unnamed``)."""
        if arg.type not in _ORT_TYPES:
            raise ServeError(
                f"tensor {arg.name!r} has type {arg.type}, which the server cannot carry"
            )
        axes = tuple(
            d
            if isinstance(d, int) and d > 0
            else (d or _declared(declared, i) or unnamed(arg.name, i))
            for i, d in enumerate(arg.shape)
        )
        return cls(arg.name, _ORT_TYPES[arg.type], axes)


def _declared(dims: Sequence[int | str], i: int) -> str | None:
    """The manifest's name of axis ``i``, where it names one."""
    name = dims[i] if i < len(dims) else None
    return name if isinstance(name, str) and name else None


def unnamed(tensor: str, i: int) -> str:
    """A name for axis ``i`` of ``tensor``, which neither the graph nor the manifest names:
    its own, equal to no other tensor's. Named by position alone ("dim0"), every tensor's
    first axis was one: a sequence-first model was batched along its sequence, two clients'
    tokens in one sequence, and a (batch, 8) output cut to a request's length."""
    return f"{tensor}:{i}"


class Model:
    """One served model version: the bundle, its chosen variant, and the session."""

    def __init__(
        self,
        name: str,
        bundle: qb.Bundle,
        variant: qb.Variant,
        provider: str,
        session: ort.InferenceSession,
        max_batch_size: int,
        *,
        io_binding: bool = False,
        placement_report: placement.PlacementReport | None = None,
        version: str | None = None,
        index_limits: dict[str, int] | None = None,
        on_disk: tuple | None = None,
    ):
        self.name = name
        self.version = version or str(bundle.manifest.version)  # a repository's folder wins
        self.bundle = bundle
        self.variant = variant
        self.provider = provider
        self.session = session
        declared = {t.name: t.dims for t in (*bundle.manifest.inputs, *bundle.manifest.outputs)}
        self.inputs = tuple(
            TensorInfo.from_ort(a, declared.get(a.name, ())) for a in session.get_inputs()
        )
        self.outputs = tuple(
            TensorInfo.from_ort(a, declared.get(a.name, ())) for a in session.get_outputs()
        )
        # Batching needs one variable leading dimension on every tensor, the same one: the
        # server stacks requests along it and cuts each answer from it. Without it each
        # request is the whole input (Triton's max_batch_size 0): a sequence-first model's
        # answer, (sequence, ...), was cut as if it were rows, dropping some.
        leading = {t.axes[0] if t.axes else None for t in (*self.inputs, *self.outputs)}
        self.batched = len(leading) == 1 and isinstance(next(iter(leading)), str)
        self.max_batch_size = max_batch_size if self.batched else 0
        self.sequence_axis = self._sequence_axis()
        # What fills a row past its length when requests are batched, per input, as the
        # export validated: a model may read it (a GPT-2 classifier finds each row's last
        # token by its pad id). The attention mask is 0 there, whatever was recorded.
        self.pad_values = {**bundle.manifest.pad_values, MASK: 0}
        # The longest sequence the model was exported for (its position table); None: unknown.
        self.max_sequence = bundle.manifest.max_seq_len
        # Inputs that index a table (token ids): input -> rows; values outside are refused.
        # open_model reads them with the session (``Opened``), from the file it verified.
        if index_limits is None:
            index_limits = read_index_limits(bundle.path / variant.file)
        self.index_limits = index_limits
        self._input = {t.name: t for t in self.inputs}
        self._output_names = tuple(t.name for t in self.outputs)
        self.labels = bundle.manifest.class_names  # for class_count requests
        self.io_binding = io_binding
        self.placement = placement_report  # where ORT put the nodes (CUDA only)
        # The bundle on disk as it was before it was read (watch.bundle_stamp of the files
        # its manifest lists), to tell that it changed since (watch.BundleWatch)
        self.on_disk_files = listed_files(bundle.manifest)
        self.on_disk = (
            on_disk if on_disk is not None else bundle_stamp(bundle.path, self.on_disk_files)
        )
        # Seconds open_model took: the bundle read and verified (sha256), the session built
        self.load_s = 0.0

    def served(self, cfg: ServeConfig) -> Served:
        """What watch.BundleWatch watches of this model's bundle; ``cfg`` is what a restart
        would load it with (a repository, where ``cfg.path`` is not this bundle)."""
        path = self.bundle.path.absolute()
        m = self.bundle.manifest
        in_repository = not qb.is_bundle(Path(cfg.path))  # load_repository's rule
        return Served(
            path,
            (self.name, self.version),
            f"{self.variant.file}, sha256 {self.variant.sha256[:12]}...",
            self.on_disk,
            outlook=lambda: restart_outlook(
                path,
                cfg,
                self.provider,
                self.variant,
                m,
                in_repository=in_repository,
                served_as=(self.name, self.version),
                # a single bundle is served by its manifest's name, a flat model folder's
                # version is its manifest's (a version folder's is its own name)
                from_manifest=(not in_repository, path.name != self.version),
            ),  # fmt: skip
            files=self.on_disk_files,
        )

    def _sequence_axis(self) -> str | None:
        """The symbolic name of axis 1 where requests of different lengths are padded along
        it into one batch (``padding.sequence_axis``'s rule); None: a batch holds one length."""
        if not self.batched:
            return None
        return sequence_axis({t.name: t.axes for t in self.inputs}, [t.axes for t in self.outputs])

    def pads_output(self, name: str) -> bool:
        """Whether output ``name`` has the sequence axis (at 1) and must be cut after padding."""
        return self.sequence_axis is not None and self.sequence_axis in next(
            t.axes[1:2] for t in self.outputs if t.name == name
        )

    def answer_sizes(
        self, feeds: Mapping[str, np.ndarray], outputs: Collection[str] | None = None
    ) -> dict:
        """The bytes of each of ``outputs`` (its tensor; None: every output) that a request
        of ``feeds`` would be answered with, known before it runs from the sizes its inputs
        give the symbolic axes (batch, sequence); an output with an axis they do not give is
        left out. For refusing an answer too large to send before its work."""
        size: dict[str, int] = {}
        for t in self.inputs:
            shape = getattr(feeds.get(t.name), "shape", None)
            if shape is not None and len(shape) == len(t.axes):
                size.update(
                    (a, n) for a, n in zip(t.axes, shape, strict=True) if isinstance(a, str)
                )
        return {
            t.name: math.prod([a if isinstance(a, int) else size[a] for a in t.axes])
            * t.dtype.itemsize
            for t in self.outputs
            if (outputs is None or t.name in outputs)
            and all(isinstance(a, int) or a in size for a in t.axes)
        }  # fmt: skip

    def check(self, feeds: Mapping[str, np.ndarray], outputs: tuple[str, ...] = ()) -> int:
        """Validate a request against the model; return its batch size.

        Collects every problem (missing, unexpected, dtype, rank, dimension, batch, unknown
        output, a token id outside the vocabulary) and raises one BadRequest that names each
        input and what was expected.
        """
        problems = []
        for name in feeds.keys() - self._input.keys():
            problems.append(
                f"unexpected input {name!r}; the model takes {self._names(self.inputs)}"
            )
        for t in self.inputs:
            if t.name not in feeds:
                problems.append(f"missing input {t.name!r} ({self._describe(t)})")
        for name in outputs:
            if name not in self._output_names:
                problems.append(
                    f"unknown output {name!r}; the model has {self._names(self.outputs)}"
                )
        sizes: dict[str, tuple[int, str]] = {}  # symbolic axis -> (size, first input with it)
        for name, array in feeds.items():
            if name not in self._input:
                continue  # unexpected: said above
            t = self._input[name]
            if array.dtype != t.dtype:
                problems.append(
                    f"input {name!r}: datatype {_dt(array.dtype)}, expected {_dt(t.dtype)}"
                )
            elif array.size and (problem := self._value_problem(name, array)):
                problems.append(problem)
            if array.ndim != len(t.axes):
                problems.append(
                    f"input {name!r}: shape {list(array.shape)}, expected {len(t.axes)} dimensions "
                    f"({self._describe(t)})"
                )
                continue
            for axis, (want, got) in enumerate(zip(t.axes, array.shape, strict=True)):
                if isinstance(want, int) and got != want:
                    problems.append(
                        f"input {name!r}: dimension {axis} is {got}, expected {want} ({self._describe(t)})"
                    )
                elif isinstance(want, str):
                    first = want not in sizes  # said once, for the first input with the axis
                    if first and got == 0:
                        problems.append(
                            f"input {name!r}: dimension {axis} ({want}) is 0; send at least 1"
                        )
                    # axis 1 is the sequence, as the export validated it, mask or not
                    if first and axis == 1 and self.max_sequence and got > self.max_sequence:
                        problems.append(
                            f"input {name!r}: sequence length {got} exceeds the model's maximum "
                            f"{self.max_sequence}; truncate the input"
                        )
                    seen = sizes.setdefault(want, (got, name))
                    if seen[0] != got:
                        problems.append(
                            f"input {name!r}: {want} is {got} but input {seen[1]!r} has {seen[0]}; they must match"
                        )
        axis0 = self.inputs[0].axes[0]  # a name where the model is batched
        batch = sizes.get(axis0, (1, ""))[0] if self.batched and isinstance(axis0, str) else 1
        if self.batched and batch > self.max_batch_size:
            problems.append(
                f"batch size {batch} (input {self.inputs[0].name!r} dimension 0) exceeds the "
                f"max batch size {self.max_batch_size}; split the request"
            )
        if problems:
            raise BadRequest(f"bad request for model {self.name!r}: " + "; ".join(problems))
        return batch

    def _value_problem(self, name: str, array: np.ndarray) -> str | None:
        """What ONNX Runtime would answer without an error, and wrongly: a token id outside
        its table (a negative one is read from the end), an attention mask that is not 0/1.
        A row masked whole is answered (a load generator's zeros), though it means nothing."""
        if name in self.index_limits:
            rows = self.index_limits[name]
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= rows:
                return (
                    f"input {name!r}: values must be ids in 0..{rows - 1} (the model's table "
                    f"has {rows} rows), found {low if low < 0 else high}; check that the "
                    "tokenizer is the model's"
                )
        elif (
            name == MASK
            and array.ndim == 2
            and array.dtype.kind in "iu"
            # one pass: read as unsigned, every value but 0 and 1 is above 1 (-1 too)
            and (array.view(array.dtype.str.replace("i", "u")) > 1).any()
        ):
            odd = (array != 0) & (array != 1)
            return f"input {name!r}: values must be 0 (padding) or 1 (token), found {array[odd][0]}"
        return None

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        outputs: tuple[str, ...] = (),
        options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """session.run on validated feeds; every output unless ``outputs`` names some.
        ``options.terminate`` set from another thread stops the run between nodes (the
        batcher sets it when every client of a running batch has gone)."""
        names = outputs or self._output_names
        try:
            if self.io_binding:
                results = self._run_bound(names, feeds, options)
            else:
                results = self.session.run(names, dict(feeds), options)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as e:
            if "while running" in str(e):  # inside the graph: its words name its nodes
                what = f"model {self.name!r} rejected the input"
                raise BadRequest.logged(what, e, log, level=logging.WARNING) from e
            raise BadRequest(f"model {self.name!r} rejected the input: {e}") from e
        except Exception as e:  # ORT raises its own RuntimeError subclasses
            if options is not None and options.terminate:  # stopped: its clients had gone
                raise InferenceFailed(f"model {self.name!r} was stopped: {e}") from e
            raise InferenceFailed.logged(f"model {self.name!r} failed to run", e, log) from e
        return dict(zip(names, results, strict=True))

    def _run_bound(
        self,
        names: tuple[str, ...],
        feeds: Mapping[str, np.ndarray],
        options: ort.RunOptions | None = None,
    ) -> list:
        """session.run through IO binding: inputs from host arrays, outputs written by ORT
        into host memory (one device->host copy inside the run, no extra allocation)."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()

    def example(self, batch: int = 1, sequence: int = 16) -> dict[str, np.ndarray]:
        """A valid all-padding-but-one-token request, for warm-up."""
        feeds = {}
        for t in self.inputs:
            shape = [
                a if isinstance(a, int) else (batch if i == 0 and self.batched else sequence)
                for i, a in enumerate(t.axes)
            ]
            feeds[t.name] = (np.ones if t.name == MASK else np.zeros)(shape, dtype=t.dtype)
        return feeds

    @staticmethod
    def _names(tensors: tuple[TensorInfo, ...]) -> str:
        return ", ".join(repr(t.name) for t in tensors)

    def labels_of(self, output: str) -> tuple[str, ...]:
        """The class names of ``output``'s values, for its top classes: the model's, where the
        output holds one value per class (its axes past the batch fixed, as many values as
        names); none for another output, whatever a request's length (a per-token output
        of a 4-token request named its positions as classes of a 4-class model)."""
        tensor = next(t for t in self.outputs if t.name == output)
        row = tensor.axes[1:] if self.batched else tensor.axes
        fixed = all(isinstance(a, int) for a in row)
        return tuple(self.labels) if fixed and math.prod(row) == len(self.labels) else ()

    @staticmethod
    def _describe(t: TensorInfo) -> str:
        return f"{_dt(t.dtype)} {list(t.axes)}"

    def describe(self) -> str:
        return f"{self.name} v{self.version}: {self.serving()}"

    def serving(self) -> str:
        """What is served and why: the variant, the provider, its gates' speed, and notes."""
        return (
            f"{self.variant.precision} ({self.variant.file}) on {self.provider}, {self._speed()}"
            + (f"; {self.placement.reason()}" if self.placement is not None else "")
            + self._batch_note()
        )

    def _batch_note(self) -> str:
        """For dynamic INT8, which scales activations per batch: that batching moves a
        row's answer, and what its build measured of it."""
        if not self.variant.dynamic:
            return ""
        measured = [g for g in self.variant.gates if g.name.startswith("batch_")]
        how = "; ".join(f"{g.name} {g.value:.4g}" for g in measured) or "not measured"
        return (
            f"; dynamic INT8: a row's answer moves slightly with the rows batched with it "
            f"({how}); --no-dynamic-batching or --precision fp32 for answers that repeat exactly"
        )

    def _speed(self) -> str:
        """What the bundle's speed gates say of this variant on this provider."""
        if self.variant.precision == "fp32":
            return "the reference precision"
        if s := speedup(self.variant, self.provider):
            return f"speedup {s:.2f}x vs fp32"
        failed = [g for g in speed_gates_on(self.variant, self.provider) if not g.passed]
        if failed:
            said = ", ".join(
                f"{g.name} {g.value:.2f}x" for g in sorted(failed, key=lambda g: g.value)
            )
            gates = "gates" if len(failed) > 1 else "gate"
            return f"its speed {gates} failed here ({said} vs fp32)"
        return "no speed gate measured on this provider"


def _dt(dtype: np.dtype) -> str:
    return datatype(dtype)


def open_model(
    path: Path,
    cfg: ServeConfig,
    provider: str,
    *,
    name: str | None = None,
    version: str | None = None,
) -> Model:
    """Load and verify one bundle, choose its variant, and open an ONNX Runtime session.
    ``name`` and ``version`` default to the manifest's (a repository passes its folders').
    The time it took is the model's ``load_s``, and is logged with it: which model a slow
    start spent its time on, before the warm-up (Engine.warm_up adds that)."""
    started = time.perf_counter()
    model = _open_model(path, cfg, provider, name=name, version=version)
    model.load_s = time.perf_counter() - started
    log.info(
        "loaded %s v%s in %.2f s: %s", model.name, model.version, model.load_s, model.serving()
    )
    return model


def _open_model(
    path: Path,
    cfg: ServeConfig,
    provider: str,
    *,
    name: str | None = None,
    version: str | None = None,
) -> Model:
    """``open_model``'s model, untimed."""
    on_disk = bundle_stamp(path)  # before the read: a change during it is seen later
    bundle = qb.load(path, verify=False)
    manifest = bundle.manifest
    # and the files it lists, before they are hashed
    on_disk = (*on_disk, *stamp([path / f for f in listed_files(manifest)]))
    if manifest.verdict != qb.PASS:
        failed = [v.precision for v in manifest.variants if not v.passed]
        if not cfg.allow_failed_gates:
            raise BundleError(
                f"bundle {path} failed its gates (variants {failed}); see {bundle.report}. "
                "Pass --allow-failed-gates to serve its passing variants anyway."
            )
        log.warning("bundle %s failed its gates (variants %s); serving it as asked", path, failed)
    variant = choose_variant(
        manifest,
        provider,
        precision=cfg.precision,
        allow_failed=cfg.allow_failed_gates,
        served_as=name,
    )
    # Every file's sha256 but the served one's, which _session checks of the bytes it reads
    qb.check_files(bundle, hashed_when_read={variant.file})
    opened = _session(bundle, variant, cfg, provider)
    got = opened.session.get_providers()[0]
    if got != provider:
        # onnxruntime-gpu lists CUDA even where its libraries (CUDA, cuDNN) or a GPU are
        # missing, and then silently builds a CPU session: say so, do not pretend.
        why = (
            f"onnxruntime created a {got} session for {variant.file} although {provider} was "
            f"requested: the CUDA provider failed to load (missing CUDA/cuDNN libraries or no "
            "GPU; ORT logs the cause above)"
        )
        if cfg.device == "cuda":
            raise ServeError(why + ". Fix the CUDA install or use --device cpu.")
        log.warning("%s; serving on the CPU", why)
        return _open_model(path, cfg, CPU, name=name, version=version)
    variant, opened = _placement_checked(bundle, cfg, provider, variant, opened)
    use_binding = cfg.io_binding == "on" or (cfg.io_binding == "auto" and provider == CUDA)
    model = Model(
        name or manifest.name,
        bundle,
        variant,
        provider,
        opened.session,
        cfg.max_batch_size,
        io_binding=use_binding,
        placement_report=opened.report,
        version=version,
        index_limits=opened.index_limits,
        on_disk=on_disk,
    )
    return model


def listed_files(manifest: qb.Manifest) -> tuple[str, ...]:
    """The names of the files ``manifest`` lists (the variants', the tokenizer's, ...): what
    a restart checks, and so what watch.BundleWatch looks at."""
    return (*(v.file for v in manifest.variants), *manifest.files)


def restart_outlook(
    path: Path,
    cfg: ServeConfig,
    provider: str,
    served: qb.Variant,
    loaded: qb.Manifest,
    *,
    in_repository: bool = False,
    served_as: tuple[str, str] | None = None,
    from_manifest: tuple[bool, bool] = (False, False),
) -> Outlook:
    """What a restart would do with the bundle at ``path`` as it is on disk now, for the
    warning that it changed (watch.BundleWatch): the copy it would serve, whether that is the
    one ``served`` now, or why it would be refused, and with it the whole repository where
    the server serves one (it starts with every model folder or none). A bundle whose task,
    inputs or outputs are not ``loaded``'s (the manifest served) is another model, said so;
    so is a new name or version, where the served one (``served_as``) is the manifest's
    (``from_manifest``: for the name, for the version).

    Its files are hashed, as a restart checks them; where ONNX Runtime would place the
    nodes on CUDA is not known until a restart opens it."""
    whole = (
        ", and with it the whole repository (the server starts with every model folder or none)"
        if in_repository
        else ""
    )
    try:
        manifest = qb.load(path).manifest
    except QuantgateError as e:
        return Outlook(f"a restart would refuse it{whole}: {e}", refused=True)
    files = listed_files(manifest)
    said = []
    if served_as is not None:
        name = manifest.name if from_manifest[0] else served_as[0]
        version = str(manifest.version) if from_manifest[1] else served_as[1]
        if (name, version) != served_as:
            said.append(
                f"a restart would serve it as model {name} v{version}, not {served_as[0]} "
                f"v{served_as[1]}: requests naming those would be refused"
            )
    if changes := _interface_changes(loaded, manifest):
        said.append(
            f"it is not the model served ({'; '.join(changes)}): requests made for the one "
            "served would be refused after a restart"
        )
    now = next(
        (v for v in manifest.variants if (v.file, v.sha256) == (served.file, served.sha256)),
        None,
    )
    if now is not None and not now.passed:
        said.append(
            f"the copy served ({now.precision}) now fails its gates: see {path / qb.REPORT}"
        )
    if manifest.verdict != qb.PASS and not cfg.allow_failed_gates:
        failing = [v.precision for v in manifest.variants if not v.passed]
        said.append(
            f"a restart would refuse it{whole} (variants {failing} failed their gates; "
            "--allow-failed-gates serves its passing variants)"
        )
        return Outlook("; ".join(said), refused=True, files=files)
    try:
        v = choose_variant(
            manifest,
            provider,
            precision=cfg.precision,
            allow_failed=cfg.allow_failed_gates,
            quiet=True,  # what the choice would log is for the restart to say
        )
    except QuantgateError as e:
        refusal = f"a restart would refuse it{whole}: {e}"
        return Outlook("; ".join([*said, refusal]), refused=True, files=files)
    what = f"{v.file}, sha256 {v.sha256[:12]}..."
    this_copy = (v.file, v.sha256) == (served.file, served.sha256)
    served_now = f"a restart would serve {v.precision} ({what})" + (
        " (the copy served now)" if this_copy else ""
    )
    serves_it = this_copy and not said
    same = serves_it and manifest == loaded  # hashed by qb.load: written anew
    return Outlook("; ".join([*said, served_now]), files=files, same=same, serves_it=serves_it)


def _interface_changes(old: qb.Manifest, new: qb.Manifest) -> list[str]:
    """How ``new`` differs from ``old`` as clients see a model: "task A -> B", "inputs
    input_ids int64 (batch, sequence), ... -> ...", the same for outputs."""

    def specs(tensors) -> str:
        return ", ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.dims))})" for t in tensors)

    changes = [f"task {old.task} -> {new.task}"] if old.task != new.task else []
    for what, before, after in (
        ("inputs", specs(old.inputs), specs(new.inputs)),
        ("outputs", specs(old.outputs), specs(new.outputs)),
    ):
        if before != after:
            changes.append(f"{what} {before} -> {after}")
    return changes


def placement_refusal(
    variant: qb.Variant,
    provider: str,
    report: placement.PlacementReport | None,
    fp32: placement.PlacementReport | None = None,
) -> str | None:
    """Why ``variant`` should not be served on ``provider`` as ORT placed it (``report``);
    None to serve it.

    A variant that leaves nodes on the CPU can be far slower than FP32 (dynamic INT8 on an
    H200 ran at 0.02x). A speed gate it passed on ``provider`` vouches for it: it was timed
    there, placed as it is. Without one (a bundle made without a GPU, whose FP16 the server
    prefers on CUDA) it is refused where it leaves more on the CPU than FP32 does:
    ``placement.placement_gate`` against ``fp32``, FP32's report on the same provider, the
    rule a CUDA speed gate applies at export. With ``fp32`` None it is judged against a
    clean placement, the strictest reading. FP32, the reference, is never refused.
    """
    if report is None or speedup(variant, provider) > 0:  # FP32's speedup is 1
        return None
    gate = placement.placement_gate(report, baseline=fp32)
    return None if gate.passed else gate.detail


def _placement_checked(
    bundle: qb.Bundle, cfg: ServeConfig, provider: str, variant: qb.Variant, opened: Opened
) -> tuple[qb.Variant, Opened]:
    """What to serve: ``variant`` as opened, or FP32 opened instead where
    ``placement_refusal`` refuses the variant and ``--precision`` did not ask for it.
    Whatever is served and still falls back is logged.

    FP32 is opened (a second session) only when the variant fails the strictest reading,
    to tell the variant's own fall-back from CPU nodes ORT places for FP32 as well.
    """
    why = placement_refusal(variant, provider, opened.report)
    what = f"{variant.precision} ({variant.file}) on {provider}"
    unvouched = f"it falls back to the CPU and no speed gate on {provider} vouches for it"
    if why is not None and cfg.precision is not None:
        log.warning("serving %s as --precision asks, although %s: %s", what, unvouched, why)
        return variant, opened
    if why is not None:
        fp32 = bundle.manifest.variant("fp32")
        fp32_opened = _session(bundle, fp32, cfg, provider)
        why = placement_refusal(variant, provider, opened.report, fp32_opened.report)
        if why is not None:
            log.warning(
                "not serving %s: %s (%s); serving fp32 (%s) instead. Pass --precision %s to "
                "serve it anyway.",
                what,
                unvouched,
                why,
                fp32.file,
                variant.precision,
            )
            variant, opened = fp32, fp32_opened
    report = opened.report
    if report is not None and report.falls_back:
        threads = "" if cfg.intra_op_threads else (
            " (its CPU nodes get one thread on CUDA: --threads N gives them more)"
        )  # fmt: skip
        log.warning(
            "%s on %s: %s; expect it to be slow%s",
            variant.file, provider, report.reason(), threads,
        )  # fmt: skip
    return variant, opened


@dataclass(frozen=True)
class Opened:
    """A variant's session, on CUDA where ORT placed its nodes (``quantgate.placement``),
    and its index limits (``quantgate.tables.index_limits``), all of the file verified."""

    session: ort.InferenceSession
    report: placement.PlacementReport | None
    index_limits: dict[str, int]


def _session(bundle: qb.Bundle, variant: qb.Variant, cfg: ServeConfig, provider: str) -> Opened:
    """``variant``'s session, built from the bytes whose sha256 was checked
    (``modelfile.read_verified``): a bundle replaced since ``qb.load`` verified it is
    refused, not served unchecked."""
    file = bundle.path / variant.file
    data, read = modelfile.read_verified(file, variant.sha256)
    # A model whose weights are ONNX external data (files beside it, past protobuf's 2 GB)
    # is opened by its path: ORT finds those files relative to the model's path, and from
    # bytes it has no path (onnxruntime 1.20, which the server supports, has no option to
    # name their folder). Its graph is checked as read (``unchanged`` below), its weight
    # files only by qb.load's sha256.
    external, locations = modelfile.external_data(data)
    if said := qb.unlisted_weights(bundle.manifest, variant, locations):
        raise BundleError(f"bundle {bundle.path}: {said}")
    source: bytes | str = str(file) if external else data
    del data  # one copy: ``source``, dropped with the session's own once it is built
    session, report = _ort_session(source, file, locations, cfg, provider, variant.precision)
    modelfile.release(session)
    del source
    limits = read_index_limits(file)
    # Both read by path what was checked as bytes (limits, and an external-data model)
    modelfile.unchanged(file, read)
    return Opened(session, report, limits)


def _options(cfg: ServeConfig, provider: str, precision: str) -> ort.SessionOptions:
    """A served session's options, those the gates timed the variant with
    (``quantgate.sessions``) with the server's --threads."""
    return sessions.session_options(provider, threads=cfg.intra_op_threads, precision=precision)


def _ort_session(
    source: bytes | str,
    file: Path,
    weights: Collection[str],
    cfg: ServeConfig,
    provider: str,
    precision: str,
) -> tuple[ort.InferenceSession, placement.PlacementReport | None]:
    """The session of ``source`` (the model's bytes, or its path), and on CUDA where ORT
    placed the nodes (``quantgate.placement``); ``file`` names it in errors, and with the
    files of its external ``weights`` is the model's size."""
    options = _options(cfg, provider, precision)
    providers = provider_options(cfg, provider)
    if provider == CPU:
        try:
            return ort.InferenceSession(source, options, providers=providers), None
        except Exception as e:  # noqa: BLE001 - ORT raises its own types from C++
            raise BundleError(
                f"ONNX Runtime cannot open {file} ({type(e).__name__}: {str(e).strip()}), though "
                "its sha256 is the manifest's: the bundle was written so. Re-create it with "
                "`quantgate export`."
            ) from e
    with placement_folder() as tmp:
        if tmp is not None:
            placement.record(options, tmp)
        try:
            # enable_fallback=0: ORT would otherwise answer a CUDA provider that fails to
            # start (a wrong device id, say) with a CPU session and a line on stdout. One
            # whose libraries do not load gives a CPU session either way: checked below.
            session = ort.InferenceSession(source, options, providers=providers, enable_fallback=0)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types from C++
            # Writing the optimized copy fails the session too (a /tmp too small for it: ORT
            # says only "SystemError : <errno>"): opened again without it, served unchecked.
            # Any other failure (a wrong device id) is told as it is, at the first attempt.
            if tmp is None or not str(e).strip().startswith("SystemError"):
                raise _cuda_failed(file, cfg, e) from e
            try:
                session = ort.InferenceSession(
                    source,
                    _options(cfg, provider, precision),
                    providers=providers,
                    enable_fallback=0,
                )
            except Exception:  # noqa: BLE001 - the first error is the one to tell
                raise _cuda_failed(file, cfg, e) from e
            try:
                size = f" ({fsutil.size_said(fsutil.size_with(file, weights))})"
            except OSError:
                size = ""
            log.warning(
                "%s",
                _unchecked(
                    f"{file.name}'s nodes",
                    f"it could not write it into {tmp} ({str(e).strip()})",
                    f"the model{size}",
                    "it is served",
                ),
            )
            return session, None
        if tmp is None:  # no folder for the optimized copy: nothing to read
            return session, None
        return session, placement.read(session, options, provider)


def _cuda_failed(file: Path, cfg: ServeConfig, e: Exception) -> ServeError:
    return ServeError(
        f"the CUDA execution provider could not open {file.name} on device "
        f"{cfg.cuda_device_id} ({type(e).__name__}: {str(e).strip()}). Check the "
        "device id (nvidia-smi lists them) and the CUDA install, or use --device cpu."
    )


PLACEMENT_PREFIX = "quantgate-serve-"  # the temporary folders of placement_folder
_no_folder_said = False  # placement_folder's WARNING is logged once per process


@contextlib.contextmanager
def placement_folder() -> Iterator[Path | None]:
    """A temporary folder (under $TMPDIR, else /tmp) for the CUDA placement check:
    ``placement.record`` has ONNX Runtime write the graph it will run there, one copy of
    the model, read once the session is built and removed with the folder. Folders
    of the same prefix left by a server that was killed are removed first
    (``fsutil.work_dir``).

    None where no temporary folder can be made (a read-only root filesystem with no
    writable /tmp: Python's "No usable temporary directory found"), after a WARNING (once
    per process) that says so and what to do: models are then served without the check,
    not refused."""
    global _no_folder_said
    stack = contextlib.ExitStack()
    try:
        folder: Path | None = stack.enter_context(fsutil.work_dir(PLACEMENT_PREFIX))
    except OSError as e:
        folder = None
        if not _no_folder_said:
            _no_folder_said = True
            log.warning(
                "%s",
                _unchecked(
                    "the models' nodes",
                    f"no temporary folder can be made ({e})",
                    "the largest model",
                    "every model is served",
                ),
            )
    with stack:
        yield folder


def _unchecked(what: str, why: str, copy: str, served: str) -> str:
    """The WARNING of a model served on CUDA without the placement check: why, what it
    risks, and what to do (``copy``: whose copy the folder must have room for)."""
    return (
        f"cannot check where ONNX Runtime places {what} on CUDA: the check reads the "
        f"optimized copy of the model ONNX Runtime writes at start into a temporary folder, "
        f"and {why}. Not refused: {served} without the check, so a variant that falls back "
        "to the CPU, and is slow, may be served (docs/gpu.md). For the check, mount a "
        f"writable /tmp (an emptyDir) with room for one copy of {copy}, or point TMPDIR at "
        "a writable folder"
    )
