"""The bundle: the contract between export/quantize and serve.

A bundle is a directory::

    bundle/
      manifest.json      what is inside, where it came from, and every gate's result
      model.fp32.onnx    the validated FP32 export (always present)
      model.int8.onnx    when quantization ran
      model.fp16.onnx    optional, for the CUDA execution provider
      report.md          the human version of the gates

It is written atomically: everything goes to a temporary sibling directory which is then
renamed into place, so a crash never leaves a half-written bundle where a good one was.
This module depends on nothing but the standard library: the serving host reads bundles
without torch or the quantization stack installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import BundleError
from quantgate.fsutil import atomic_dir, target_problem

MANIFEST = "manifest.json"
REPORT = "report.md"
FORMAT_VERSION = 1

PASS, FAIL = "pass", "fail"
PRECISIONS = ("fp32", "int8", "fp16")


# The execution providers a variant is meant for (ONNX Runtime's names).
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``dims`` mixes ints and symbolic axis names ("batch")."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    dims: tuple[int | str, ...]


SPEED_PREFIX = "speedup_"  # speed gates are named speedup_b{batch}_s{sequence}


def speed_gate_name(batch: int, sequence: int) -> str:
    return f"{SPEED_PREFIX}b{batch}_s{sequence}"


def speed_shape(name: str) -> tuple[int, int] | None:
    """(batch, sequence) of a speed gate's name; None for any other gate."""
    found = re.fullmatch(rf"{SPEED_PREFIX}b(\d+)_s(\d+)", name)
    return (int(found[1]), int(found[2])) if found else None


@dataclass(frozen=True)
class GateResult:
    """One measured gate: ``value`` compared with ``threshold`` in direction ``op``."""

    name: str  # "accuracy_drop", "cosine", "speedup_b1_s128", "max_abs_diff", ...
    value: float
    threshold: float
    op: str  # "<=" or ">=": how value must compare with threshold to pass
    passed: bool
    ci: tuple[float, float] | None = None  # confidence interval of value, when bootstrapped
    provider: str | None = None  # execution provider for speed gates
    detail: str = ""

    @property
    def is_speed(self) -> bool:
        return speed_shape(self.name) is not None


@dataclass(frozen=True)
class Variant:
    """One ONNX file in the bundle and the evidence for shipping it."""

    file: str
    precision: str  # one of PRECISIONS
    sha256: str
    providers: tuple[str, ...] = (CPU,)  # where it is meant to run
    recipe: dict[str, Any] | None = None  # quantization recipe, as a plain value
    gates: tuple[GateResult, ...] = ()
    verdict: str = PASS  # "pass" or "fail"; the FP32 reference passes by validation
    not_for: tuple[str, ...] = ()  # providers it must not be served on, e.g. INT8 on CUDA
    notes: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == PASS


@dataclass(frozen=True)
class Manifest:
    name: str
    task: str  # "classification", "feature-extraction", "causal-lm", ...
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    opset: int
    source: dict[str, Any]  # what was exported: kind, spec, sha256
    version: int = 1
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    tools: dict[str, str] = field(default_factory=dict)  # package -> version
    calibration: dict[str, Any] | None = None  # source, sha256, samples
    export: dict[str, Any] = field(default_factory=dict)  # exporter, validation diffs, fusions
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer info, label names
    format_version: int = FORMAT_VERSION

    @property
    def verdict(self) -> str:
        """Pass only when every variant passed its gates."""
        return PASS if all(v.passed for v in self.variants) else FAIL

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the model was exported and validated for (None: not recorded)."""
        n = self.export.get("max_seq_len")
        return int(n) if n else None

    def variant(self, precision: str) -> Variant:
        for v in self.variants:
            if v.precision == precision:
                return v
        have = ", ".join(v.precision for v in self.variants)
        raise BundleError(
            f"bundle {self.name!r} has no {precision} variant (it has: {have}); `quantgate "
            "export` writes int8 and fp16 variants unless run with --no-quantize (or --no-fp16)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d.pop("verdict", None)
        fmt = d.get("format_version", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise BundleError(
                f"manifest format {fmt} is newer than this quantgate understands ({FORMAT_VERSION}); "
                "upgrade quantgate"
            )

        def spec(t: dict) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["dims"]))

        def gate(g: dict) -> GateResult:
            for key in ("value", "threshold"):
                if not isinstance(g.get(key), (int, float)):
                    raise TypeError(
                        f"gate {g.get('name')!r} has {key} {g.get(key)!r}, not a number"
                    )
            ci = g.get("ci")
            return GateResult(**{**g, "ci": tuple(ci) if ci is not None else None})

        def variant(v: dict) -> Variant:
            file = v.get("file")
            if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
                raise TypeError(f"variant file {file!r} is not a file name inside the bundle")
            return Variant(
                **{
                    **v,
                    "providers": tuple(v.get("providers", ())),
                    "gates": tuple(gate(g) for g in v.get("gates", ())),
                    "not_for": tuple(v.get("not_for", ())),
                }
            )

        for key in ("source", "tools", "export", "extra"):
            if not isinstance(d.get(key, {}), dict):
                raise TypeError(f"{key} is a {type(d[key]).__name__}, not an object")
        if not isinstance(d["variants"], list) or not d["variants"]:
            raise TypeError(f"variants is {d['variants']!r}, not a non-empty list")
        d["inputs"] = tuple(spec(t) for t in d["inputs"])
        d["outputs"] = tuple(spec(t) for t in d["outputs"])
        d["variants"] = tuple(variant(v) for v in d["variants"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, precision: str) -> Path:
        return self.path / self.manifest.variant(precision).file

    @property
    def report(self) -> Path:
        return self.path / REPORT


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with ``verify``, check every variant's file and sha256."""
    path = Path(path)
    if not path.exists():
        raise BundleError(
            f"no bundle at {path}: the directory does not exist. Create one with `quantgate export`."
        )
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(
            f"{path} is not a bundle: it has no {MANIFEST}. Create one with `quantgate export`."
        )
    try:
        manifest = Manifest.from_dict(json.loads(mpath.read_text()))
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(
            f"{mpath} is corrupt ({type(e).__name__}: {e}); re-create the bundle with `quantgate export --force`."
        ) from e
    if verify:
        for v in manifest.variants:
            f = path / v.file
            if not f.is_file():
                raise BundleError(
                    f"bundle {path}: variant {v.precision} file {v.file} is missing. Restore it, "
                    "or re-create the bundle with `quantgate export`."
                )
            digest = sha256_file(f)
            if digest != v.sha256:
                raise BundleError(
                    f"bundle {path}: {v.file} has sha256 {digest[:12]}..., the manifest expects "
                    f"{v.sha256[:12]}...; the file was changed after export. Re-export or restore it."
                )
    return Bundle(path, manifest)


@contextlib.contextmanager
def staging(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Stage a new bundle for ``out``; on clean exit it replaces ``out`` atomically.

    Yields a temporary sibling directory to write files into. If the block raises, the
    temporary directory is removed and whatever was at ``out`` is untouched. ``out`` may be
    missing, empty, or an existing bundle; any other existing directory is refused unless
    ``force``.
    """
    check_writable_target(Path(out).absolute(), force=force)
    with atomic_dir(out) as tmp:
        yield tmp


def check_writable_target(out: Path, *, force: bool) -> None:
    """Refuse a path the bundle cannot be written to, and to overwrite something that is not a
    bundle unless forced. Call before heavy work."""
    if problem := target_problem(out, force=force, is_ours=is_bundle, noun="bundle"):
        raise BundleError(problem)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
