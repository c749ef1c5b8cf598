"""Calibration and evaluation data: sources of ONNX Runtime feeds, streamed in batches.

A source is re-iterable: ``source.batches()`` starts over on every call and yields
``Batch(feeds, labels)`` of at most ``batch_size`` rows, so the search can calibrate and
evaluate as often as it needs while memory stays bounded by one batch (plus one int per
sample for length-stratified selection). ``source()`` yields the feeds alone: the
``calibration`` callable that ``quantize.recipes.quantize`` takes.

Where the data comes from (``open_source``):

- nothing, for the built-in digits model: its fixed calibration split (200 images) and its
  labelled test split (360 images), never trained on;
- ``*.npz``: one ``(N, T)`` array per model input, optionally ``labels`` ``(N,)``;
- ``*.jsonl``: one ``{"text": ..., "label": ...}`` object per line (``label`` optional),
  tokenized with the model's own tokenizer, read line by line and tokenized batch by batch;
- in the API, any iterable of feed dicts (each a batch; a ``"labels"`` entry is taken as
  labels), or a callable returning one.

``samples`` caps how many rows are used. The rows kept are stratified by length: sorted by
real length and picked at evenly spaced quantiles, so a short cap still covers short and
long sequences in the proportions of the file. Rows are then batched in length order, so
little padding is added (padding would otherwise calibrate the ranges of pad activations).

Rows are checked before any model sees them: names, ranks, dtypes and lengths against the
model's inputs, an ``attention_mask`` of 0s and 1s with a token in every row, token ids
inside the model's embedding tables (where the export recorded their sizes; else >= 0).

Every source has a content ``sha256`` (of the bytes read plus the selection) for the
manifest. Problems are collected and raised as one ``DataError``: what was expected, what
was found, what to do.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.bundle import Manifest, TensorSpec, sha256_file
from quantgate.errors import DataError

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
LABELS = "labels"
DEFAULT_BATCH = 16  # rows per feed; calibration statistics do not depend on it


@dataclass(frozen=True)
class ModelInfo:
    """What data must fit: the model's inputs, task, longest sequence and tokenizer."""

    inputs: tuple[TensorSpec, ...]
    task: str
    max_seq_len: int
    builtin: bool = False  # the built-in digits classifier: its own splits are the default
    tokenizer: str | None = None  # Hugging Face tokenizer directory, for JSONL text
    pad_values: dict[str, int] = field(default_factory=dict)  # per input; default 0
    # per input: the rows of the embedding table its ids index (ids must be below it);
    # an input missing here is checked for negative ids only (see ID_INPUTS)
    id_limits: dict[str, int] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @classmethod
    def from_export(cls, result: Any) -> ModelInfo:
        """From an ``export.ExportResult``."""
        return cls.from_model(result.model, result.inputs)

    @classmethod
    def from_model(cls, model: Any, inputs: Sequence[TensorSpec]) -> ModelInfo:
        """From a loaded model (``model.loaders.LoadedModel``) and the ``inputs`` its export
        has (``export.validation.input_specs``): data checked before the export runs."""
        return cls._make(inputs, model.task, model.max_seq_len, model.source, model.extra)

    @classmethod
    def from_manifest(cls, m: Manifest, root: Path | None = None) -> ModelInfo:
        """From a bundle's manifest; ``root``, the bundle's directory, resolves the tokenizer
        it carries."""
        max_seq_len = m.max_seq_len or 0
        return cls._make(m.inputs, m.task, max_seq_len, m.source, m.extra, root)

    @classmethod
    def _make(cls, inputs, task, max_seq_len, source, extra, root=None) -> ModelInfo:
        extra = extra or {}
        hf = extra.get("huggingface") or {}
        tokenizer, pads = hf.get("tokenizer"), {}
        limits = _id_limits(extra.get("model") or {}, {"input_ids": "vocab_size"})
        if tokenizer:
            if root is not None:  # a bundle's own copy is relative to it; older ones absolute
                tokenizer = str(Path(root) / tokenizer)
            # what the manifest records, else the model's config.json where the tokenizer
            # directory is the model's own (an export; bundles before they carried a copy)
            cfg = {**_hf_config(tokenizer), **{k: v for k, v in hf.items() if v is not None}}
            pads = {"input_ids": int(cfg.get("pad_token_id") or 0)}
            limits = _id_limits(cfg, HF_ID_LIMITS)
        return cls(
            inputs=tuple(inputs),
            task=task,
            max_seq_len=max_seq_len,
            builtin=(source or {}).get("kind") == "checkpoint",
            tokenizer=tokenizer,
            pad_values=pads,
            id_limits=limits,
        )


# Inputs whose values index an embedding table: ONNX Runtime's Gather wraps a negative id
# around to the end of the table instead of refusing it.
ID_INPUTS = ("input_ids", "token_type_ids", "position_ids")
HF_ID_LIMITS = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size"}  # config keys


def _id_limits(config: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, int]:
    """{input: table size} for each ``keys`` entry (input -> config key) the config holds."""
    sizes = {name: config.get(key) for name, key in keys.items()}
    return {name: n for name, n in sizes.items() if isinstance(n, int) and n > 0}


@dataclass(frozen=True)
class Batch:
    feeds: Feeds
    labels: np.ndarray | None  # (B,) int64 when the source has labels


@dataclass(frozen=True)
class DataSource:
    """A re-iterable stream of batches; ``source()`` yields feeds (a calibration reader)."""

    description: str  # for the report: what, from where, how many
    kind: str  # "builtin" | "npz" | "jsonl" | "iterable"
    samples: int  # rows it yields
    has_labels: bool
    sha256: str
    _batches: Callable[[], Iterator[Batch]] = field(repr=False)
    lengths: tuple[int, int] = (0, 0)  # shortest and longest real length among the rows
    file_sha256: str | None = None  # of the whole file it reads, where it reads one

    def batches(self) -> Iterator[Batch]:
        return self._batches()

    def __call__(self) -> Iterator[Feeds]:
        return (b.feeds for b in self._batches())

    def record(self) -> dict[str, Any]:
        """The manifest's view: source, sha256, samples."""
        return {
            "source": self.description,
            "kind": self.kind,
            "sha256": self.sha256,
            "samples": self.samples,
            "labels": self.has_labels,
            "lengths": list(self.lengths),
            **({"file_sha256": self.file_sha256} if self.file_sha256 else {}),
        }


DataSpec = str | Path | Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable] | DataSource


def open_source(
    spec: DataSpec | None,
    model: ModelInfo,
    *,
    role: str,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DataSource:
    """Resolve ``spec`` (a path, an iterable, or None for the built-in split) into a source.

    ``role`` is "calibration" or "evaluation": it names the flag in messages and picks the
    built-in split ("calibration" or "test").
    """
    if samples is not None and samples < 1:
        setting = "--samples" if role == "calibration" else "eval_samples (--gate-config)"
        raise DataError(f"{setting} must be at least 1, got {samples}")
    flag = "--calibration" if role == "calibration" else "--eval"
    if isinstance(spec, DataSource):
        return spec
    if spec is None:
        if not model.builtin:
            raise DataError(
                f"no {role} data: {flag} PATH is required for this model (a .jsonl of "
                '{"text": ..., "label": ...} lines, or a .npz with one array per input: '
                f"{', '.join(model.input_names)}). Only the built-in digits model has its own."
            )
        return _builtin(model, role, samples, batch_size)
    if isinstance(spec, (str, Path)):
        path = check_path(spec, flag)
        if path.suffix.lower() == ".npz":
            return _npz(path, model, samples, batch_size, flag)
        return _jsonl(path, model, samples, batch_size, flag)
    return _iterable(spec, model, samples, batch_size)


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def check_path(spec: str | Path, flag: str) -> Path:
    """The data file ``spec`` names, if it exists in a format this module reads; else a
    DataError for ``flag``. Cheap: the CLI calls it before minutes of export."""
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"{flag} {path}: is a directory. Expected a .jsonl or .npz file.")
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file. Expected a .jsonl or .npz file.")
    suffix = path.suffix.lower()
    if suffix != ".npz" and suffix not in JSONL_SUFFIXES:
        raise DataError(
            f"{flag} {path}: unknown format {suffix or '(no suffix)'}; expected .jsonl (text) "
            "or .npz (arrays named after the model inputs)"
        )
    return path


def check_held_out(calibration: DataSpec | None, evaluation: DataSpec | None) -> None:
    """DataError when ``--eval`` is the ``--calibration`` file (the same bytes): gates measured
    on the rows the INT8 ranges were fitted to would pass a model that fails on new data."""
    if not (isinstance(calibration, (str, Path)) and isinstance(evaluation, (str, Path))):
        return
    cal, ev = check_path(calibration, "--calibration"), check_path(evaluation, "--eval")
    same = cal.resolve() == ev.resolve() or (
        cal.stat().st_size == ev.stat().st_size and sha256_file(cal) == sha256_file(ev)
    )
    if same:
        raise DataError(
            f"--eval {ev} holds the same data as --calibration {cal}; the gates must measure "
            "rows the calibration did not see. Split the file into two (for example 20% for "
            "--calibration, the rest for --eval)."
        )


def check_not_calibration(spec: DataSpec | None, calibration: Mapping[str, Any] | None) -> None:
    """DataError when the file ``spec`` is the one a bundle was calibrated on: it has the
    sha256 the manifest records for the calibration file (bundles before that record pass)."""
    recorded = (calibration or {}).get("file_sha256")
    if not isinstance(spec, (str, Path)) or not recorded:
        return
    if sha256_file(check_path(spec, "--eval")) == recorded:
        raise DataError(
            f"--eval {spec} is the data this bundle was calibrated on ({calibration.get('source')}); "
            "the gates must measure rows the calibration did not see. Pass held-out rows."
        )


# -- selection -----------------------------------------------------------------------------


def stratified(lengths: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of ``k`` rows at evenly spaced length quantiles (the shortest and the longest
    among them), in length order; with ``k`` 1, one row of median length.

    Deterministic; with ``k`` None or >= len(lengths), every row, in length order.
    """
    order = np.argsort(lengths, kind="stable")
    if k is None or k >= len(order):
        return order
    if k == 1:
        return order[[len(order) // 2]]
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, k)).astype(np.int64))
    return order[picks]


def _chunks(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _lengths(mask_or_ids: np.ndarray, pad: int | None) -> np.ndarray:
    a = mask_or_ids.reshape(len(mask_or_ids), -1) if mask_or_ids.ndim > 2 else mask_or_ids
    if a.ndim == 1:
        return np.ones(len(a), dtype=np.int64)
    if pad is None:  # an attention mask: ones mark real tokens
        return a.astype(bool).sum(1)
    return (a != pad).sum(1)


def _trim(feeds: Feeds, model: ModelInfo) -> Feeds:
    """Drop trailing all-padding columns of a length-sorted batch (variable-length models)."""
    mask = feeds.get("attention_mask")
    if mask is None or _fixed_seq(model) is not None or mask.ndim != 2:
        return feeds
    width = int(mask.astype(bool).any(0).nonzero()[0].max(initial=0)) + 1
    return {k: (v[:, :width] if v.ndim >= 2 else v) for k, v in feeds.items()}


def _fixed_seq(model: ModelInfo) -> int | None:
    for t in model.inputs:
        if len(t.dims) >= 2 and isinstance(t.dims[1], int):
            return t.dims[1]
    return None


# -- checks --------------------------------------------------------------------------------


def check_feeds(feeds: Mapping[str, np.ndarray], model: ModelInfo, where: str) -> Feeds:
    """Names, then ranks and batch sizes, then sequence limits, then the values of masks and
    token ids; one DataError listing all."""
    problems: list[str] = []
    missing = [n for n in model.input_names if n not in feeds]
    extra = [n for n in feeds if n not in model.input_names and n != LABELS]
    if missing:
        problems.append(f"missing input(s) {missing}")
    if extra:
        problems.append(f"unknown input(s) {extra}")
    out: Feeds = {}
    batch = set()
    for spec in model.inputs:
        if spec.name not in feeds:
            continue
        a = np.asarray(feeds[spec.name])
        if a.ndim != len(spec.dims):
            problems.append(
                f"{spec.name}: rank {a.ndim} (shape {tuple(a.shape)}), expected "
                f"{len(spec.dims)} dims ({', '.join(map(str, spec.dims))})"
            )
            continue
        for d, (got, want) in enumerate(zip(a.shape, spec.dims, strict=True)):
            if isinstance(want, int) and got != want:
                problems.append(f"{spec.name}: dim {d} is {got}, the model needs {want}")
        if a.ndim >= 2 and model.max_seq_len and a.shape[1] > model.max_seq_len:
            problems.append(
                f"{spec.name}: sequence {a.shape[1]} is longer than the model's {model.max_seq_len}"
            )
        want_dtype = np.dtype(spec.dtype)
        if a.dtype != want_dtype:
            if not np.can_cast(a.dtype, want_dtype, casting="same_kind"):
                problems.append(f"{spec.name}: dtype {a.dtype}, expected {want_dtype}")
                continue
            a = a.astype(want_dtype)
        problems.extend(_value_problems(spec.name, a, model))
        batch.add(a.shape[0])
        out[spec.name] = a
    if len(batch) > 1:
        problems.append(f"inputs disagree on the number of rows: {sorted(batch)}")
    if problems:
        raise DataError(
            f"{where} does not fit the model (inputs: "
            + ", ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.dims))})" for t in model.inputs)
            + "):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return out


def _value_problems(name: str, a: np.ndarray, model: ModelInfo) -> list[str]:
    """What the model would run on without complaint and answer with garbage: an attention
    mask that is not 0/1 or has no token in a row, an id outside its embedding table."""
    if a.ndim == 0 or a.size == 0 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        return []
    rows = a.reshape(len(a), -1)  # (N, rest)
    if name == "attention_mask":
        odd = (rows != 0) & (rows != 1)
        if odd.any():
            found = np.unique(rows[odd])
            return [
                f"attention_mask: expected only 0 (padding) and 1 (token), found "
                f"{', '.join(map(str, found[:5]))}{', ...' if len(found) > 5 else ''} in "
                f"{_rows(odd.any(1))}. Write 1 for every real token and 0 for padding."
            ]
        empty = ~rows.any(1)
        if empty.any():
            return [
                f"attention_mask: expected at least one 1 per row, found {_rows(empty)} of "
                "only padding; such a row skews the calibration ranges and has no output to "
                "compare. Drop those rows, or set 1 on their real tokens."
            ]
        return []
    limit = model.id_limits.get(name)
    if name not in ID_INPUTS and limit is None:
        return []
    bad = rows < 0
    if limit:
        bad |= rows >= limit
    bad = bad.any(1)  # (N,)
    if not bad.any():
        return []
    expected = f"ids 0..{limit - 1} (its embedding table has {limit} rows)" if limit else "ids >= 0"
    return [
        f"{name}: expected {expected}, found {rows.min()}..{rows.max()}, out of range in "
        f"{_rows(bad)}. Tokenize with this model's own tokenizer."
    ]


def _rows(bad: np.ndarray) -> str:
    """'3 rows (indices 3, 7, 11)' for a boolean row mask; the first five indices shown."""
    idx = np.flatnonzero(bad)
    shown = ", ".join(map(str, idx[:5])) + (f", ... {len(idx) - 5} more" if len(idx) > 5 else "")
    return f"1 row (index {shown})" if len(idx) == 1 else f"{len(idx)} rows (indices {shown})"


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: labels must be {n} integers (one class index per row), "
            f"found shape {labels.shape} dtype {labels.dtype}"
        )
    return labels.astype(np.int64)


# -- sources -------------------------------------------------------------------------------


def _builtin(model: ModelInfo, role: str, samples: int | None, batch_size: int) -> DataSource:
    from quantgate.model.data import load_digits_splits

    name = "calibration" if role == "calibration" else "test"
    split = load_digits_splits()[name]
    feeds = check_feeds(split.feeds(), model, f"the digits {name} split")
    labels = split.labels
    keep = stratified(_lengths(feeds["attention_mask"], None), samples)
    h = hashlib.sha256(b"digits:" + name.encode())
    for k in sorted(feeds):
        h.update(np.ascontiguousarray(feeds[k][keep]).tobytes())
    h.update(np.ascontiguousarray(labels[keep]).tobytes())

    def batches() -> Iterator[Batch]:
        for idx in _chunks(keep, batch_size):
            yield Batch({k: v[idx] for k, v in feeds.items()}, labels[idx])

    return DataSource(
        description=f"built-in digits {name} split ({len(keep)} of {len(labels)} images)",
        kind="builtin",
        samples=len(keep),
        has_labels=True,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(64, 64),
    )


def _npz(path: Path, model: ModelInfo, samples: int | None, batch_size: int, flag: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
    except (OSError, ValueError) as e:
        raise DataError(f"{flag} {path}: not a readable .npz file ({e})") from e

    def load() -> tuple[Feeds, np.ndarray | None]:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in keys}
        except (OSError, ValueError) as e:  # object arrays, a truncated member
            raise DataError(
                f"{flag} {path}: cannot read its arrays ({e}); expected numeric arrays, "
                "as np.savez writes them from integer numpy arrays"
            ) from e
        labels = arrays.pop(LABELS, None)
        feeds = check_feeds(arrays, model, f"{flag} {path}")
        n = len(next(iter(feeds.values())))
        if labels is not None:
            labels = _check_labels(labels, n, f"{flag} {path}")
        return feeds, labels

    feeds, labels = load()
    n = len(next(iter(feeds.values())))
    if n == 0:
        raise DataError(f"{flag} {path}: the arrays have no rows")
    lengths = _row_lengths(feeds, model)
    keep = stratified(lengths, samples)
    del feeds, labels  # re-read per pass: arrays load one .npy member at a time
    digest = sha256_file(path)
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())

    def batches() -> Iterator[Batch]:
        feeds, labels = load()
        for idx in _chunks(keep, batch_size):
            b = _trim({k: v[idx] for k, v in feeds.items()}, model)
            yield Batch(b, None if labels is None else labels[idx])

    return DataSource(
        description=f"{path.name}: {len(keep)} of {n} rows (npz)",
        kind="npz",
        file_sha256=digest,
        samples=len(keep),
        has_labels=LABELS in keys,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths[keep].min()), int(lengths[keep].max())),
    )


def _row_lengths(feeds: Feeds, model: ModelInfo) -> np.ndarray:
    if "attention_mask" in feeds:
        return _lengths(feeds["attention_mask"], None)
    first = model.inputs[0].name
    return _lengths(feeds[first], model.pad_values.get(first, 0))


def _jsonl(path: Path, model: ModelInfo, samples: int | None, batch_size: int, flag: str):
    if model.tokenizer is None:
        raise DataError(
            f"{flag} {path}: JSONL text needs the model's tokenizer, and this model has none "
            f"(it is not a Hugging Face model). Pass a .npz with arrays "
            f"{', '.join(model.input_names)} instead."
        )
    tok = _tokenizer(model.tokenizer)
    limit = model.max_seq_len or None
    # Pass 1: byte offset, token count and label presence of every line; nothing else kept.
    offsets, lengths, problems = [], [], []  # problems: the first 10 bad lines, described
    labelled, bad, first = None, 0, True
    with open(path, "rb") as f:
        texts, starts = [], []
        pos = 0
        for lineno, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            if first:
                _check_format(line, lineno, f"{flag} {path}")
                first = False
            row = _parse_line(line, lineno, problems)
            if row is None:
                bad += 1
                continue
            has = "label" in row and row["label"] is not None
            if labelled is None:
                labelled = has
            elif has != labelled:
                bad += 1
                if len(problems) < 10:
                    problems.append(f"line {lineno}: label present on some lines but not others")
            texts.append(row["text"])
            starts.append(start)
            if len(texts) == 256:
                lengths.extend(_token_counts(tok, texts, limit))
                offsets.extend(starts)
                texts, starts = [], []
        if texts:
            lengths.extend(_token_counts(tok, texts, limit))
            offsets.extend(starts)
    if problems:
        more = f"\n  ... and {bad - len(problems)} more bad line(s)" if bad > len(problems) else ""
        raise DataError(
            f"{flag} {path}: expected one JSON object per line with a non-blank string "
            '"text" and an optional integer "label":\n'
            + "\n".join(f"  - {p}" for p in problems)
            + more
        )
    if not offsets:
        found = "only blank lines" if path.stat().st_size else "an empty file"
        raise DataError(
            f'{flag} {path}: expected one {{"text": ...}} JSON object per line, found {found}. '
            "Write the texts into it, one object per line."
        )
    lengths_a = np.asarray(lengths, dtype=np.int64)
    offsets_a = np.asarray(offsets, dtype=np.int64)
    keep = stratified(lengths_a, samples)
    digest = sha256_file(path)
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())
    h.update(f"{limit}".encode())  # not the tokenizer's path: the bundle moves with its copy

    def batches() -> Iterator[Batch]:
        with open(path, "rb") as f:
            for idx in _chunks(keep, batch_size):
                rows = []
                for off in offsets_a[idx]:
                    f.seek(int(off))
                    rows.append(json.loads(f.readline()))
                feeds = _encode(tok, [r["text"] for r in rows], model, limit)
                labels = np.array([r["label"] for r in rows], np.int64) if labelled else None
                yield Batch(feeds, labels)

    return DataSource(
        description=f"{path.name}: {len(keep)} of {len(offsets_a)} texts (JSONL, model tokenizer)",
        kind="jsonl",
        file_sha256=digest,
        samples=len(keep),
        has_labels=bool(labelled),
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths_a[keep].min()), int(lengths_a[keep].max())),
    )


def _check_format(line: bytes, lineno: int, where: str) -> None:
    """DataError for a file that is JSON or text, but not UTF-8 JSON Lines: its first line of
    text tells (every line would be reported bad, none of them saying why)."""
    if line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{where}: expected UTF-8 text, found UTF-16 (line {lineno} starts with its "
            "byte-order mark). Save the file as UTF-8."
        )
    if line.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        raise DataError(
            f'{where}: expected JSON Lines, one {{"text": ...}} object per line; found a '
            f"JSON array (line {lineno} starts with '['). Write one object per line, for "
            "example with: jq -c '.[]' IN.json > OUT.jsonl"
        )


def _parse_line(line: bytes, lineno: int, problems: list[str]) -> dict | None:
    try:
        row = json.loads(line)
    except UnicodeDecodeError as e:
        if len(problems) < 10:
            problems.append(
                f"line {lineno}: not UTF-8 (byte 0x{e.object[e.start]:02x} at column "
                f"{e.start + 1}); save the file as UTF-8"
            )
        return None
    except ValueError as e:
        if len(problems) < 10:
            problems.append(f"line {lineno}: not JSON ({e})")
        return None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        if len(problems) < 10:
            problems.append(f'line {lineno}: no non-blank string "text" ({line[:60]!r})')
        return None
    label = row.get("label")
    if label is not None and (
        not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 1 << 63
    ):
        if len(problems) < 10:
            problems.append(
                f'line {lineno}: "label" must be an integer class index (0, 1, ...), got {label!r}'
            )
        return None
    return row


def tokenize(texts: Sequence[str], model: ModelInfo) -> Feeds:
    """``texts`` as one padded batch of the model's inputs, by the model's own tokenizer (as
    JSONL data is), cut at its longest sequence: what a client sends the served model."""
    if model.tokenizer is None:
        raise DataError(
            "text needs the model's tokenizer, and this model has none (it is not a Hugging "
            f"Face model); send its inputs ({', '.join(model.input_names)}) as arrays instead"
        )
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"expected one or more non-blank texts, found {list(texts)!r}")
    return _encode(_tokenizer(model.tokenizer), list(texts), model, model.max_seq_len or None)


def _tokenizer(directory: str):
    if not Path(directory).is_dir():  # a bundle moved to another machine: the export's path
        raise DataError(
            f"JSONL text needs the model's tokenizer, recorded at export as {directory}, which "
            "is not a directory on this machine (bundles exported before they carried their "
            "tokenizer point at the model's own directory). Re-export the bundle, put the model "
            "directory there, or pass a .npz of the tokenized inputs instead "
            "(quantgate.quantize.data.write_npz writes one)."
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise DataError(f"cannot load the model's tokenizer from {directory}: {e}") from e


def _hf_config(directory: str) -> dict[str, Any]:
    """The config.json beside a Hugging Face tokenizer, or {} (a tokenizer saved alone)."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _token_counts(tok, texts: list[str], limit: int | None) -> list[int]:
    enc = tok(texts, truncation=limit is not None, max_length=limit)
    return [len(ids) for ids in enc["input_ids"]]


def _encode(tok, texts: list[str], model: ModelInfo, limit: int | None) -> Feeds:
    enc = tok(
        texts, truncation=limit is not None, max_length=limit, padding=True, return_tensors="np"
    )
    feeds = {}
    for spec in model.inputs:
        if spec.name in enc:
            feeds[spec.name] = enc[spec.name].astype(spec.dtype)
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros_like(enc["input_ids"], dtype=spec.dtype)
    return check_feeds(feeds, model, "tokenized text")


def _iterable(spec, model: ModelInfo, samples: int | None, batch_size: int) -> DataSource:
    """A Python iterable (or a callable returning one) of feed dicts, each a batch."""
    make = spec if callable(spec) else None
    if make is None:
        it = spec
        if iter(it) is it:  # a one-shot iterator: kept in memory so it can be re-read
            it = list(it)
        make = lambda: it  # noqa: E731
    rows, labelled, h = 0, None, hashlib.sha256(b"iterable")
    lo, hi = None, 0
    for i, feeds in enumerate(make()):
        labels = feeds.get(LABELS) if isinstance(feeds, Mapping) else None
        if not isinstance(feeds, Mapping):
            raise DataError(f"data item {i} is a {type(feeds).__name__}; expected a dict of arrays")
        f = check_feeds(feeds, model, f"data item {i}")
        n = len(next(iter(f.values())))
        if labels is not None:
            labels = _check_labels(labels, n, f"data item {i}")
        if labelled is not None and (labels is not None) != labelled:
            raise DataError(f"data item {i}: labels on some items but not others")
        labelled = labels is not None
        take = n if samples is None else min(n, samples - rows)  # the rows used, and hashed
        lens = _row_lengths(f, model)[:take]
        lo, hi = min(lo if lo is not None else 1 << 30, int(lens.min())), max(hi, int(lens.max()))
        for k in sorted(f):
            h.update(np.ascontiguousarray(f[k][:take]).tobytes())
        if labels is not None:
            h.update(labels[:take].tobytes())
        rows += take
        if samples is not None and rows >= samples:
            break
    if not rows:
        raise DataError("the data iterable yielded no rows")

    def batches() -> Iterator[Batch]:
        left = rows
        for feeds in make():
            f = check_feeds(feeds, model, "data item")
            labels = feeds.get(LABELS)
            take = min(left, len(next(iter(f.values()))))
            for s in range(0, take, batch_size):
                sl = slice(s, min(take, s + batch_size))
                yield Batch(
                    {k: v[sl] for k, v in f.items()},
                    None if labels is None else np.asarray(labels, np.int64)[sl],
                )
            left -= take
            if left <= 0:
                return

    return DataSource(
        description=f"Python iterable ({rows} rows)",
        kind="iterable",
        samples=rows,
        has_labels=bool(labelled),
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(lo or 0, hi),
    )


def counted(source: DataSource, on_rows: Callable[[int], None]) -> Callable[[], Iterator[Feeds]]:
    """``source`` as a calibration callable that reports rows as they are read."""

    def calibration() -> Iterator[Feeds]:
        done = 0
        for feeds in source():
            yield feeds
            done += len(next(iter(feeds.values())))
            on_rows(done)

    return calibration


def write_npz(
    path: str | Path, feeds: Mapping[str, np.ndarray], labels: Sequence[int] | None = None
):
    """Write feeds (and labels) as an .npz that ``--calibration``/``--eval`` accept."""
    arrays = dict(feeds)
    if labels is not None:
        arrays[LABELS] = np.asarray(labels, np.int64)
    np.savez(path, **arrays)
    return Path(path)


__all__ = [
    "Batch",
    "DataSource",
    "ModelInfo",
    "check_feeds",
    "check_held_out",
    "check_not_calibration",
    "check_path",
    "counted",
    "open_source",
    "stratified",
    "tokenize",
    "write_npz",
]
