"""The command line. It only translates: parse flags, build a config, call one library
function, print the result, and map errors to exit codes:

    0  success (every gate passed; the server answered every request it admitted)
    1  anything else, e.g. the server's shutdown grace ran out with requests unanswered
    2  bad usage or bad input (missing file, corrupt checkpoint, invalid option)
    3  a gate or a validation failed (the bundle and its report are still written)
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from inspect import cleandoc
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from quantgate import __version__, fsutil, signals
from quantgate.errors import GateFailed, QuantgateError, exit_code
from quantgate.export.config import ExportConfig, Exporter
from quantgate.serve.config import DEVICES, PRECISIONS, ServeConfig
from quantgate.serve.logs import LogFormat, server_log

app = typer.Typer(
    name="quantgate",
    help=(
        "Take a PyTorch transformer to production: export it to ONNX, quantize it to INT8 "
        "with calibration data, prove the INT8 model is still accurate and really faster, "
        "and serve it over gRPC (KServe v2 / Triton protocol) through ONNX Runtime."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str | None = None):
    """``app.command`` with the docstring's paragraphs as whole lines (a docstring's own line
    breaks would break the help mid-sentence at any width but the source's), and the first
    one whole in the command list."""

    def register(fn):
        paragraphs = [" ".join(p.split()) for p in cleandoc(fn.__doc__ or "").split("\n\n")]
        # click's own short help stops at 45 characters, or at a full stop, even in "e.g."
        return app.command(name, help="\n\n".join(paragraphs), short_help=paragraphs[0])(fn)

    return register


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping at its width. A pipe or a CI log gets whole lines:
    rich would wrap them at 80 columns, mid-sentence, and break grep."""
    stream = sys.stderr if stderr else sys.stdout
    file = None if stderr else _Stdout()
    if stream.isatty() or "COLUMNS" in os.environ:
        return Console(stderr=stderr, file=file)
    return Console(stderr=stderr, file=file, soft_wrap=True, width=200)


class _Stdout:
    """sys.stdout (whichever it is when written to), where a reader that stopped reading is
    no error: `quantgate gate ... | head -1` ended with a BrokenPipeError, exit 1, whatever
    the gates said. The rest of the output goes nowhere, and the command keeps its exit
    code."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            self._closed()

    @staticmethod
    def _closed() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)  # and so for Python's last flush at exit
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(sys.stdout, name)


console = _console(stderr=True)
out = _console()


class _Progress(Progress):
    """Rich's live bars on a terminal. Elsewhere (a pipe, a CI log, with FORCE_COLOR or
    not) one plain line per step a task finishes, with its time: a log that shows a long
    export is alive (rich printed its bars once, at the end, after minutes of silence; under
    FORCE_COLOR, every redraw). A step is done when its task moves on to another; each
    task's last one is printed as it ends."""

    def __init__(self, *columns, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._live = self.console.file.isatty()
        self._steps: dict[TaskID, _Step] = {}

    def start(self) -> None:
        if self._live:
            super().start()

    def stop(self) -> None:
        if self._live:
            super().stop()

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self._live:
            return
        task = self._tasks[task_id]
        status = task.fields.get("status", "")
        step = self._steps.get(task_id)
        if step is not None and step.status != status:
            took = f" ({time.monotonic() - step.since:.1f} s)"
            # the count the step brought it to, unless the next one counts afresh
            done = task.completed if task.completed >= step.completed else step.completed
            self._say(task.description, done, task.total, step.status + took)
        if step is None or step.status != status:
            step = self._steps[task_id] = _Step(status, time.monotonic())
        step.completed = task.completed

    def _say(self, what: str, completed: float, total: float | None, status: str) -> None:
        where = f" {completed:g}/{total:g}" if total else ""
        self.console.print(f"{what}{where}: {status}", highlight=False, markup=False)

    def __exit__(self, *exc) -> None:
        if self._live:
            return super().__exit__(*exc)
        for task_id, step in self._steps.items():  # where each task that did work ended
            task = self._tasks[task_id]
            if task.completed:
                self._say(task.description, task.completed, task.total, step.status)
        return None


@dataclass
class _Step:
    """The step a task is at, off a terminal: its status, since when, how far it got."""

    status: str
    since: float
    completed: float = 0


def progress() -> Progress:
    """A progress bar on stderr, so stdout stays clean for results."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _version(value: bool) -> None:
    if value:
        out.print(f"quantgate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what each stage does.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = {"verbose": verbose}
    if ctx.invoked_subcommand != "serve":  # the server sets up its own log (serve.logs)
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


class GateDevice(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


# serve's choices, as ServeConfig names them (an Enum: --help lists them)
ServeDevice = Enum("ServeDevice", {d.upper(): d for d in DEVICES}, type=str)
Precision = Enum("Precision", {p.upper(): p for p in PRECISIONS}, type=str)


@command()
def train(
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Checkpoint directory to write (reused when it already matches).",
        ),
    ] = Path("artifacts/digits-small"),
    preset: Annotated[
        str,
        typer.Option(
            metavar="small|base",
            help="Model size: 'small' (trains in minutes) or 'base' (the seed's d_model 512).",
        ),
    ] = "small",
    epochs: Annotated[
        int, typer.Option(min=1, metavar="N", help="Passes over the 1,237 training images.")
    ] = 25,
    seed: Annotated[
        int,
        typer.Option(
            metavar="N", help="Seed for initialisation and batch order: same seed, same weights."
        ),
    ] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retrain even if a matching checkpoint exists; replace --out even if it is a "
            "directory that is not a checkpoint.",
        ),
    ] = False,
) -> None:
    """Train the built-in encoder classifier on scikit-learn's digits (64 pixel tokens).

    The split is fixed: 1,237 train, 200 calibration, 360 test images. Training is seeded
    and deterministic; a checkpoint with the same model, settings and data is reused.
    """
    from quantgate.model.train import TrainConfig, digits_model_config
    from quantgate.model.train import train as train_model

    cfg = TrainConfig(epochs=epochs, seed=seed)
    model_cfg = digits_model_config(preset)  # an unknown preset is refused before any bar
    with progress() as bar:
        task = bar.add_task("training", total=None, status="")

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, status=f"loss {loss:.3f}")

        result = train_model(out_dir, model_cfg=model_cfg, cfg=cfg, force=force, on_step=on_step)
        bar.update(task, visible=not result.reused)
    how = "reused" if result.reused else f"trained in {result.seconds:.0f}s"
    out.print(f"checkpoint {result.checkpoint} ({how})")
    out.print(f"test accuracy: {result.test_accuracy:.2%} on 360 held-out digits")


_DEFAULT_EXPORT = ExportConfig()
_DEFAULT_SERVE = ServeConfig(path=Path("."))
# Gate thresholds shared by `export` and `gate`; None: the config file's, else GateConfig's.
# The defaults are written into the help, as export's QuantConfig ones are (--search-budget,
# --max-candidates): reading them would import quantgate.quantize into every command, the
# server's too. tests/test_cli.py checks them against the configs.
_MaxDrop = Annotated[
    float | None,
    typer.Option(
        metavar="POINTS",
        help="Accuracy gate: largest drop in points of the task metric [default: 1].",
    ),
]
_MinSpeedup = Annotated[
    float | None,
    typer.Option(metavar="RATIO", help="Speed gate: INT8 vs FP32 at every shape [default: 1.2]."),
]
_COSINE = "Fidelity: mean cosine vs FP32 of an embedding and of every other float output"
_TOP1 = "Fidelity: top-1 / nearest-neighbour / batch agreement with FP32"
_MinCosine = Annotated[
    float | None, typer.Option(metavar="COSINE", help=_COSINE + " [default: 0.99].")
]
_MinTop1 = Annotated[float | None, typer.Option(metavar="RATE", help=_TOP1 + " [default: 0.95].")]


def _kept(what: str, metavar: str):
    """A threshold flag of `quantgate gate`, whose default is the bundle's own."""
    return typer.Option(
        metavar=metavar, help=what + " [default: the one the bundle was last gated with]."
    )


_GateFile = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="TOML or JSON file of gate settings (flags override it)."),
]


@command("export")
def export_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A checkpoint directory (`quantgate train`), a Hugging Face model directory, "
            "or your own module's factory: package.module:factory or path/to/file.py:factory.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Bundle directory to write (atomically)."),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            metavar="TASK",
            help="sequence-classification, token-classification or feature-extraction; "
            "default: from the model.",
        ),
    ] = None,
    exporter: Annotated[
        Exporter, typer.Option(help="auto tries legacy, then dynamo.")
    ] = _DEFAULT_EXPORT.exporter,
    opset: Annotated[int, typer.Option(metavar="N", help="ONNX opset.")] = _DEFAULT_EXPORT.opset,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Longest sequence to export and validate; default: the model's."
        ),
    ] = None,
    optimize: Annotated[
        bool, typer.Option(help="Apply ONNX Runtime's transformer fusions (then validate again).")
    ] = _DEFAULT_EXPORT.optimize,
    atol: Annotated[
        float, typer.Option(metavar="TOL", help="Absolute tolerance vs PyTorch.")
    ] = _DEFAULT_EXPORT.atol,
    rtol: Annotated[
        float, typer.Option(metavar="TOL", help="Relative tolerance vs PyTorch.")
    ] = _DEFAULT_EXPORT.rtol,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Bundle name; default: the --out directory's name."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --out even if it is a directory that is not a bundle, or a bundle of "
            "another model.",
        ),
    ] = False,
    no_quantize: Annotated[
        bool, typer.Option("--no-quantize", help="Stop after FP32: no INT8, no gates.")
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help='Calibration data: .jsonl ({"text": ...} lines) or .npz of inputs.'
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            metavar="FILE",
            help="Held-out evaluation data (.jsonl with optional 'label', or .npz).",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            min=1, metavar="N", help="Calibration rows to use (length-stratified); default: all."
        ),
    ] = None,
    search_budget: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Seconds for the INT8 recipe search (default 900): no candidate starts "
            "after it (one already started finishes). How far the search gets then depends "
            "on the machine's speed and load; for a search that does not, bound it with "
            "--max-candidates and give it time.",
            show_default=False,
        ),
    ] = None,
    max_candidates: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Candidates the INT8 search may try (default 12), whatever the time they "
            "take: a loaded machine tries as many as an idle one.",
            show_default=False,
        ),
    ] = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe",
            metavar="NAME",
            help="Search only this INT8 recipe; repeat for several (default: every recipe "
            "for this CPU, best first). A name not among them is refused with the list. "
            "Static recipes (smooth-static-u8s8, ...) fix activation scales at calibration; "
            "ORT's dynamic ones scale each batch, so a row's answer moves with its "
            "batch-mates.",
            show_default=False,
        ),
    ] = None,
    fp16: Annotated[
        bool | None,
        typer.Option(
            "--fp16/--no-fp16",
            help="Also ship an FP16 variant for CUDA, gated on fidelity against FP32 "
            "(default: yes).",
            show_default=False,
        ),
    ] = None,
    cuda_gates: Annotated[
        bool | None,
        typer.Option(
            "--cuda-gates/--no-cuda-gates",
            help="Where a CUDA GPU is present: time every variant on the CUDA provider "
            "(FP16 must be 1.2x FP32 at batch 128 and not slower at batch 1; nodes that fall "
            "back to the CPU fail it). INT8 slower on CUDA is marked not for CUDA (default: "
            "yes).",
            show_default=False,
        ),
    ] = None,
    max_accuracy_drop: _MaxDrop = None,
    min_speedup: _MinSpeedup = None,
    min_cosine: _MinCosine = None,
    min_top1: _MinTop1 = None,
    gate_config: _GateFile = None,
) -> None:
    """Export MODEL, quantize it to INT8 with calibration data, gate it, write a bundle.

    FP32: validated against PyTorch on real samples at several shapes (a mismatch exits 3
    and leaves --out as it was), then fused. INT8: a recipe search keeps the fastest
    candidate that passes the accuracy and speed gates. The bundle and report.md are
    written in every case; a failed gate marks the INT8 variant failed and exits 3.
    """
    from quantgate.export import export

    cfg = ExportConfig(
        task=task,
        exporter=exporter,
        opset=opset,
        max_seq_len=max_seq_len,
        optimize=optimize,
        atol=atol,
        rtol=rtol,
        name=name,
    )
    if no_quantize:
        _refuse_unused_quantize_flags(
            calibration=calibration, eval=eval_data, samples=samples,
            search_budget=search_budget, max_candidates=max_candidates, recipe=recipe,
            fp16=fp16, cuda_gates=cuda_gates, max_accuracy_drop=max_accuracy_drop,
            min_speedup=min_speedup, min_cosine=min_cosine, min_top1=min_top1,
            gate_config=gate_config,
        )  # fmt: skip
    else:
        from quantgate.bundle import load as load_bundle
        from quantgate.quantize.data import check_path
        from quantgate.quantize.pipeline import build
        from quantgate.quantize.search import QuantConfig

        for flag, path in (("--calibration", calibration), ("--eval", eval_data)):
            if path is not None:
                check_path(path, flag)  # before minutes of export, not after
        flags = _gate_flags(max_accuracy_drop, min_speedup, min_cosine, min_top1)
        gates = _gate_config(gate_config, flags)
        given = dict(
            search_budget_s=search_budget,
            max_candidates=max_candidates,
            recipes=tuple(recipe) if recipe else None,
            fp16=fp16,
            cuda_gates=cuda_gates,
        )
        quant = QuantConfig(
            calibration_samples=samples, **{k: v for k, v in given.items() if v is not None}
        )
        try:
            with progress() as bar:
                bundle = build(
                    model,
                    out_dir,
                    export_cfg=cfg,
                    quant_cfg=quant,
                    gate_cfg=gates,
                    calibration=calibration,
                    evaluation=eval_data,
                    force=force,
                    on_progress=_bars(bar),
                )
        except GateFailed as failed:
            _print_export(load_bundle(Path(failed.bundle_path or out_dir), verify=False))
            _print_gates(Path(failed.bundle_path or out_dir))
            raise
        _print_export(bundle)
        _print_gates(bundle.path)
        return
    with progress() as bar:
        bundle = export(model, out_dir, cfg=cfg, force=force, on_progress=_bars(bar))
    _print_export(bundle)


def _refuse_unused_quantize_flags(**given) -> None:
    """--no-quantize with flags of the INT8 step: refuse rather than silently ignore them."""
    from quantgate.errors import ConfigError

    flag = lambda k, v: ("--no-" if v is False else "--") + k.replace("_", "-")  # noqa: E731
    if unused := [flag(k, v) for k, v in given.items() if v is not None]:
        raise ConfigError(
            f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for quantization (INT8, "
            "FP16) and its gates, which --no-quantize skips. Drop --no-quantize to run them, "
            f"or drop {'that flag' if len(unused) == 1 else 'those flags'}."
        )


def _print_export(bundle) -> None:
    e = bundle.manifest.export
    val = e["validation"]
    out.print(f"bundle {bundle.path} ({e['exporter']} exporter, opset {bundle.manifest.opset})")
    for line in _export_notes(e):
        out.print(f"  {line}", highlight=False)
    for output, diff in val["max_abs_diff"].items():
        out.print(f"  {output}: max abs diff {diff:.2e} over {len(val['cases'])} shapes")
    out.print(f"  fusions: {_fusions(e)}")


def _fusions(export: dict) -> str:
    """The fusions ONNX Runtime made, with their counts: "Attention 6, BiasGelu 6"."""
    return ", ".join(f"{k} {v}" for k, v in export.get("fusions", {}).items()) or "none"


@command()
def gate(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="BUNDLE",
            help="A bundle from `quantgate export`: with an INT8 variant to re-gate on the CPU, "
            "with FP16 or INT8 on CUDA.",
            show_default=False,
        ),
    ],
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            metavar="FILE",
            help="Evaluation data (.jsonl or .npz); the built-in model's test split by default.",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None, _kept("Accuracy gate: largest drop in points of the task metric", "POINTS")
    ] = None,
    min_speedup: Annotated[
        float | None, _kept("Speed gate: INT8 vs FP32 at every shape", "RATIO")
    ] = None,
    min_cosine: Annotated[float | None, _kept(_COSINE, "COSINE")] = None,
    min_top1: Annotated[float | None, _kept(_TOP1, "RATE")] = None,
    gate_config: _GateFile = None,
    device: Annotated[
        GateDevice | None,
        typer.Option(
            help="cpu: the INT8 variant's accuracy and speed gates on the CPU provider. cuda: "
            "every variant's gates on the CUDA provider, as a GPU host's export runs them: "
            "FP16's decide whether it ships, INT8's only whether it runs on CUDA; needs a GPU "
            "and the `gpu` extra. [default: cpu, or the --gate-config file's provider]",
            show_default=False,
        ),
    ] = None,
    allow_unlabelled: Annotated[
        bool,
        typer.Option(
            "--allow-unlabelled",
            help="Re-gate a bundle gated on labelled accuracy with evaluation data that has no "
            "labels, on agreement with FP32 (top-1, KL) instead. Without it such data is "
            "refused (exit 2): a missing or misnamed label key must not loosen a CI gate. "
            "For this run only: the next one without it is refused again.",
        ),
    ] = False,
) -> None:
    """Re-run a bundle's gates on new data (e.g. in CI after an ONNX Runtime upgrade).

    On the CPU (the default) the INT8 variant's accuracy and speed gates are measured again;
    with --device cuda, on a GPU host, every variant's gates on CUDA; the gates measured on the
    other provider are kept. The thresholds are the ones the bundle was last gated with (at
    export, or by the newest re-gate); a --gate-config file, then the flags, change them, and
    a looser one is warned about and named in the report, as is, on every run, any setting
    looser than the export's. Rewrites the manifest and
    report.md atomically with the new gates. Exit 0: every gate passed; 3: a gate failed (the
    bundle is marked failed); 2: bad bundle or data, or CUDA asked for where there is none.
    """
    from quantgate.bundle import CPU, CUDA
    from quantgate.errors import ConfigError
    from quantgate.quantize.regating import regate

    flags = _gate_flags(max_accuracy_drop, min_speedup, min_cosine, min_top1)
    provider = None if device is None else CUDA if device == GateDevice.CUDA else CPU
    try:
        with progress() as bar:
            bundle = regate(
                path, eval_data, gate_file=gate_config,
                overrides={name: value for name, (_, value) in flags.items()},
                provider=provider, on_progress=_bars(bar), allow_unlabelled=allow_unlabelled,
            )  # fmt: skip
    except GateFailed:
        _print_gates(path)
        raise
    except ConfigError as e:
        if not e.problems:
            raise
        raise _named_by_flags(e.problems, flags, gate_config) from e
    _print_gates(bundle.path)


def _served(m) -> str:
    """Which variant `quantgate serve` would pick on each provider (serve.variants'
    rule), or that it refuses the bundle."""
    from quantgate.bundle import CPU, CUDA, PASS
    from quantgate.errors import BundleError
    from quantgate.serve.variants import choose_variant

    picks = []
    with _quiet("quantgate.serve.variants"):  # its reasons are for the server's log
        for provider, name in ((CPU, "CPU"), (CUDA, "CUDA")):
            try:
                picks.append(
                    f"{choose_variant(m, provider, allow_failed=True).precision} on {name}"
                )
            except BundleError:
                picks.append(f"nothing on {name}")
    picks = ", ".join(picks)
    if m.verdict != PASS:
        return f"serve: refuses it (a gate failed); with --allow-failed-gates: {picks}"
    return f"serve picks: {picks}"


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    before = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = before


def _export_notes(export: dict) -> list[str]:
    """The exporters ``--exporter auto`` tried before the one used, and why each failed; then
    the values the legacy tracer fixed as constants in the user's code (``tracer_notes``)."""
    return [
        *(
            f"the {exporter} exporter was passed over: {why}"
            for exporter, _, why in (a.partition(": ") for a in export.get("attempts", ()))
        ),
        *(
            f"the legacy tracer fixed a value computed from a tensor at {note}"
            for note in export.get("tracer_notes", ())
        ),
    ]


def _gate_flags(max_accuracy_drop, min_speedup, min_cosine, min_top1) -> dict:
    """{GateConfig field: (its flag, the value given or None)}."""
    return {
        "max_accuracy_drop": ("--max-accuracy-drop", max_accuracy_drop),
        "min_speedup": ("--min-speedup", min_speedup),
        "min_cosine": ("--min-cosine", min_cosine),
        "min_top1_agreement": ("--min-top1", min_top1),
    }


def _gate_config(file, flags: dict):
    """The defaults, then the --gate-config file's settings, then the flags given."""
    from quantgate.errors import ConfigError
    from quantgate.quantize.decide import GateConfig

    overrides = {name: value for name, (_, value) in flags.items()}
    try:
        if file is not None:
            return GateConfig.from_file(file, **overrides)
        return GateConfig().with_overrides(**overrides)
    except ConfigError as e:
        if not e.problems:
            raise
        raise _named_by_flags(e.problems, flags, file) from e


def _named_by_flags(problems: tuple[tuple[str, str], ...], flags: dict, file: Path | None):
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


def _gate_cells(g) -> tuple[str, str, str, str, str, bool]:
    """A gate as `export`, `gate` and `inspect` print it: its label, value, interval ("" where
    it has none), op and threshold, "pass" or "FAIL", and whether another sample could have
    decided it the other way (``decide.uncertain``)."""
    from quantgate.quantize.decide import failed_by_bound, uncertain

    ci = f"[{g.ci[0]:.4g}, {g.ci[1]:.4g}]" if g.ci else ""
    mark = "pass" if g.passed else "FAIL"
    if bound := failed_by_bound(g):  # "0 <= 0.02: FAIL" needs its reason
        mark += f" (its {bound} is not {g.op} {g.threshold:g}: ci_rule upper)"
    return g.label, f"{g.value:.4g}", ci, f"{g.op} {g.threshold:g}", mark, uncertain(g)


def _bars(bar: Progress):
    """The library's on_progress (quantgate.progress) drawn as one bar per task."""
    tasks: dict[str, object] = {}

    def on_progress(task: str, done: int, total: int | None, status: str) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total, status="")
        bar.update(tasks[task], completed=done, total=total, status=status)

    return on_progress


def _print_gates(path: Path) -> None:
    """The bundle's verdict and the gates of every variant but FP32, on stdout."""
    from quantgate.bundle import load

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
            label, value, ci, bound, mark, unsure = _gate_cells(g)
            if unsure:
                mark += " (uncertain: its interval crosses the threshold)"
            ci = f" {ci}" if ci else ""
            out.print(f"    {label} {value}{ci} {bound}: {mark}", highlight=False, soft_wrap=True)
    out.print(f"  report: {path / 'report.md'}", highlight=False, soft_wrap=True)


@command()
def inspect(
    path: Annotated[
        Path, typer.Argument(metavar="BUNDLE", help="A bundle directory.", show_default=False)
    ],
    verify: Annotated[bool, typer.Option(help="Check every variant's file and sha256.")] = True,
) -> None:
    """Print a readable summary of a bundle's manifest."""
    from rich.table import Table

    from quantgate.bundle import MANIFEST, check_files, is_bundle, load
    from quantgate.errors import BundleError

    if path.is_dir() and not is_bundle(path):
        inside = sorted(str(p.parent.relative_to(path)) for p in path.glob(f"*/**/{MANIFEST}"))
        if inside:  # a repository folder, or one model's version folders
            raise BundleError(
                f"{path} is not a bundle but holds bundles in {', '.join(inside[:6])}"
                + (", ..." if len(inside) > 6 else "")
                + f": inspect one ({path / inside[0]}), or see what each model would serve "
                f"with `quantgate serve {path} --check`"
            )
    b = load(path, verify=False)  # a bundle that cannot be read is refused as it is
    if verify:
        try:
            check_files(b)
        except BundleError as e:  # a file that fails its check: the manifest itself reads
            raise BundleError(f"{e} To read its manifest anyway, pass --no-verify.") from e
    m = b.manifest
    e = m.export
    try:
        fused = _fusions(e)
        val = e.get("validation")
        if val:
            shapes = ", ".join(
                f"{c['batch']}x{c['sequence']}" + ("p" if c["padded_rows"] else "")
                for c in val["cases"]
            )
            diffs = ", ".join(f"{k} {d:.1e}" for k, d in val["max_abs_diff"].items())
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise BundleError(
            f"{path / MANIFEST} has a malformed export record ({type(err).__name__}: {err}); "
            "re-create the bundle with `quantgate export`."
        ) from err
    verdict = "[green]pass[/]" if m.verdict == "pass" else "[bold red]fail[/]"
    out.print(f"[bold]{m.name}[/]  {m.task}  verdict {verdict}  created {m.created}")
    out.print(
        f"source: {m.source.get('kind')} {m.source.get('spec')} ({str(m.source.get('sha256'))[:12]})"
    )
    out.print("tools: " + ", ".join(f"{k} {v}" for k, v in m.tools.items()))
    tensors = Table("", "name", "dtype", "dims", box=None, title_justify="left")
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for t in specs:
            tensors.add_row(kind, t.name, t.dtype, "(" + ", ".join(map(str, t.dims)) + ")")
    out.print(tensors)
    variants = Table("file", "precision", "MB", "verdict", "gates", "providers", "recipe", box=None)
    for v in m.variants:
        size = (b.path / v.file).stat().st_size / 1e6 if (b.path / v.file).exists() else 0.0
        passed = sum(g.passed for g in v.gates)
        variants.add_row(
            v.file,
            v.precision,
            f"{size:.1f}",
            v.verdict,
            f"{passed}/{len(v.gates)} passed",
            ", ".join(v.providers),
            # the candidate that shipped: smooth-static-u8s8+fp32x4 kept 4 nodes FP32
            (v.recipe or {}).get("candidate") or (v.recipe or {}).get("name", ""),
        )
    out.print(variants)
    out.print(_served(m), highlight=False, soft_wrap=True)
    if m.files:
        groups: dict[str, int] = {}
        for name in m.files:
            top, sep, _ = name.partition("/")
            groups[top + sep] = groups.get(top + sep, 0) + 1
        listed = ", ".join(f"{g} ({n} files)" if g.endswith("/") else g for g, n in groups.items())
        out.print(
            f"other files (sha256 in the manifest): {listed}", highlight=False, soft_wrap=True
        )
    if not b.report.is_file():
        out.print(f"report: {b.report} is missing", highlight=False, soft_wrap=True)
    if e:
        out.print(
            f"export: {e.get('exporter')} exporter, opset {m.opset}, max sequence {m.max_seq_len}"
        )
        for line in _export_notes(e):
            out.print(line, highlight=False, soft_wrap=True)
        out.print(f"fusions: {fused}")
        if val:
            out.print(f"validation: max abs diff {diffs} at shapes {shapes} (p: padded rows)")
    gates = [(v.precision, g) for v in m.variants for g in v.gates]
    if gates:
        table = Table("variant", "gate", "value", "threshold", "", box=None)
        for precision, g in gates:
            label, value, _, bound, mark, unsure = _gate_cells(g)
            style = "green" if g.passed else "bold red"
            unsure = " (uncertain)" if unsure else ""
            table.add_row(precision, label, value, bound, f"[{style}]{mark}[/]{unsure}")
        out.print(table)


@command()
def serve(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="A bundle, or a repository folder of them (NAME/ or NAME/VERSION/ bundles).",
        ),
    ],
    host: Annotated[
        str,
        typer.Option(
            metavar="ADDRESS",
            help="Address to listen on, for gRPC and the metrics port (:: for IPv6).",
        ),
    ] = _DEFAULT_SERVE.host,
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="gRPC port (Triton's is 8001); 0 picks a free one.",
        ),
    ] = _DEFAULT_SERVE.port,
    device: Annotated[
        ServeDevice, typer.Option(help="auto: CUDA when onnxruntime has it, else the CPU.")
    ] = _DEFAULT_SERVE.device,
    cuda_device: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="Which GPU, as CUDA numbers them (nvidia-smi lists them)."
        ),
    ] = _DEFAULT_SERVE.cuda_device_id,
    max_batch_size: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="Largest batch per request and per formed batch."),
    ] = _DEFAULT_SERVE.max_batch_size,
    max_queue_delay_us: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="MICROSECONDS",
            help="How long a request may wait for others to batch with.",
        ),
    ] = _DEFAULT_SERVE.max_queue_delay_us,
    max_queue_size: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="Waiting requests per model; beyond it UNAVAILABLE."),
    ] = _DEFAULT_SERVE.max_queue_size,
    dynamic_batching: Annotated[
        bool, typer.Option(help="Batch concurrent requests into one session.run.")
    ] = _DEFAULT_SERVE.dynamic_batching,
    instances: Annotated[
        int, typer.Option(min=1, metavar="N", help="Batches run at once per model.")
    ] = _DEFAULT_SERVE.instances,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="ONNX Runtime intra-op threads per session (0: its default, one per "
            "physical core).",
        ),
    ] = _DEFAULT_SERVE.intra_op_threads,
    max_request_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="Largest request, compressed or not (gRPC's default 4 MiB: a request is token "
            "ids, and parsing costs ~40x its size in memory); beyond it RESOURCE_EXHAUSTED.",
        ),
    ] = _DEFAULT_SERVE.max_request_bytes,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            min=1, metavar="BYTES", help="Largest response; beyond it RESOURCE_EXHAUSTED."
        ),
    ] = _DEFAULT_SERVE.max_message_bytes,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="Seconds admitted requests get to finish after SIGTERM, Ctrl-C or SIGHUP (a "
            "second signal exits now). Requests still unanswered when it runs out are "
            "cancelled, and the server exits 1. Keep it under the orchestrator's termination "
            "grace (Kubernetes: terminationGracePeriodSeconds, 30 by default).",
        ),
    ] = _DEFAULT_SERVE.shutdown_grace_s,
    precision: Annotated[
        Precision | None,
        typer.Option(help="Serve this variant instead of the fastest that passed."),
    ] = _DEFAULT_SERVE.precision,
    allow_failed_gates: Annotated[
        bool,
        typer.Option(
            "--allow-failed-gates",
            help="Serve a bundle whose gates failed (never a failed variant unless --precision names it).",
        ),
    ] = _DEFAULT_SERVE.allow_failed_gates,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics over HTTP on this port, at /metrics (/ redirects "
            "there), and the probes /healthz and /readyz; other paths are 404. 0 picks a free "
            "port and prints it. Off unless given (Triton's is 8002).",
        ),
    ] = _DEFAULT_SERVE.metrics_port,
    tls_cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PEM server certificate (enables TLS).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PEM private key for --tls-cert.")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="PEM CA that client certificates must chain to (mutual TLS)."
        ),
    ] = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="QUANTGATE_AUTH_TOKEN",
            metavar="TOKEN",
            help="Require 'authorization: Bearer TOKEN' on inference calls (health, "
            "ServerLive/Ready and reflection stay open for probes). On the command line it "
            "shows in `ps`: prefer the variable or --auth-token-file.",
        ),
    ] = _DEFAULT_SERVE.auth_token,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Require a bearer token, any of this file's (one per line, # comments), "
            "read again within a second of a change: rotate a token with no restart (add "
            "the new one, move the clients, remove the old), as a mounted Secret updates.",
        ),
    ] = _DEFAULT_SERVE.auth_token_file,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log",
            help="Log one line per RPC, when it ends, at INFO to the logger "
            "quantgate.serve.access: method, model, version, code (the gRPC status name), "
            "rows, latency_ms, peer, and the client's request id (a stream: one line, with "
            "its requests and how many failed); with --log-format json the fields are keys. "
            "Off by default: the line costs a batch-1 request a few percent of its latency.",
        ),
    ] = _DEFAULT_SERVE.access_log,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            help="The log on stderr: text (a UTC timestamp, level, logger and message per "
            "line) or json (one object per line: ts, level, logger, message, and a record's "
            "fields as keys, such as --access-log's), for a log pipeline. stdout's lines "
            "(serving ..., listening on ...) stay text.",
        ),
    ] = LogFormat.TEXT,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Load and verify everything as serving would (hashes, gates, sessions, TLS "
            "files), print what each model would serve, and exit without listening.",
        ),
    ] = False,
) -> None:
    """Serve bundles over gRPC (KServe v2 / Triton protocol) until SIGTERM or Ctrl-C.

    Verifies every bundle's hashes, refuses bundles whose gates failed, and serves per
    execution provider the fastest variant that passed. Health checks, reflection,
    Prometheus metrics; SIGTERM finishes every admitted request, then exits 0 (1 when
    --shutdown-grace runs out first).
    """
    from quantgate.errors import ConfigError
    from quantgate.serve.config import ServeConfig, TLSConfig
    from quantgate.serve.server import run, verify

    if (tls_cert is None) != (tls_key is None) or (tls_client_ca and not tls_cert):
        raise ConfigError("TLS needs both --tls-cert and --tls-key (and them for --tls-client-ca)")
    tls = TLSConfig(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
    if auth_token is None and os.environ.get("QUANTGATE_AUTH_TOKEN") == "":
        auth_token = ""  # set but empty: refused below, not read as "no auth"
    cfg = ServeConfig(
        path=path,
        host=host,
        port=port,
        device=ServeDevice(device).value,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size,
        dynamic_batching=dynamic_batching,
        instances=instances,
        intra_op_threads=threads,
        cuda_device_id=cuda_device,
        max_request_bytes=max_request_bytes,
        max_message_bytes=max_message_bytes,
        shutdown_grace_s=shutdown_grace,
        precision=precision and Precision(precision).value,
        allow_failed_gates=allow_failed_gates,
        metrics_port=metrics_port,
        access_log=access_log,
        tls=tls,
        auth_token=auth_token,
        auth_token_file=auth_token_file,
    )

    verbose = (ctx.obj or {}).get("verbose", False)
    if check:
        with server_log(verbose, log_format):
            repository = verify(cfg)
        for m in repository:
            out.print(f"would serve {m.describe()}", highlight=False, soft_wrap=True)
        out.print(f"{path}: ready to serve", highlight=False, soft_wrap=True)
        return

    def ready(bound: int, engine) -> None:
        for m in engine.repository:
            out.print(f"serving {m.describe()}", highlight=False, soft_wrap=True)
        if engine.metrics.http_port is not None:  # the free one chosen for --metrics-port 0
            out.print(
                f"metrics on http://{cfg.address(engine.metrics.http_port)}/metrics",
                highlight=False,
                soft_wrap=True,
            )
        out.print(f"listening on {cfg.address(bound)}", highlight=False, soft_wrap=True)

    with server_log(verbose, log_format):
        run(cfg, on_ready=ready)


@command()
def infer(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="Model name, as ModelMetadata reports it; default: the name in --bundle's "
            "manifest (a repository serves a model under its folder's name instead).",
            show_default=False,
        ),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="NAME=JSON",
            help=(
                "NAME=JSON, e.g. -i 'input_ids=[[5, 7, 9]]'. A missing attention_mask is all "
                "ones, a missing token_type_ids all zeros."
            ),
        ),
    ] = None,
    texts: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            "-t",
            metavar="TEXT",
            help="Text to send instead of token ids, tokenized by --bundle's tokenizer; "
            "repeat it for a batch.",
        ),
    ] = None,
    bundle_dir: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            metavar="BUNDLE",
            help="The bundle the server serves: its tokenizer reads --text, its name is "
            "MODEL's default.",
        ),
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option(
            "--output",
            "-o",
            metavar="NAME",
            help="Ask only for this output (repeatable); default all.",
        ),
    ] = None,
    classes: Annotated[
        int,
        typer.Option(
            "--classes",
            "-c",
            min=0,
            metavar="K",
            help="Print each row's top K classes (score, index, class name) instead of the "
            "tensor: Triton's classification extension, asked of every output printed.",
        ),
    ] = 0,
    url: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="Server address.")
    ] = "localhost:8001",
    version: Annotated[
        str, typer.Option(metavar="VERSION", help="Model version (default: the newest).")
    ] = "",
    token: Annotated[
        str | None,
        typer.Option(envvar="QUANTGATE_AUTH_TOKEN", metavar="TOKEN", help="Bearer token."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds before giving up.")
    ] = 30.0,
    tls: Annotated[
        bool, typer.Option("--tls", help="Use TLS, trusting the system's CA certificates.")
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM CA that signed the server (TLS)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM client certificate (mutual TLS)."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM private key for --tls-cert."
        ),
    ] = None,
) -> None:
    """Send one request to a running server and print the outputs.

    Inputs are arrays (-i NAME=JSON), or text (-t TEXT --bundle BUNDLE) that the bundle's
    own tokenizer turns into them.
    """
    import numpy as np

    from quantgate.bundle import load
    from quantgate.errors import (
        BadRequest,
        ConfigError,
        ModelNotFound,
        Unauthenticated,
        Unavailable,
    )
    from quantgate.serve.client import (
        Client,
        ClientTLS,
        ConnectionFailed,
        InputRefused,
        request_inputs,
    )

    if not inputs and not texts:
        raise ConfigError(
            "nothing to send: give -i NAME=JSON per input, or -t TEXT --bundle BUNDLE"
        )
    if texts and bundle_dir is None:
        raise ConfigError("--text needs --bundle: the bundle whose tokenizer reads the text")
    if model is None and bundle_dir is None:
        raise ConfigError(
            "which model? Give its name (MODEL, as the server serves it), or --bundle BUNDLE "
            "for the name in the bundle's manifest"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")
    if timeout <= 0:
        raise ConfigError(f"--timeout must be more than 0 seconds, got {timeout:g}")
    secure = tls or tls_ca is not None or tls_cert is not None
    client_tls = ClientTLS(tls_ca, tls_cert, tls_key) if secure else None
    # verified: the tokenizer is the one the bundle was gated with
    bundle = None if bundle_dir is None else load(bundle_dir, verify=bool(texts))
    if classes and bundle is not None:
        _refuse_classes_of(bundle.manifest.task, bundle_dir)
    named = model or bundle.manifest.name
    with Client(url, token=token, timeout=timeout, tls=client_tls) as client:
        try:
            metadata = client.metadata(named, version)
        except ModelNotFound as e:
            if model:
                raise
            raise ModelNotFound(
                f"{e}. {named!r} is the name in {bundle_dir}'s manifest; a repository serves "
                "each model under its folder's name: give that name as MODEL"
            ) from e
        except Unauthenticated as e:
            raise Unauthenticated(
                f"{e} (`quantgate infer` sends --token, or the QUANTGATE_AUTH_TOKEN variable)"
            ) from e
        except ConnectionFailed as e:
            given = {"--tls": tls, "--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
            tls_flags = [flag for flag, value in given.items() if value]
            raise Unavailable(_cannot_connect(e, tls_flags, tls_ca)) from e
        spec = {t.name: t for t in metadata.inputs}
        tok, values, tagger = None, {}, False
        if texts:
            from quantgate.quantize.data import ModelInfo
            from quantgate.quantize.text import tokenize, tokenizer_of
            from quantgate.tasks import TOKEN_TASKS

            info = ModelInfo.from_manifest(bundle.manifest, bundle.path)
            tok = tokenizer_of(info)  # the bundle's: it reads --text, and a tagger's tags back
            values = tokenize(texts, info, tok)
            tagger = info.task in TOKEN_TASKS
        typed = {}  # each --input's JSON, by input name
        for item in inputs or ():
            name, sep, value = item.partition("=")
            if not sep or name not in spec:
                raise BadRequest(
                    f"--input {item!r}: expected NAME=JSON with NAME one of {sorted(spec)}"
                )
            if name in values:
                by = "--text gives it" if texts else "it is given twice"
                raise BadRequest(f"--input {name}: {by}; give each input once")
            typed[name] = value
            values[name] = _json_input(name, value)
        try:
            feeds = request_inputs(metadata, values)
        except InputRefused as e:
            raise BadRequest(_refused(e, typed, spec)) from e
        wanted = tuple(outputs or ())
        if classes and not wanted:
            wanted = tuple(t.name for t in metadata.outputs)
        answer = client.infer(named, feeds, version=version, outputs=wanted, classes=classes)
        for name, array in answer.items():
            if array.dtype == object:  # top classes
                _print_classes(name, array)
                continue
            if tagger and name == "logits" and array.ndim == 3:
                _print_tags(texts, feeds, array, bundle.manifest.class_names, tok)
                continue
            out.print(f"{name} {list(array.shape)} {array.dtype}", highlight=False, soft_wrap=True)
            out.print(
                np.array2string(array, precision=4, threshold=64), highlight=False, soft_wrap=True
            )


def _cannot_connect(e, tls_flags: list[str], tls_ca: Path | None) -> str:
    """The client's ConnectionFailed ``e`` with what to do in infer's flags (``tls_flags``:
    the TLS flags given)."""
    drop = " and ".join(
        [", ".join(tls_flags[:-1]), *tls_flags[-1:]] if tls_flags[1:] else tls_flags
    )
    if not tls_flags:  # a TLS server closes a plaintext connection
        closed = "If it serves TLS, pass --tls-ca CA.pem (or --tls for a certificate trusted here)."
    elif "--tls-cert" not in tls_flags:  # as a mutual-TLS server closes one without a certificate
        closed = "If it asks for a client certificate (mutual TLS), pass --tls-cert and --tls-key."
    else:
        closed = "See the server's log for why (a certificate its --tls-client-ca did not sign?)."
    advice = {
        "unresolved": "Check the host in --url.",
        "untrusted": "Pass --tls-ca with the CA that signed the server's certificate (a "
        "self-signed certificate is its own CA)"
        + ("." if tls_ca is None else f"; {tls_ca} is not it."),
        "hostname": "Give --url the name its certificate holds.",
        "not_tls": f"Drop {drop} to connect in plaintext.",
        "not_grpc": "Give --url the server's gRPC port.",
        "closed": closed,
    }.get(e.cause)
    if advice is None:  # nothing answered: refused, or a cause gRPC did not say
        advice = "Start a server with `quantgate serve BUNDLE`, or pass --url to reach another."
    return f"{e.what}. {advice}"


def _refuse_classes_of(task: str, bundle_dir: Path) -> None:
    """--classes on a model whose rows are not one score per class: Triton's classification
    reads everything after the batch axis as a row, so a tagger's "classes" would be the
    largest scores over all its tokens (index token * classes + class, unnamed), and an
    embedding's the largest coordinates of its vectors. Refused, with what to ask instead."""
    from quantgate.errors import ConfigError
    from quantgate.tasks import EMBEDDING_TASKS, TOKEN_TASKS

    if task in TOKEN_TASKS:
        raise ConfigError(
            f"--classes: {bundle_dir} is a token classifier ({task}), whose logits are "
            "(batch, sequence, classes). --classes reads everything after the batch axis as "
            "one row (Triton's rule), so it would print the largest scores over all tokens, "
            "indexed token * classes + class, without names. For each token's top class by "
            "name, send text: -t TEXT --bundle BUNDLE; for the scores, drop --classes."
        )
    if task in EMBEDDING_TASKS:
        raise ConfigError(
            f"--classes: {bundle_dir} is an embedding model ({task}): it has no classes, and "
            "--classes would print the largest coordinates of each row's flattened vectors. "
            "Drop --classes to print its outputs."
        )


def _print_classes(name: str, strings) -> None:
    """One line per row: its top classes, best first, from Triton's "score:index[:label]"."""
    rows = strings.reshape(-1, strings.shape[-1]) if strings.ndim else strings.reshape(1, -1)
    k = rows.shape[1]
    out.print(
        f"{name}: {f'top {k} classes' if k != 1 else 'top class'} of each row", highlight=False
    )
    for r, row in enumerate(rows):
        items = []
        for s in row:
            score, index, *label = s.decode().split(":", 2)
            named = f"{label[0]!r} ({index})" if label else index
            items.append(f"{named} {float(score):.4f}")
        out.print(f"  row {r}: " + ", ".join(items), highlight=False, soft_wrap=True)


def _print_tags(texts: list[str], feeds: dict, logits, names: tuple[str, ...], tok) -> None:
    """A token classifier's answer to text as a person reads it: each real token of each
    text, its top class by name and its softmax probability; ``tok`` reads the ids back."""
    import numpy as np

    mask = feeds.get("attention_mask", np.ones_like(feeds["input_ids"])).astype(bool)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    plain = {"highlight": False, "markup": False, "soft_wrap": True}  # "[CLS]", "[/b]" as typed
    out.print(f"logits {list(logits.shape)}: each token's top class", **plain)
    for text, ids, real, p in zip(texts, feeds["input_ids"], mask, probs, strict=True):
        out.print(f"  {text!r}", **plain)
        for token, row in zip(tok.convert_ids_to_tokens(ids[real].tolist()), p[real], strict=True):
            top = int(row.argmax())
            label = names[top] if top < len(names) else str(top)
            out.print(f"    {token:<16} {label:<12} {row[top]:.3f}", **plain)


def _json_input(name: str, text: str):
    """One --input's JSON value (the client's ``request_inputs`` makes it an array)."""
    import json

    from quantgate.errors import BadRequest

    try:
        return json.loads(text)
    except ValueError as e:
        raise BadRequest(f"--input {name}: not JSON ({e}); expected e.g. [[5, 7, 9]]") from e


def _refused(e, typed: dict[str, str], spec: dict) -> str:
    """The client's InputRefused ``e`` said of --input's flag (``typed``: each input's JSON
    as given), with how to wrap one row as a batch of one."""
    if e.cause == "unknown":  # --input's names are checked: one --text's tokenizer gives
        return f"--text: {e}"
    datatype = spec[e.name].datatype
    if e.cause == "datatype":  # a BYTES input, given or to fill in
        return f"input {e.name!r} is {datatype}, which `quantgate infer` cannot send"
    text = typed.get(e.name)
    if e.cause == "not_numbers" and text is not None:
        return f"--input {e.name}: expected numbers that fit {datatype}, got {text}"
    if e.cause == "rank" and text is not None:
        wrapped = f"[{text.strip()}]"
        wrapped = wrapped if len(wrapped) <= 40 else wrapped[:34] + " ... ]]"
        return f"--input {e.name}: {e.what}; send one row as a batch of one: " + (
            f"-i '{e.name}={wrapped}'"
        )
    return f"--input {e.name}: {e.what}"


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage errors: from click itself, and from the copy newer typers vendor."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).ClickException)
    return tuple(found)


# The signal that ended the command, if one did: main() reports it, whatever it interrupted.
_interrupted: list[signal.Signals] = []


@contextlib.contextmanager
def _ending_signals() -> Iterator[None]:
    """While the block runs, Ctrl-C raises KeyboardInterrupt, and SIGTERM or SIGHUP (the
    terminal closed) exit through SystemExit (128 + the signal), so that `with` blocks remove
    their temporary files; the default handlers of the two would end the process without
    running them. Each is recorded for main() to report; which are handled is
    ``signals.handling``'s rule. (The server installs its own handlers while it serves.)"""

    def ended(signum, _frame):
        _interrupted.append(signal.Signals(signum))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)

    with signals.handling(ended):
        yield


def _exit_interrupted(written: list[Path]) -> NoReturn:
    """Say which signal ended the command, and what it had already replaced (``written``:
    an interrupt after the bundle's swap finds the new bundle in place)."""
    sig = _interrupted[0]
    after = f" after writing {', '.join(map(str, written))}, which holds the new content"
    console.print(f"interrupted ({sig.name}){after if written else ''}", highlight=False)
    sys.exit(128 + sig)


# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them.
_EXTRAS = {
    "torch": "export",
    "onnxscript": "export",
    "sklearn": "export",
    "matplotlib": "export",
    "transformers": "hf",
    "tokenizers": "hf",
    "onnxruntime": "cpu",
}


def run() -> None:
    """The console script and ``python -m quantgate``: ``main``, with a Ctrl-C, SIGTERM or
    SIGHUP that comes outside the command (while it prints its last lines, or while Python
    shuts down) recorded rather than raised: Python's own handler raised KeyboardInterrupt
    wherever it found the process, a traceback and exit 0 after a finished command. main
    reports one that comes before it exits; a second one ends the process at once."""

    def late(signum: int, _frame: object) -> None:
        if late_signals:
            os._exit(128 + signum)
        late_signals.append(signum)
        _interrupted.append(signal.Signals(signum))

    late_signals: list[int] = []
    signals.install(late)  # the command's own handlers (_ending_signals) come back to it
    main()


def main() -> None:
    """Run the app, turning quantgate's errors into exit codes (``run`` is the console
    script's entry: this one leaves the process's signal handlers as they were)."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        # --help into a pipe or a log: whole lines of up to 120 columns, not a terminal's 80
        # (click would break "sequence-classification" at its hyphen).
        app.info.context_settings |= {"terminal_width": 120, "max_content_width": 120}
    _interrupted.clear()  # main() may run more than once in a process (tests, a program)
    written = len(fsutil.replaced)
    try:
        with _ending_signals():
            code = app(standalone_mode=False)  # a command's return value, or typer.Exit's code
    except BaseException as e:
        if _interrupted:  # raised because of the signal, whatever it interrupted (an import)
            _exit_interrupted(fsutil.replaced[written:])
        _exit_for(e)
    if _interrupted or code == 130:  # typer turns a KeyboardInterrupt into exit code 130
        _interrupted[:] = _interrupted or [signal.SIGINT]
        _exit_interrupted(fsutil.replaced[written:])
    sys.exit(code or 0)


def _exit_for(e: BaseException) -> NoReturn:
    """End the process as the exception that ended a command says: its message and exit
    code for quantgate's errors and a user's mistakes; anything else is raised on."""
    if isinstance(e, _usage_errors()):  # a bad option or argument: click's message, exit 2
        if getattr(e, "option_name", None) in ("-v", "--verbose"):
            e.message += " (it goes before the command: quantgate -v COMMAND ...)"
        e.show()
        sys.exit(e.exit_code)
    if isinstance(e, QuantgateError):
        _error(str(e))
        sys.exit(exit_code(e))
    # an optional extra this command needs is not installed
    if isinstance(e, ModuleNotFoundError) and (extra := _EXTRAS.get((e.name or "").split(".")[0])):
        _error(
            f"this command needs {e.name}, which is not installed: it comes with the "
            f"`{extra}` extra. Run: pip install 'quantgate[{extra}]'"
        )
        sys.exit(2)
    if isinstance(e, typer.Abort) and isinstance(e.__context__, EOFError):
        _error(f"unexpected end of file ({e.__context__})")  # click's Abort for any EOFError
        sys.exit(1)
    if isinstance(e, (typer.Abort, KeyboardInterrupt)):
        console.print("interrupted (SIGINT)")
        sys.exit(130)
    raise e


def _error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
