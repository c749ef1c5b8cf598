"""The bundle: the contract between export/quantize and serve.

A bundle is a directory::

    bundle/
      manifest.json      what is inside, where it came from, and every gate's result
      model.fp32.onnx    the validated FP32 export (always present)
      model.int8.onnx    when quantization ran
      model.fp16.onnx    optional, for the CUDA execution provider
      report.md          the human version of the gates
      candidates.png     the recipe search's accuracy/speed plot, when it ran
      tokenizer/         a text model's tokenizer, so the bundle serves and gates text alone

The manifest lists every other file with its sha256 (the models in ``variants``; the
tokenizer, external weights and the plot in ``files``; not report.md, which is for people),
and ``load`` checks them. What each field of the manifest must be is ``schema``'s: a
manifest is read only once ``schema.manifest_problems`` finds nothing wrong with it.

It is written atomically: everything goes to a temporary sibling directory which is then
renamed into place, so a crash never leaves a half-written bundle where a good one was.

The manifest's ``format_version`` (``FORMAT_VERSION``) tells a reader whether it can read a
bundle right: every release refuses a higher number than its own ("manifest format N is
newer than this quantgate understands"), and reads its own and every lower one. Raise it
whenever an older release would misread a bundle this one writes (read a value wrong, or
ignore a field or a gate that changes the answer), not merely when a field is added that
it may safely ignore. Format 1: quantgate 0.1.0. Format 2 (0.2.0): a gate's ``value`` may
be null (not measured); ``export.pad_values`` says what pads each input, where format 1's
readers pad with 0 (wrong answers, silently, for a model whose pad token is not 0); and
gates a format 1 re-gate would drop. Every manifest quantgate writes (a re-gate's of an
older bundle too) is written in this format.

This module depends on nothing but the standard library: the serving host reads bundles
without torch or the quantization stack installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import BundleError, BundleOutOfSpace, ConfigTypeError
from quantgate.fsutil import (
    asides,
    atomic_dir,
    disk_full,
    gone_cwd,
    is_mount_point,
    replace_files,
    resolve_target,
    size_said,
    spec_path,
    target_problem,
)
from quantgate.schema import (
    FAIL,
    MANIFEST,
    PASS,
    RECREATE,
    REPORT,
    TOKENIZER_DIR,
    described,
    is_int,
    is_relative_path,
    manifest_problems,
    problem_list,
    unique_keys,
)

PLOT = "candidates.png"  # the recipe search's plot (quantize.report)
# The names quantgate writes in a bundle besides the variants: the bundle's own wherever
# they are found, listed in its manifest or not (older manifests list neither the plot
# nor the tokenizer).
OWN_NAMES = (MANIFEST, REPORT, PLOT, TOKENIZER_DIR)

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # see the module's docstring: when to raise it, what each one means
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything near this is not one


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
    ci: tuple[float, float] | None = None  # confidence interval of value, where it has one
    provider: str | None = None  # where it was measured; None: the CPU, for accuracy gates
    detail: str = ""

    @property
    def is_speed(self) -> bool:
        return speed_shape(self.name) is not None

    @property
    def label(self) -> str:
        """Its name as shown to a person: "... on CUDA" where it was measured there (a
        variant's cosine or speed gate on CUDA and on the CPU share a name)."""
        return f"{self.name} on CUDA" if self.provider == CUDA else self.name


def all_passed(gates) -> bool:
    """Whether there are ``gates`` and every one passed. A variant ships on evidence: with
    no gate at all it has none, and fails."""
    return bool(gates) and all(g.passed for g in gates)


def verdict_of(gates) -> str:
    """PASS or FAIL by ``all_passed``: the one rule for a variant's verdict."""
    return PASS if all_passed(gates) else FAIL


def speed_score(gates) -> float:
    """The geometric mean of the speed gates' speedups among ``gates``; 0 without one. The
    search ranks passing candidates by it; the server serves a variant over FP32 only where
    it is above 1 on the provider."""
    s = [max(g.value, 1e-9) for g in gates if g.is_speed]
    return math.exp(sum(map(math.log, s)) / len(s)) if s else 0.0


@dataclass(frozen=True)
class Variant:
    """One ONNX file in the bundle and the evidence for shipping it."""

    file: str
    precision: str  # one of PRECISIONS
    sha256: str
    providers: tuple[str, ...] = (CPU,)  # where it is meant to run
    recipe: dict[str, Any] | None = None  # quantization recipe, as a plain value
    gates: tuple[GateResult, ...] = ()
    # "pass" or "fail": derived from the gates (verdict_of), so that a variant given new gates
    # gets their verdict; an INT8 or FP16 variant without any fails (it ships on evidence:
    # its gates deleted from a manifest, a failed one was served); an FP32 reference without
    # gates (an older bundle's) passes by validation.
    verdict: str = PASS
    not_for: tuple[str, ...] = ()  # providers it must not be served on, e.g. INT8 on CUDA
    notes: str = ""

    def __post_init__(self) -> None:
        if self.gates or self.precision != "fp32":
            object.__setattr__(self, "verdict", verdict_of(self.gates))

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def dynamic(self) -> bool:
        """Whether its recipe is dynamic INT8: activation scales taken from each batch at run
        time, so a row's answer moves with its batch-mates (none fixed at calibration)."""
        return (self.recipe or {}).get("method") == "dynamic"


def class_names(extra: dict[str, Any]) -> tuple[str, ...]:
    """A classifier's class names by index, as its export records them in ``extra["labels"]``
    (a Hugging Face config's id2label; the digits '0'..'9' for the built-in model); () where
    it records none, or anything but a list of strings."""
    names = extra.get("labels")
    if isinstance(names, list) and all(isinstance(x, str) for x in names):
        return tuple(names)
    return ()


@dataclass(frozen=True)
class Manifest:
    name: str
    task: str  # "sequence-classification", "feature-extraction", "custom", or a factory's own
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
    # The bundle's other files (the tokenizer, external weights, the plot), by path relative
    # to the bundle ("tokenizer/vocab.txt") -> sha256; verified at load like the variants.
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def verdict(self) -> str:
        """Pass only when every variant passed its gates."""
        return PASS if all(v.passed for v in self.variants) else FAIL

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.extra)

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the model was exported and validated for (None: not recorded)."""
        n = self.export.get("max_seq_len")
        return int(n) if n else None

    @property
    def pad_values(self) -> dict[str, int | float]:
        """What fills a row past its real length, per input (0 where not recorded): the
        export's record, else, for bundles before it, a Hugging Face model's pad token id."""
        recorded = self.export.get("pad_values")
        if isinstance(recorded, dict):
            return {str(k): v for k, v in recorded.items() if isinstance(v, (int, float))}
        pad = (self.extra.get("huggingface") or {}).get("pad_token_id")
        return {"input_ids": int(pad)} if isinstance(pad, int) else {}

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
        """The manifest as manifest.json holds it: JSON's types only (lists, not tuples), and
        a value not measured (a gate's NaN, a candidate's NaN cosine) as null.
        ``Manifest.from_dict`` reads it back."""
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        return _finite(d)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = MANIFEST) -> Manifest:
        """The manifest a JSON value describes. Every field is checked first: a value of the
        wrong type or shape, an unknown field, or a verdict its gates do not support raises
        one ``BundleError`` listing every problem (``source`` names the file in it)."""
        if not isinstance(d, dict):
            raise BundleError(
                f"{source} is corrupt: expected a JSON object at the top, found {described(d)}. "
                + RECREATE
            )
        # First: a newer release's manifest may fail every check below, and is no corrupt one.
        fmt = d.get("format_version", FORMAT_VERSION)
        if is_int(fmt) and fmt > FORMAT_VERSION:
            tools = d.get("tools")
            by = tools.get("quantgate") if isinstance(tools, dict) else None
            raise BundleError(
                f"manifest format {fmt} is newer than this quantgate understands ({FORMAT_VERSION}); "
                "upgrade quantgate"
                + (f" (the bundle was written by quantgate {by})" if isinstance(by, str) else "")
            )
        if problems := manifest_problems(d):
            raise BundleError(f"{source} is corrupt: {problem_list(problems)}{RECREATE}")

        def spec(t: dict) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["dims"]))

        def gate(g: dict) -> GateResult:
            ci = g.get("ci")
            value = math.nan if g["value"] is None else g["value"]  # see to_dict
            return GateResult(**{**g, "value": value, "ci": tuple(ci) if ci is not None else None})

        def variant(v: dict) -> Variant:
            return Variant(
                **{
                    **v,
                    "sha256": v["sha256"].lower(),
                    "providers": tuple(v.get("providers", Variant.providers)),
                    "gates": tuple(gate(g) for g in v.get("gates", ())),
                    "not_for": tuple(v.get("not_for", ())),
                }
            )

        d = {k: v for k, v in d.items() if k != "verdict"}  # derived from the variants
        d["inputs"] = tuple(spec(t) for t in d["inputs"])
        d["outputs"] = tuple(spec(t) for t in d["outputs"])
        d["variants"] = tuple(variant(v) for v in d["variants"])
        d["files"] = {k: v.lower() for k, v in d.get("files", {}).items()}
        return cls(**d)


def _finite(x: Any) -> Any:
    """``x`` with every float that is not finite (NaN, infinity) as None: JSON has no
    token for them, and a manifest must parse outside Python too."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    # what ``load`` read: the directory (device, inode) and the manifest's sha256. A rewrite
    # refuses a bundle no longer that one (another put in its place by `mv` meanwhile).
    read_as: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    def file(self, precision: str) -> Path:
        return self.path / self.manifest.variant(precision).file

    @property
    def report(self) -> Path:
        return self.path / REPORT

    def __repr__(self) -> str:  # the manifest in full is kilobytes: what a person looks for
        m = self.manifest
        variants = ", ".join(f"{v.precision}:{v.verdict}" for v in m.variants)
        return f"Bundle({str(self.path)!r}, name={m.name!r}, verdict={m.verdict!r}, variants=[{variants}])"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def held_bundles(path: str | os.PathLike) -> list[str]:
    """The bundles in the folders of the directory ``path``, and in their folders, as paths
    relative to it, sorted: what a repository holds (NAME/, NAME/VERSION/, as `quantgate
    serve` reads one, skipping what it skips: ``skipped_folder``). Two levels, no deeper: a
    home directory is not walked whole."""
    root = Path(path)
    found = [*root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")]
    return sorted(
        m.parent.relative_to(root).as_posix()
        for m in found
        if m.is_file() and not any(map(skipped_folder, m.parent.relative_to(root).parts))
    )


def skipped_folder(name: str) -> bool:
    """Whether a repository's folder ``name`` is no model's: hidden (a killed export's
    ``.NAME.tmp-*`` copy among them), or a filesystem's lost+found (a volume mounted as the
    repository has one at its root)."""
    return name.startswith(".") or name == "lost+found"


READ_ATTEMPTS = 3  # reads of a bundle that is replaced meanwhile (load), before giving up


def load(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with ``verify``, check every file it lists (the variants,
    the tokenizer) against its sha256, all of them before saying what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigTypeError(
            f"load: expected a bundle's path (a str or a Path), found {type(path).__name__}"
        )
    if gone := gone_cwd(path):
        raise BundleError(gone)
    path = Path(path)
    if not path.exists():
        raise BundleError(f"no bundle at {path}: the directory does not exist. " + _missing(path))
    if not path.is_dir():
        raise BundleError(
            f"{path} is a file, not a bundle: a bundle is a directory holding {MANIFEST}. "
            "Pass the bundle's directory."
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise BundleError(
            f"cannot read the bundle {path}: this user may not list or open the directory. "
            "Make it readable (chmod a+rx), or run as a user who can read it."
        )
    # An export replaces a bundle by renaming a new directory over it: read between the two,
    # the manifest of one would meet the files of the other. Read again while it changes.
    for _ in range(READ_ATTEMPTS):
        before = _directory_identity(path)
        try:
            bundle = _read(path, verify)
        except BundleError:
            if _directory_identity(path) == before:
                raise
            continue  # replaced while it was read: what failed may be the old one's
        if _directory_identity(path) == before:
            return dataclasses.replace(bundle, read_as=_read_as(path, before))
    raise BundleError(
        f"{path} was replaced {READ_ATTEMPTS} times while it was being read (an export writing "
        "it again and again?). Read it once the writing stops."
    )


def _read_as(path: Path, directory: tuple[int, int] | None) -> tuple[Any, ...]:
    """``Bundle.read_as``: the directory's identity and its manifest's sha256 (None where
    it cannot be read)."""
    try:
        return directory, sha256_file(path / MANIFEST)
    except OSError:
        return directory, None


def _directory_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _missing(path: Path) -> str:
    """What to do about a bundle that is not there: put back the one a killed quantgate left
    aside (``left_aside``), else export one."""
    return left_aside(path) or "Create one with `quantgate export`."


def left_aside(path: Path) -> str | None:
    """Where the bundle that was at ``path`` is, and how to put it back, where a quantgate
    process died while replacing it and left it aside (``fsutil.asides``); else None."""
    if left := asides(resolve_target(path)):  # a link's target: where writes go
        return (
            f"A quantgate process that died while replacing it left the bundle that was there "
            f"at {left[0]}: move it back (mv {left[0]} {path}), or export to it or re-gate "
            "it: either puts it back first."
        )
    return None


def _read(path: Path, verify: bool) -> Bundle:
    mpath = path / MANIFEST
    if mpath.exists() and not mpath.is_file():
        raise BundleError(
            f"{mpath} is not a file (a directory?): a bundle's {MANIFEST} is a JSON file. "
            f"{RECREATE}"
        )
    if not mpath.is_file():
        raise BundleError(_not_a_bundle(path))
    manifest = Manifest.from_dict(_read_json(mpath), source=str(mpath))
    bundle = Bundle(path, manifest)
    if verify:
        check_files(bundle)
    return bundle


def _not_a_bundle(path: Path) -> str:
    """Why the directory ``path``, which has no manifest, is not a bundle, and what to pass
    instead: one of the bundles it holds (a repository, or a model's version folders, given
    where one of them was meant), else a bundle still to be exported."""
    held = held_bundles(path)
    if not held:
        return f"{path} is not a bundle: it has no {MANIFEST}. Create one with `quantgate export`."
    listed = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
    return (
        f"{path} is not a bundle but holds bundles in {listed}: pass one of them "
        f"({path / held[0]})."
    )


def check_files(bundle: Bundle, *, hashed_when_read: Collection[str] = ()) -> None:
    """BundleError listing every file of ``bundle`` that fails its check (``verify_files``)."""
    if problems := verify_files(bundle.path, bundle.manifest, hashed_when_read=hashed_when_read):
        raise BundleError(
            f"bundle {bundle.path}: {problem_list(problems)}Restore the files from the original "
            "bundle, or re-create it with `quantgate export`."
        )


def unlisted_weights(manifest: Manifest, variant: Variant, locations: Iterable[str]) -> str | None:
    """What is wrong where ``variant``'s model keeps weights in files (ONNX external data,
    ``locations`` relative to the bundle) that the manifest does not list: no sha256
    vouches for what would be read there; None where it lists them all."""
    unlisted = sorted({posixpath.normpath(x) for x in locations} - set(manifest.files))
    if not unlisted:
        return None
    return (
        f"variant {variant.precision}'s {variant.file} keeps weights in "
        f"{', '.join(unlisted)}, which the manifest does not list: no sha256 vouches for what "
        "would be read there. Export the model again (export lists every file a model keeps "
        "its weights in)."
    )


def _read_json(mpath: Path) -> Any:
    """manifest.json parsed, or a ``BundleError`` saying why it cannot be."""
    try:
        with open(mpath, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(
            f"cannot read {mpath}: {e.strerror or e}. Make it readable by this user "
            "(chmod a+r), or run as a user who can read it."
        ) from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{mpath} is over {size_said(MAX_MANIFEST_BYTES)}: a manifest is a few kB, so this is "
            f"not one written by quantgate. {RECREATE}"
        )

    try:
        # utf-8-sig: an editor that saves a byte-order mark has not changed the manifest
        return json.loads(data.decode("utf-8-sig"), object_pairs_hook=unique_keys)
    except RecursionError as e:
        raise BundleError(
            f"{mpath} is corrupt (nested too deeply to be a manifest). {RECREATE}"
        ) from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, repeated keys, huge ints
        raise BundleError(f"{mpath} is corrupt ({type(e).__name__}: {e}). {RECREATE}") from e


def verify_files(
    path: Path, manifest: Manifest, *, hashed_when_read: Collection[str] = ()
) -> list[str]:
    """What is wrong with the files ``manifest`` lists in the bundle at ``path``: one line per
    file that is missing, not a regular file, outside the bundle (through a symbolic link),
    unreadable, or changed; and any file added to a folder whose files it lists. The files
    ``hashed_when_read`` are checked but for their sha256, which their reader checks of the
    bytes it reads (the server's session: read once, hashed, built from those bytes)."""
    root = path.resolve()
    listed = [(f"variant {v.precision} file {v.file}", v.file, v.sha256) for v in manifest.variants]
    listed += [(f"file {name}", name, sha) for name, sha in manifest.files.items()]
    problems = [
        p
        for what, name, sha in listed
        if (p := _file_problem(root, what, name, None if name in hashed_when_read else sha))
    ]
    folders = {Path(name).parent for name in manifest.files} - {Path(".")}
    for folder in sorted(folders):
        if (root / folder).is_dir() and (root / folder).resolve().is_relative_to(root):
            for found in sorted((root / folder).rglob("*")):
                name = found.relative_to(root).as_posix()
                if not found.is_dir() and name not in manifest.files:
                    problems.append(
                        f"{name} is not in the manifest: it was added after export, and "
                        f"{folder.as_posix()}/ is read as a whole"
                    )
    return problems


def _file_problem(root: Path, what: str, name: str, sha256: str | None) -> str | None:
    f = root / name
    try:
        mode = f.lstat().st_mode
    except FileNotFoundError:
        return f"{what} is missing"
    except OSError as e:
        return f"{what} cannot be read ({e.strerror or e})"
    real = f.resolve()
    if not real.is_relative_to(root):
        return (
            f"{what} is outside the bundle: it resolves to {real} through a symbolic link. A "
            "bundle holds its own files; replace the link with a copy of the file"
        )
    if stat.S_ISLNK(mode):
        if not real.exists():
            return f"{what} is a broken symbolic link (to {os.readlink(f)})"
        mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        return f"{what} is {kind}; expected a file"
    if sha256 is None:  # hashed by its reader
        return None
    try:
        digest = sha256_file(f)
    except OSError as e:
        return (
            f"{what} cannot be read ({e.strerror or e}); make it readable by this user (chmod a+r)"
        )
    if digest != sha256:
        return (
            f"{name} has sha256 {digest[:12]}..., the manifest expects {sha256[:12]}...; "
            "the file was changed after export"
        )
    return None


@contextlib.contextmanager
def staging(
    out: str | os.PathLike,
    *,
    force: bool = False,
    carries_others: bool = False,
    elsewhere: str = "write the bundle elsewhere (another --out)",
    copies: bool = True,
) -> Iterator[Path]:
    """Stage a new bundle for ``out``; on clean exit it replaces ``out`` atomically.

    Yields a temporary sibling directory to write files into. If the block raises, the
    temporary directory is removed and whatever was at ``out`` is untouched. ``out`` may be
    missing, empty, or an existing bundle; any other existing directory is refused unless
    ``force``, and so is a bundle holding files it does not list, unless the new one
    ``carries_others``. A failure to write (a full disk, a permission) is a ``BundleError``,
    and so is a file outside the staging directory the block cannot read, named as a read;
    ``elsewhere`` is what else to do where ``out`` has no room, and ``copies`` whether the
    new bundle takes as much room as the old (False: its files are linked, as a re-gate's).
    """
    check_writable_target(Path(out).absolute(), force=force, carries_others=carries_others)
    try:
        with atomic_dir(out) as tmp:
            try:
                yield tmp
            except OSError as e:
                if _read_elsewhere(e, tmp):
                    raise BundleError(
                        f"cannot read {os.fsdecode(e.filename)}: {e.strerror or e}; the "
                        f"bundle at {out} was not written (nothing was changed there). Check "
                        "that the file exists and is readable, and run again."
                    ) from e
                raise
    except OSError as e:
        full = disk_full(e)
        raise (BundleOutOfSpace if full else BundleError)(
            _write_failure(Path(out), e, elsewhere, copies=copies)
        ) from e


def _read_elsewhere(e: OSError, staged: Path) -> bool:
    """Whether the block's ``e`` is about a file outside the staging directory: an input it
    read (a variant to copy, a tokenizer file), not the bundle being written."""
    if not isinstance(e.filename, (str, bytes)) or e.filename2 is not None or disk_full(e):
        return False  # none, a descriptor (os.stat(fd)), or a rename's two: not a read
    return not Path(os.fsdecode(e.filename)).absolute().is_relative_to(staged.absolute())


def _write_failure(out: Path, e: OSError, elsewhere: str, *, copies: bool = True) -> str:
    if disk_full(e):
        parent = resolve_target(out).parent
        try:
            free = f"; {size_said(shutil.disk_usage(parent).free)} free there now"
        except OSError:
            free = ""
        old = _tree_size(out) if copies else 0  # a re-gate links the models: a new manifest
        needs = (
            f" The new bundle is written beside the old one ({size_said(old)}) until it "
            "replaces it: it needs about as much room again."
            if old
            else ""
        )
        return (
            f"cannot write the bundle at {out}: {e.strerror or 'No space left on device'} on "
            f"the filesystem that holds {parent}{free}; nothing was changed at {out}.{needs} "
            f"Free some space there (or raise the file size limit, ulimit -f), or {elsewhere}."
        )
    if e.errno in (errno.EXDEV, errno.EBUSY):  # the swap's rename
        return (
            f"cannot replace {out}: {e.strerror or e}. The new bundle is renamed into place, "
            "which fails where --out is a mount point or, in a container, a directory of the "
            "image's read-only layer (overlayfs); nothing was changed at "
            f"{out}. Write the bundle to a new path, or into a mounted volume."
        )
    return (
        f"cannot write the bundle at {out}: {e.strerror or e} ({e.filename or out}). Check "
        "that the directory is writable and the disk has room; nothing was changed at "
        f"{out}."
    )


def _tree_size(path: Path) -> int:
    """The bytes of the files under ``path`` (0 where there is none to read)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def check_writable_target(
    out: Path,
    *,
    force: bool,
    inputs=(),
    carries_others=False,
    mount_ok=False,
    elsewhere: str = "choose another --out",
) -> None:
    """Refuse a path the bundle cannot be written to, one that is or holds the job's
    ``inputs`` ((what, path) pairs), and to overwrite something that is not a bundle, or a
    bundle with files of someone else's in it (unless the new bundle ``carries_others``, as
    a re-gate does), unless forced; and a mount point, unless the caller writes into it in
    place (``mount_ok``: a re-gate, ``rewrite``). ``elsewhere``: what to do instead where
    ``out`` cannot be written (``target_problem``). Call before heavy work."""
    problem = target_problem(
        out, force=force, is_ours=_quantgate_bundle, noun="bundle", inputs=inputs,
        mount_ok=mount_ok, elsewhere=elsewhere, carries_others=carries_others,
    )  # fmt: skip
    if problem:
        raise BundleError(problem)
    if not force and not carries_others and (others := foreign_files(out)):
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise BundleError(
            f"--out {out} holds files that are not the bundle's ({shown}); the new bundle "
            "replaces the directory as a whole, so they would be lost. Move them out, or pass "
            "--force to replace the directory with them."
        )
    model = dict(inputs).get("model")
    if not force and model is not None and is_bundle(out):
        problem = _another_models(out, _quantgate_manifest(out), model_identity(model))
        if problem:
            raise BundleError(problem)


def _another_models(out: Path, manifest: dict[str, Any] | None, given: str) -> str | None:
    """Why exporting the model ``given`` (its ``model_identity``) may not replace the bundle
    ``out`` (its parsed ``manifest``) without --force; None where it may.

    The manifest's ``source.identity`` names the model. A bundle of quantgate 0.1.0 records
    none, only the spec that export was given (``source.spec``): the same model where it
    resolves to ``given``. A relative path resolves from the current directory, which may
    not be the one that export ran in: then it is refused, and the message says so."""
    source = manifest.get("source") if manifest is not None else None
    if not isinstance(source, dict):
        return None  # unreadable or corrupt: nothing to tell the models apart by
    recorded = source.get("identity")
    if isinstance(recorded, str):
        if recorded == given:
            return None
        return (
            f"{out} holds the bundle of another model ({recorded}); this export is of "
            f"{given}. Choose another --out, or pass --force to replace that bundle."
        )
    spec = source.get("spec")
    if isinstance(spec, str) and model_identity(spec) == given:
        return None
    tools = manifest.get("tools") if manifest is not None else None
    by = tools.get("quantgate") if isinstance(tools, dict) else None
    kind = source.get("kind")
    what = f"a {kind} model" if isinstance(kind, str) else "a model"
    if not isinstance(spec, str):
        records = f"its manifest names no model ({what}, no spec)"
    else:
        path = spec_path(spec)
        relative = path is not None and not Path(path).expanduser().is_absolute()
        records = f"its manifest records only the spec that export was given, {spec!r} ({what}"
        records += ", a path relative to the directory it ran in)" if relative else ")"
    return (
        f"{out} holds a bundle made by an older quantgate"
        + (f" ({by})" if isinstance(by, str) else "")
        + f" that recorded no model identity: {records}; this export is of {given}. Choose "
        "another --out, or pass --force to replace that bundle (once: the new one records "
        "its model)."
    )


def model_identity(spec: Any) -> str:
    """What names a model wherever quantgate runs from: a directory's or a factory file's
    resolved path (with the factory's name), a module factory's ``module:function``, a
    Python object's ``module:qualname`` (its class's, for a module instance)."""
    if not isinstance(spec, (str, os.PathLike)):
        named = spec if callable(spec) and hasattr(spec, "__qualname__") else type(spec)
        return f"{named.__module__}:{named.__qualname__}"
    text = os.fspath(spec)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser().resolve())
    path = spec_path(text)
    if path is not None and path != text:  # file.py:function
        return f"{Path(path).expanduser().resolve()}:{text.rpartition(':')[2]}"
    return text


def _quantgate_manifest(path: Path) -> dict[str, Any] | None:
    """``path``'s manifest.json where it is a bundle's (it parses, with a format version and
    a list of variants), else None: a web app's or a dataset's manifest.json is no bundle's."""
    try:
        d = _read_json(path / MANIFEST)
    except BundleError:
        return None
    ours = isinstance(d, dict) and is_int(d.get("format_version"))
    return d if ours and isinstance(d.get("variants"), list) else None


def _quantgate_bundle(path: Path) -> bool:
    """Whether export may replace the directory ``path`` without --force: a bundle, by a
    manifest.json quantgate wrote."""
    return _quantgate_manifest(path) is not None


def foreign_files(path: Path) -> list[str]:
    """The files and folders in bundle ``path`` that its manifest does not list and
    quantgate does not write (``OWN_NAMES``) (sorted; a folder once, with a slash); []
    where ``path`` is no bundle."""
    d = _quantgate_manifest(path)
    if d is None:
        return []
    files = d.get("files")
    files = files if isinstance(files, dict) else {}  # (a corrupt one: none)
    variants = [v.get("file") for v in d["variants"] if isinstance(v, dict)]
    listed = {*OWN_NAMES, *(f for f in [*files, *variants] if isinstance(f, str))}
    folders = {str(p) for f in listed for p in Path(f).parents if str(p) != "."}
    # A format 1 manifest listed no file of the tokenizer: then all of it is the bundle's.
    old = d.get("format_version") == 1 and TOKENIZER_DIR not in folders
    whole = {TOKENIZER_DIR} if old else set()
    others = []
    for root, dirs, names in os.walk(path):
        rel = Path(root).relative_to(path)
        for name in sorted(dirs):
            if str(rel / name) in whole:
                continue
            kept = str(rel / name) in folders
            if not kept and os.listdir(Path(root) / name):  # an empty one loses nothing
                others.append(f"{rel / name}/")
        dirs[:] = [d for d in dirs if str(rel / d) in folders]
        others += [
            str(rel / f) for f in names if str(rel / f) not in listed and not _system_litter(f)
        ]
    return sorted(others)


def _system_litter(name: str) -> bool:
    """A file the system leaves in any folder a person looks at (Finder's .DS_Store, NFS's
    .nfs* of a file still open): no one's work."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith((".nfs", "._"))


# The title block's verdict (``verdict_phrase``), as a re-gate finds it to set it anew.
VERDICT_PHRASE = re.compile(r"Verdict: \*\*\w+\*\*(?: \(failed: [^)]*\))?\.")


def verdict_phrase(manifest: Manifest) -> str:
    """ "Verdict: **fail** (failed: int8 speedup_b1_s128)." for the title block of report.md:
    the gates that failed the bundle, named before any table."""
    failed = [
        f"{v.precision} {g.label}" for v in manifest.variants for g in v.gates if not g.passed
    ]
    return f"Verdict: **{manifest.verdict}**" + (
        f" (failed: {', '.join(failed)})." if failed else "."
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest`` into ``directory`` in this quantgate's format (``FORMAT_VERSION``),
    whichever it was read in: a re-gate of an older bundle writes what an older release
    would misread too."""
    (directory / MANIFEST).write_text(_manifest_text(manifest))


def _manifest_text(manifest: Manifest) -> str:
    now = dataclasses.replace(manifest, format_version=FORMAT_VERSION)
    return json.dumps(now.to_dict(), indent=2) + "\n"


def rewrite(bundle: Bundle, manifest: Manifest, report: str) -> None:
    """Replace ``bundle``'s manifest and report.md atomically (``staging``), its other files
    hard-linked into the new copy (copied where the filesystem cannot link).

    A bundle directory that is a mount point (a container's volume) cannot be replaced by a
    rename: its report.md and its manifest are each written beside the old one, then both
    renamed over them, the manifest last, as one commit point (``fsutil.replace_files``: a
    signal between the two would leave a report of a gating the manifest never got).

    The manifest written is this release's format: a tokenizer folder of the bundle that
    an older one left unlisted (0.1.0, and its bundles re-gated by 0.2.0) is listed, its
    files hashed, as export lists them."""
    manifest = _tokenizer_listed(bundle.path, manifest)
    regate_copy = (
        "re-gate a copy of it where there is room "
        f"(cp -r {bundle.path} COPY, then quantgate gate COPY)"
    )
    if is_mount_point(bundle.path):
        _still_as_read(bundle)
        try:
            _rewrite_in_place(bundle.path, {REPORT: report, MANIFEST: _manifest_text(manifest)})
        except OSError as e:
            raise (BundleOutOfSpace if disk_full(e) else BundleError)(
                _write_failure(bundle.path, e, regate_copy, copies=False)
            ) from e
        return
    with staging(bundle.path, carries_others=True, elsewhere=regate_copy, copies=False) as tmp:
        _link_all(bundle.path, tmp, skip={MANIFEST, REPORT})
        write_manifest(tmp, manifest)
        (tmp / REPORT).write_text(report)
        for name in (MANIFEST, REPORT):  # a read-only manifest stays read-only
            with contextlib.suppress(OSError):
                (tmp / name).chmod(stat.S_IMODE((bundle.path / name).stat().st_mode))
        _still_as_read(bundle)  # last, before the swap: minutes passed since the read


def _still_as_read(bundle: Bundle) -> None:
    """Refuse to rewrite a bundle that is no longer the one ``load`` read: another directory
    moved to its path (a deployment's `mv`), or its manifest written meanwhile. Its files
    would be linked under the manifest read before, which lists other hashes."""
    if bundle.read_as is not None and _read_as(bundle.path, _directory_identity(bundle.path)) != (
        bundle.read_as
    ):
        raise BundleError(
            f"{bundle.path} was replaced or its manifest rewritten while it was re-gated: "
            "the new gates are of the bundle that was there, so nothing was written. Gate "
            "the bundle there now again."
        )


def _rewrite_in_place(root: Path, texts: dict[str, str]) -> None:
    """Each file of ``texts`` (name: text) written beside its old one in ``root``, then all
    renamed over them, in order, as one commit point; nothing left beside them on failure."""
    for name in texts:
        for stale in root.glob(f".{name}.*"):  # a rewrite killed mid-way (the caller
            stale.unlink()  # holds the bundle: no other is under way)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in texts.items():
            staged.append((_staged_file(root / name, text), root / name))
        replace_files(staged, root)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _tokenizer_listed(root: Path, manifest: Manifest) -> Manifest:
    """``manifest`` with the files of its tokenizer folder in ``files`` (sha256 each), where
    the folder is the bundle's own and none of them is listed yet; else as it is."""
    tok = ((manifest.extra or {}).get("huggingface") or {}).get("tokenizer")
    if not isinstance(tok, str):
        return manifest
    folder, real = Path(posixpath.normpath(tok)), root.resolve()
    where = root / folder  # (an absolute path or one out through "..": not inside, below)
    resolved = where.resolve()
    inside = resolved.is_relative_to(real) and resolved != real
    if not inside or where.is_symlink() or not where.is_dir():
        return manifest  # the bundle itself, or a folder elsewhere: not the bundle's to list
    if any(folder in Path(f).parents for f in manifest.files):
        return manifest  # listed already
    entries = sorted(where.rglob("*"))
    names = [f.relative_to(root).as_posix() for f in entries if not f.is_dir() or f.is_symlink()]
    # Listed whole or not at all: a folder whose files are listed may hold nothing else (a
    # link, a fifo, a name a manifest cannot hold), or the bundle would no longer load
    odd = any(f.is_symlink() or not (f.is_dir() or f.is_file()) for f in entries)
    if odd or not all(is_relative_path(n) for n in names):
        return manifest
    listed = {n: sha256_file(root / n) for n in names}
    if manifest.format_version >= 2:  # its export listed them: unlisted since, by someone
        log.warning(
            "%s/ holds the bundle's tokenizer, but its manifest lists none of its files, as "
            "an export of this format does: they are listed now, hashed as they are. If they "
            "were changed (a tokenizer edited or swapped), its text reads as other tokens: "
            "re-export the bundle",
            folder.as_posix(),
        )
    return dataclasses.replace(manifest, files={**manifest.files, **listed})


def _staged_file(path: Path, text: str) -> Path:
    """A file beside ``path`` holding ``text``, on disk and with ``path``'s mode, to rename
    over it: a reader then finds the old file or the new one, whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:  # the old file's mode (mkstemp's is 0600)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _link_all(src: Path, dst: Path, *, skip: set[str]) -> None:
    """Hard-link (or copy) everything in ``src`` into ``dst`` except the names in ``skip``;
    folders (the tokenizer) are recreated and their files linked. A symbolic link stays a
    link: what it points to outside the bundle is never copied into it."""
    for p in src.iterdir():
        if p.name in skip:
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), dst / p.name)
        elif p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=True, copy_function=_link_or_copy)
        elif p.is_file():
            _link_or_copy(p, dst / p.name)


def _link_or_copy(src: Path | str, dst: Path | str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
