"""Calibration and evaluation data: sources of ONNX Runtime feeds, streamed in batches.

A source is re-iterable: ``source.batches()`` starts over on every call and yields
``Batch(feeds, labels)`` of at most ``batch_size`` rows, so the search can calibrate and
evaluate as often as it needs while memory stays bounded by one batch of a JSONL file (one
item of an iterable; a ``.npz`` file's arrays, which numpy reads whole, during a pass), plus
a few ints per sample: its length for length-stratified selection, its row hash. ``source()`` yields the
feeds alone: the ``calibration`` callable that ``quantize.recipes.quantize`` takes.

Where the data comes from (``open_source``):

- nothing, for the built-in digits model: its fixed calibration split (200 images) and its
  labelled test split (360 images), never trained on;
- ``*.npz``: one ``(N, T)`` array per model input, optionally ``labels`` ``(N,)``;
- ``*.jsonl``: one ``{"text": ..., "label": ...}`` object per line (``label`` optional),
  tokenized with the model's own tokenizer, read line by line and tokenized batch by batch;
  a file whose every line has the same wrong keys is told so once, not line by line;
- in the API, any iterable of feed dicts (each a batch; a ``"labels"`` entry is taken as
  labels), or a callable returning one.

``samples`` caps how many rows are used. From a file or the built-in split the rows kept
are stratified by length: sorted by real length and picked at evenly spaced quantiles, so a
short cap still covers short and long sequences in the proportions of the file; they are
then batched in length order, so little padding is added (padding would otherwise
calibrate the ranges of pad activations). A Python iterable is the caller's own batches:
its first ``samples`` rows are kept, in its order (shuffle or stratify it before, where its
first rows are not a fair sample).

Rows are checked before any model sees them: names, ranks, dtypes and lengths against the
model's inputs, an ``attention_mask`` of 0s and 1s with a token in every row, token ids
inside the model's embedding tables (where the export recorded their sizes; else >= 0).
Labels are class indices inside the model's classes (where it records their names: a
classifier's id2label, the digits; else >= 0) or class names, mapped to their indices by
exact match, as ``quantize.labels`` sets out (with when names are refused); a bad one is
named by its line, row or item.

A text longer than the model's longest sequence is cut to it, as the served model's
tokenizer cuts it; how many of the rows used were cut is warned about, counted in the
source's record and said in its description (the report's).

Every row is also known by its content: ``row_hashes`` hashes the token ids the model sees
(``input_ids`` without padding), so the same row is the same hash in any file, format or
position, and whatever spacing the tokenizer drops. ``check_held_out`` compares evaluation
rows with calibration rows by those hashes: at export with the calibration source itself,
at a re-gate with the ``Fingerprint`` of them that the manifest keeps.

Every source has a content ``sha256`` (of the bytes read plus the selection) for the
manifest. Problems are collected and raised as one ``DataError``: what was expected, what
was found, what to do.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.bundle import Manifest, TensorSpec, class_names, sha256_file
from quantgate.errors import DataError
from quantgate.quantize.labels import (
    check_labels,
    describe_classes,
    describe_rows,
    forms_problem,
    label_forms,
    label_problem,
    name_index,
    one_based_hint,
    quote,
)
from quantgate.quantize.stats import wilson

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
LABELS = "labels"
DEFAULT_BATCH = 16  # rows per feed; calibration statistics do not depend on it
# Fewest calibration rows before a warning: static INT8 takes each activation's range from
# the calibration rows (their extremes, or a percentile of them), and from a handful of rows
# those ranges are noise, not the ranges of the data the model will serve.
MIN_CALIBRATION_ROWS = 32
EMBEDDING_TASKS = ("feature-extraction",)  # gated on agreement with FP32, not on labels
TOKEN_TASKS = ("token-classification",)  # labels per token: (rows, sequence) arrays only
NO_LABEL = -100  # a position without a token label (Hugging Face's ignore index)
TYPE_IDS = "token_type_ids"  # zeros where data leaves them out: one segment


def _ignored_labels(where: str, model: ModelInfo) -> None:
    if model.task in TOKEN_TASKS:
        log.warning(
            "%s: labels ignored: a %s model's labels are one per token, aligned to its "
            "tokenizer's pieces: an .npz (or dict) array %r of shape (rows, sequence), %d "
            "where a position has none, as Hugging Face's token-classification examples align "
            "them. Without them it is gated on its agreement with FP32 (per-token top-1, KL)",
            where, model.task, LABELS, NO_LABEL,
        )  # fmt: skip
        return
    log.warning(
        "%s: labels ignored: a %s model is gated on its agreement with FP32 (cosine, "
        "nearest-neighbour top-1), which needs none",
        where, model.task,
    )  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """What data must fit: the model's inputs, task, longest sequence, tokenizer and classes."""

    inputs: tuple[TensorSpec, ...]
    task: str
    max_seq_len: int
    builtin: bool = False  # the built-in digits classifier: its own splits are the default
    tokenizer: str | None = None  # Hugging Face tokenizer directory, for JSONL text
    pad_values: dict[str, int] = field(default_factory=dict)  # per input; default 0
    # per input: the rows of the embedding table its ids index (ids must be below it);
    # an input missing here is checked for negative ids only (see ID_INPUTS)
    id_limits: dict[str, int] = field(default_factory=dict)
    # a classifier's class names by index, as its export recorded them (the Hugging Face
    # config's id2label, the digits '0'..'9'); labels are checked against them and string
    # labels mapped through them. Empty: none recorded (labels must be indices >= 0).
    labels: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def reads_labels(self) -> bool:
        """Whether labels mean anything to the gates: an embedding model is gated on its
        agreement with FP32, and its data's labels are ignored (with a warning), whatever
        their form."""
        return self.task not in (*EMBEDDING_TASKS, *TOKEN_TASKS)

    @property
    def classes(self) -> str:
        """'3 classes (0..2: neg, neu, pos)'; names equal to their indices are not repeated."""
        return describe_classes(self.labels)

    @classmethod
    def from_export(cls, result: Any) -> ModelInfo:
        """From an ``export.ExportResult``."""
        return cls.from_model(result.model, result.inputs)

    @classmethod
    def from_model(cls, model: Any, inputs: Sequence[TensorSpec]) -> ModelInfo:
        """From a loaded model (``model.loaders.LoadedModel``) and the ``inputs`` its export
        has (``export.validation.input_specs``): data checked before the export runs."""
        pads = {i.name: i.pad_value for i in model.inputs if i.pad_value}
        return cls._make(inputs, model.task, model.max_seq_len, model.source, model.extra, pads)

    @classmethod
    def from_manifest(cls, m: Manifest, root: Path | None = None) -> ModelInfo:
        """From a bundle's manifest; ``root``, the bundle's directory, resolves the tokenizer
        it carries."""
        max_seq_len = m.max_seq_len or 0
        return cls._make(m.inputs, m.task, max_seq_len, m.source, m.extra, m.pad_values, root)

    @classmethod
    def _make(cls, inputs, task, max_seq_len, source, extra, pads, root=None) -> ModelInfo:
        extra = extra or {}
        hf = extra.get("huggingface") or {}
        tokenizer, pads = hf.get("tokenizer"), dict(pads)
        limits = _id_limits(extra.get("model") or {}, {"input_ids": "vocab_size"})
        if tokenizer:
            if root is not None:  # a bundle's own copy is relative to it; older ones absolute
                tokenizer = str(Path(root) / tokenizer)
            # what the manifest records, else the model's config.json where the tokenizer
            # directory is the model's own (an export; bundles before they carried a copy)
            cfg = {**_hf_config(tokenizer), **{k: v for k, v in hf.items() if v is not None}}
            pads = pads or {"input_ids": int(cfg.get("pad_token_id") or 0)}
            limits = _id_limits(cfg, HF_ID_LIMITS)
        return cls(
            inputs=tuple(inputs),
            task=task,
            max_seq_len=max_seq_len,
            builtin=(source or {}).get("kind") == "checkpoint",
            tokenizer=tokenizer,
            pad_values=pads,
            id_limits=limits,
            labels=class_names(extra),
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
    # (B,) int64 when the source has labels; a token classifier's (B, T), NO_LABEL where none
    labels: np.ndarray | None


@dataclass(frozen=True)
class DataSource:
    """A re-iterable stream of batches; ``source()`` yields feeds (a calibration reader)."""

    description: str  # for the report: what, from where, how many
    kind: str  # "builtin" | "npz" | "jsonl" | "arrays" (one dict of them) | "iterable"
    samples: int  # rows it yields
    has_labels: bool
    sha256: str
    _batches: Callable[[], Iterator[Batch]] = field(repr=False)
    lengths: tuple[int, int] = (0, 0)  # shortest and longest real length among the rows
    file_sha256: str | None = None  # of the whole file it reads, where it reads one
    total: int | None = None  # rows it could yield without the samples cap; None: not known
    cut: int | None = None  # texts longer than the model's longest sequence, cut to it (JSONL)
    # rows that are also calibration rows (check_held_out); None: not compared
    in_calibration: int | None = None
    # (samples,) uint64: each row's row_hashes, in any order; None: not known
    row_hashes: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels_ignored: bool = False  # it had labels, which the model's gates do not read
    # what fills a row past its real length, per input (the model's, as the server pads)
    pad_values: Mapping[str, int | float] = field(default_factory=dict, compare=False)

    @property
    def capped(self) -> bool:
        """Whether the ``samples`` cap left rows out: it yields fewer than it could, or it
        stopped at the cap before knowing how many it could (``total`` None)."""
        return self.total != self.samples

    def batches(self) -> Iterator[Batch]:
        return self._batches()

    def __call__(self) -> Iterator[Feeds]:
        return (b.feeds for b in self._batches())

    def fingerprint(self) -> Fingerprint | None:
        """Its rows as a ``Fingerprint`` (all of them); None where their hashes are not known."""
        return None if self.row_hashes is None else Fingerprint.of(self.row_hashes)

    def record(self, *, fingerprint: bool = False) -> dict[str, Any]:
        """The manifest's view: source, sha256, samples; with ``fingerprint``, a sample of its
        rows' hashes that a re-gate checks evaluation rows against (``Fingerprint``)."""
        prints = self.fingerprint() if fingerprint else None
        return {
            "source": self.description,
            "kind": self.kind,
            "sha256": self.sha256,
            "samples": self.samples,
            "labels": self.has_labels,
            "lengths": list(self.lengths),
            **({"file_sha256": self.file_sha256} if self.file_sha256 else {}),
            **({"cut": self.cut} if self.cut is not None else {}),
            **({"in_calibration": self.in_calibration} if self.in_calibration is not None else {}),
            **({FINGERPRINT: prints.sample().record()} if prints is not None else {}),
        }


DataSpec = (
    str
    | Path
    | Mapping[str, np.ndarray]  # every row at once, as a .npz holds them
    | Iterable[Mapping[str, np.ndarray]]  # batches
    | Callable[[], Iterable]
    | DataSource
)


def open_source(
    spec: DataSpec | None,
    model: ModelInfo,
    *,
    role: str,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DataSource:
    """Resolve ``spec`` (a path, a dict of arrays, an iterable of them, or None for the
    built-in split) into a source.

    ``role`` is "calibration" or "evaluation": it names the flag in messages and picks the
    built-in split ("calibration" or "test"). Fewer than ``MIN_CALIBRATION_ROWS`` calibration
    rows are warned about.
    """
    if samples is not None and samples < 1:
        setting = "--samples" if role == "calibration" else "eval_samples (--gate-config)"
        raise DataError(f"{setting} must be at least 1, got {samples}")
    flag = "--calibration" if role == "calibration" else "--eval"
    if isinstance(spec, DataSource):
        source = spec
    elif spec is None:
        if not model.builtin:
            raise DataError(
                f"no {role} data: {flag} PATH is required for this model (a .jsonl of "
                '{"text": ..., "label": ...} lines, or a .npz with one array per input: '
                f"{', '.join(model.input_names)}). Only the built-in digits model has its own."
            )
        source = _builtin(model, role, samples, batch_size)
    elif isinstance(spec, (str, Path)):
        path = check_path(spec, flag)
        if path.suffix.lower() == ".npz":
            source = _npz(path, model, samples, batch_size, flag)
        else:
            source = _jsonl(path, model, samples, batch_size, flag, role)
    elif isinstance(spec, Mapping):  # one dict of arrays, as a .npz holds them
        source = _in_memory(spec, model, samples, batch_size)
    else:
        source = _iterable(spec, model, samples, batch_size)
    if role == "calibration" and source.samples < MIN_CALIBRATION_ROWS:
        _warn_few_calibration_rows(source, samples, where=named(flag, spec, source))
    if role == "evaluation" and source.labels_ignored:
        _ignored_labels(named(flag, spec, source), model)
    if not isinstance(spec, DataSource):
        source = dataclasses.replace(source, pad_values=dict(model.pad_values))
    return source


def named(flag: str, spec: DataSpec | None, source: DataSource) -> str:
    """How messages name the data: '--eval heldout.jsonl', else the source's description."""
    return f"{flag} {spec}" if isinstance(spec, (str, Path)) else source.description


def _warn_left_padding(rows: Batch, *, where: str) -> None:
    """Warn when ``rows`` (an iterable's first item, an .npz file's arrays: as each source
    reads them) are padded on the left (a mask of 0 before its 1s): the server pads requests
    on the right, and export validation assumes it, so gates measured on left-padded rows
    measure inputs the served model never sees."""
    mask = rows.feeds.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.shape[1] < 2:
        return
    left = (mask[:, 0] == 0) & (mask[:, -1] == 1)
    if left.any():
        log.warning(
            "%s: rows are padded on the left (%s); quantgate's server pads requests on the "
            "right, so gates measured on these rows measure inputs it never sends the model. "
            "Pad on the right (a tokenizer's padding_side='right').",
            where,
            describe_rows(left),
        )


def _warn_few_calibration_rows(source: DataSource, samples: int | None, *, where: str) -> None:
    capped = samples is not None and source.capped  # the message names --samples
    of = f" of {source.total}" if source.total else ""
    log.warning(
        "%s: %d calibration row(s)%s; static INT8 takes each activation's range from them, and "
        "from fewer than %d rows those ranges are noise: the INT8 model may fail its accuracy "
        "gates. Calibrate on a few hundred rows like those the model will serve.",
        where,
        source.samples,
        f" (--samples {samples} keeps {source.samples}{of})" if capped else "",
        MIN_CALIBRATION_ROWS,
    )


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


# Evaluation rows that may also be calibration rows before the evaluation data is refused
# as not held out. Two samples of one corpus share some rows by nature (short, common texts:
# a greeting, a licence's boilerplate line), a few percent of them; a tenth or more means
# the files overlap. Below it the shared rows are warned about and counted in the record.
MAX_SHARED = 0.10
FINGERPRINT = "row_hashes"  # the key of a calibration record's Fingerprint
# Row hashes a manifest keeps: exact up to this many calibration rows (most calibration
# sets), a sample beyond (32 kB, 44 kB as base64): enough that a re-gate's evaluation
# rows fall in its range by the dozen, not by the handful, when calibration had 50,000 rows.
FINGERPRINT_ROWS = 4096


def row_hashes(feeds: Mapping[str, np.ndarray], model: ModelInfo) -> np.ndarray:
    """(N,) uint64: each row known by the token ids the model sees, hashed (blake2b, 8 bytes).

    The ids are ``input_ids`` (else the model's first input) without padding (its real
    tokens, ``_real_tokens``), as little-endian int64:
    the same row has the same hash in any file, format (JSONL hashes the tokenizer's ids
    alike) or position. Collisions are negligible: under 1e-9 false matches between two
    sets of 10^5 rows.
    """
    _, rows = _token_rows(feeds, model)
    real = _real_tokens(feeds, model)
    dtype = "<i8" if np.issubdtype(rows.dtype, np.integer) else "<f8"
    hashes = (_row_hash(row[keep].astype(dtype)) for row, keep in zip(rows, real, strict=True))
    return np.fromiter(hashes, dtype=np.uint64, count=len(rows))


def _token_rows(feeds: Mapping[str, np.ndarray], model: ModelInfo) -> tuple[str, np.ndarray]:
    """The input whose ids stand for each row, ``input_ids`` (else the model's first input),
    and its values as (N, T)."""
    name = "input_ids" if "input_ids" in feeds else model.inputs[0].name
    ids = np.asarray(feeds[name])
    return name, ids.reshape(len(ids), -1)


def _real_tokens(feeds: Mapping[str, np.ndarray], model: ModelInfo) -> np.ndarray:
    """(N, T) bool: which positions of ``_token_rows`` are a row's real tokens, the one rule
    for its hash (``row_hashes``) and its length (stratified selection).

    Where the ``attention_mask`` is not 0; without a mask, every position up to the row's
    last id that is not the input's pad value (a tokenizer pads at the end, so a pad id
    inside the row is a token); for inputs that are not token ids (a factory model's
    features), the whole row.
    """
    name, rows = _token_rows(feeds, model)
    mask = feeds.get("attention_mask")
    if mask is not None and np.size(mask) == rows.size:
        return np.asarray(mask).reshape(rows.shape) != 0
    if not np.issubdtype(rows.dtype, np.integer):
        return np.ones(rows.shape, dtype=bool)
    pad = rows != model.pad_values.get(name, 0)
    last = rows.shape[1] - np.argmax(pad[:, ::-1], axis=1)  # after the last real id
    last[~pad.any(axis=1)] = 0
    return np.arange(rows.shape[1]) < last[:, None]


def check_token_labels(labels: Any, rows: np.ndarray, model: ModelInfo, where: str) -> np.ndarray:
    """A token classifier's ``labels`` as (rows, sequence) int64: one per position of the
    token rows ``rows``, a class index of the model's (where it names its classes) or
    ``NO_LABEL``; else a DataError naming what was found."""
    labels = np.asarray(labels)
    if labels.shape != rows.shape or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: a token classifier's labels are one class index per token: an integer "
            f"array of shape {rows.shape}, as its inputs, {NO_LABEL} where a position has "
            f"none; found shape {labels.shape} dtype {labels.dtype}"
        )
    classes = len(model.labels)
    bad = (labels < 0) & (labels != NO_LABEL)
    if classes:
        bad |= labels >= classes
    if bad.any():
        raise DataError(
            f"{where}: token labels must be class indices"
            + (f" 0..{classes - 1} ({model.classes})" if classes else " >= 0")
            + f" or {NO_LABEL}; found {sorted(set(labels[bad].tolist()))[:8]} in "
            f"{describe_rows(bad.any(1))}"
        )
    return labels.astype(np.int64)


def _row_hash(ids: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Fingerprint:
    """A set of rows as their ``row_hashes``: every one, or a fixed-size sample.

    A manifest keeps ``sample()``, at most ``FINGERPRINT_ROWS`` hashes, so that a re-gate can
    tell calibration rows in its evaluation data without the calibration file, and the
    manifest stays small however many rows calibrated the model. The sample is the
    smallest hashes (a bottom-k sketch): hashes being uniform, it is a random sample of the
    rows, the same whichever file holds them; and a row whose hash is at most the sample's
    largest is known to be in the set or not. The share of calibration rows among those
    evaluation rows estimates their share among all the evaluation rows.
    """

    hashes: np.ndarray  # sorted, distinct uint64
    rows: int  # distinct rows in the whole set

    @classmethod
    def of(cls, hashes: np.ndarray) -> Fingerprint:
        unique = np.unique(np.asarray(hashes, dtype=np.uint64))
        return cls(unique, len(unique))

    @property
    def complete(self) -> bool:
        return len(self.hashes) == self.rows

    def sample(self, k: int = FINGERPRINT_ROWS) -> Fingerprint:
        return Fingerprint(self.hashes[:k], self.rows)

    def shared(self, hashes: np.ndarray) -> tuple[int, int]:
        """(rows of ``hashes`` in the set, rows that could be told): every row where the
        fingerprint is complete, else the rows whose hash is within the sample's range."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not self.complete:
            hashes = hashes[hashes <= self.hashes[-1]]
        return int(np.isin(hashes, self.hashes).sum()), len(hashes)

    def record(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "hash": "blake2b, 8 bytes, of each row's token ids without padding (int64 LE)",
            "sample": "all" if self.complete else f"the {len(self.hashes)} smallest hashes",
            "hashes": base64.b64encode(self.hashes.astype(">u8").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_record(cls, calibration: Mapping[str, Any] | None) -> Fingerprint | None:
        """The fingerprint a calibration record keeps; None for one without (older bundles)."""
        r = (calibration or {}).get(FINGERPRINT)
        try:
            raw = base64.b64decode(r["hashes"], validate=True)
            hashes = np.sort(np.frombuffer(raw, dtype=">u8").astype(np.uint64))
            rows = int(r["rows"])
        except (KeyError, TypeError, ValueError):  # none, or not one this module wrote
            return None
        if len(hashes) > rows or (len(hashes) == 0 and rows > 0):
            return None
        return cls(hashes, rows)


def check_held_out(
    evaluation: DataSource, calibration: Fingerprint | None, *, where: str, calibrated_on: str
) -> DataSource:
    """``evaluation`` with the count of its rows that are also calibration rows (the same
    ``row_hashes``) in its record and description: gates measured on rows the INT8 ranges
    were fitted to would pass a model that fails on new data. DataError when they are
    ``MAX_SHARED`` of its rows or more; a warning when fewer. ``where`` and ``calibrated_on``
    name the two data for messages. Unchanged where either side's hashes are not known.
    """
    if calibration is None or evaluation.row_hashes is None:
        return evaluation
    shared, told = calibration.shared(evaluation.row_hashes)
    if not told:  # a sample so small that none of these rows falls in its range
        log.warning(
            "%s: cannot tell whether its rows are calibration rows: none of them falls in the "
            "sample of %d row hashes the bundle keeps of its %d calibration rows",
            where,
            len(calibration.hashes),
            calibration.rows,
        )
        return evaluation
    if not shared:
        return dataclasses.replace(evaluation, in_calibration=0)
    share = shared / told
    # From a sample, refuse on evidence only: the share's one-sided 95% lower bound (the
    # lower end of Wilson's two-sided 90% interval) must reach MAX_SHARED, or a few natural
    # duplicates among a handful of rows told would refuse a re-gate at random.
    evident = share if calibration.complete else wilson(shared, told, 0.90)[0]
    n = evaluation.samples
    if calibration.complete:
        counts, estimate = f"{shared} of {n} evaluation rows ({share:.0%})", shared
    else:
        estimate = round(share * n)
        counts = (
            f"about {share:.0%} of the {n} evaluation rows ({shared} of the {told} whose hash "
            f"falls in the sample of {len(calibration.hashes)} the bundle keeps of its "
            f"{calibration.rows} calibration rows)"
        )
    what = (
        f"{where}: {counts} are also calibration rows (the same token ids, whatever the "
        f"order of the rows or their spacing) of {calibrated_on}"
    )
    if evident >= MAX_SHARED:
        raise DataError(
            f"{what}. The gates must measure rows the calibration did not see, or they pass a "
            "model that fails on new data. Remove those rows from the evaluation data (at "
            "export, one file can be split in two instead: for example 20% for --calibration, "
            "the rest for --eval)."
        )
    log.warning(
        "%s. So few can be natural duplicates (short, common texts); the gates count them, "
        "and the report says how many.",
        what,
    )
    about = "" if calibration.complete else "about "
    return dataclasses.replace(
        evaluation,
        in_calibration=estimate,
        description=f"{evaluation.description}; {about}{estimate} also calibration rows",
    )


def check_not_calibration(spec: DataSpec | None, calibration: Mapping[str, Any] | None) -> None:
    """DataError when the file ``spec`` is the one a bundle was calibrated on: it has the
    sha256 the manifest records for the calibration file. For bundles whose calibration
    record has no ``Fingerprint`` of its rows (``check_held_out`` compares rows); bundles
    before the file's sha256 was recorded pass."""
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
    if TYPE_IDS in model.input_names and TYPE_IDS not in feeds and "input_ids" in feeds:
        # one segment, as Hugging Face models default them (and as JSONL text and `quantgate
        # infer` fill them): a tokenizer asked for no token_type_ids gives an .npz without
        feeds = {**feeds, TYPE_IDS: np.zeros_like(np.asarray(feeds["input_ids"]))}
    missing = [n for n in model.input_names if n not in feeds]
    extra = [n for n in feeds if n not in model.input_names and n != LABELS]
    if missing:
        problems.append(f"missing input(s) {missing}")
    if extra:
        hint = f" (labels go in an array named {LABELS!r})" if "label" in extra else ""
        problems.append(f"unknown input(s) {extra}{hint}")
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
                f"{describe_rows(odd.any(1))}. Write 1 for every real token and 0 for padding."
            ]
        empty = ~rows.any(1)
        if empty.any():
            return [
                f"attention_mask: expected at least one 1 per row, found {describe_rows(empty)} of "
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
        f"{describe_rows(bad)}. Tokenize with this model's own tokenizer."
    ]


def with_graph_tables(model: ModelInfo, onnx_file: Path) -> ModelInfo:
    """``model`` with the table sizes its exported graph shows (``tables.index_limits``) for
    inputs whose sizes it did not know: a user's own module says none before its export."""
    from quantgate.tables import index_limits

    found = {k: v for k, v in index_limits(onnx_file).items() if k not in model.id_limits}
    if not found:
        return model
    return dataclasses.replace(model, id_limits={**model.id_limits, **found})


def check_ids(source: DataSource, model: ModelInfo, where: str) -> None:
    """A DataError for rows of ``source`` whose ids fall outside ``model.id_limits``, for
    data read before those limits were known (they come from the exported graph)."""
    for n, batch in enumerate(source.batches(), 1):
        problems = [
            p
            for name, a in batch.feeds.items()
            if name in model.id_limits
            for p in _value_problems(name, a, model)
        ]
        if problems:
            raise DataError(
                f"{where} does not fit the exported model, in its batch {n} (row indices "
                "within the batch): " + "; ".join(problems)
            )


# -- sources -------------------------------------------------------------------------------


def _builtin(model: ModelInfo, role: str, samples: int | None, batch_size: int) -> DataSource:
    from quantgate.model.data import load_digits_splits

    name = "calibration" if role == "calibration" else "test"
    split = load_digits_splits()[name]
    feeds = check_feeds(split.feeds(), model, f"the digits {name} split")
    labels = split.labels
    keep = stratified(_real_tokens(feeds, model).sum(1), samples)
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
        total=len(labels),
        row_hashes=row_hashes({k: v[keep] for k, v in feeds.items()}, model),
    )


def _npz(path: Path, model: ModelInfo, samples: int | None, batch_size: int, flag: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # EOFError: 0 bytes
        raise DataError(
            f"{flag} {path}: not a readable .npz file ({type(e).__name__}: {e}); "
            "expected what np.savez writes: one array per model input (and labels)"
        ) from e

    def load() -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated member
            raise DataError(
                f"{flag} {path}: cannot read its arrays ({e}); expected numeric arrays, "
                "as np.savez writes them from integer numpy arrays"
            ) from e

    digest = sha256_file(path)
    return _whole(
        load, keys, model, samples, batch_size, f"{flag} {path}", digest,
        kind="npz", name=path.name, file_sha256=digest,
    )  # fmt: skip


def _in_memory(arrays: Mapping[str, Any], model: ModelInfo, samples: int | None, batch_size: int):
    """One dict of arrays, every row at once: read as a .npz's arrays are (a cap on the rows
    keeps them length-stratified)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    h = hashlib.sha256(b"arrays")
    for k in sorted(arrays):
        h.update(f"{k}:{arrays[k].dtype.str}:{arrays[k].shape}".encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return _whole(
        lambda: arrays, list(arrays), model, samples, batch_size, "data", h.hexdigest(),
        kind="arrays", name="a dict",
    )  # fmt: skip


def _whole(
    load: Callable[[], dict[str, np.ndarray]],
    keys: list[str],
    model: ModelInfo,
    samples: int | None,
    batch_size: int,
    where: str,
    digest: str,
    *,
    kind: str,
    name: str,
    file_sha256: str | None = None,
) -> DataSource:
    """A source of arrays read whole by ``load`` (a .npz's, or a dict's): checked, capped at
    ``samples`` rows picked by length quantiles, in batches of ``batch_size``; ``where``
    names it in messages, ``name`` in its description."""

    tokens = model.task in TOKEN_TASKS  # labels (rows, sequence): a tag per token
    reads = model.reads_labels or tokens

    def read() -> tuple[Feeds, np.ndarray | None]:
        arrays = dict(load())
        labels = arrays.pop(LABELS, None) if reads else None
        arrays.pop(LABELS, None)  # an embedding model's: not read (resolve says so)
        feeds = check_feeds(arrays, model, where)
        n = len(next(iter(feeds.values())))
        if labels is not None and tokens:
            labels = check_token_labels(labels, _token_rows(feeds, model)[1], model, where)
        elif labels is not None:
            labels = check_labels(labels, n, model.labels, where)
        return feeds, labels

    feeds, labels = read()
    n = len(next(iter(feeds.values())))
    if n == 0:
        raise DataError(f"{where}: the arrays have no rows")
    lengths = _real_tokens(feeds, model).sum(1)
    keep = stratified(lengths, samples)
    hashes = row_hashes({k: v[keep] for k, v in feeds.items()}, model)
    _warn_left_padding(Batch(feeds, None), where=where)
    del feeds, labels  # not held between passes: each pass reads the arrays again, whole
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())

    def batches() -> Iterator[Batch]:
        feeds, labels = read()
        for idx in _chunks(keep, batch_size):
            b = _trim({k: v[idx] for k, v in feeds.items()}, model)
            tags = None if labels is None else labels[idx]
            if tokens and tags is not None:  # a tag per token: cut with the batch's padding
                tags = tags[:, : _token_rows(b, model)[1].shape[1]]
            yield Batch(b, tags)

    return DataSource(
        description=f"{name}: {len(keep)} of {n} rows ({kind})",
        kind=kind,
        file_sha256=file_sha256,
        samples=len(keep),
        has_labels=LABELS in keys and reads,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths[keep].min()), int(lengths[keep].max())),
        total=n,
        row_hashes=hashes,
        labels_ignored=LABELS in keys and not reads,
    )


def _jsonl(
    path: Path, model: ModelInfo, samples: int | None, batch_size: int, flag: str, role: str
):
    if model.tokenizer is None:
        raise DataError(
            f"{flag} {path}: JSONL text needs the model's tokenizer, and this model has none "
            f"(it is not a Hugging Face model). Pass a .npz with arrays "
            f"{', '.join(model.input_names)} instead."
        )
    tok = tokenizer_of(model)
    limit = model.max_seq_len or None
    where = f"{flag} {path}"
    scan = _scan_jsonl(path, tok, limit, model, where)
    error = _refusal(scan, model, where)
    if error is not None:
        raise error
    if not scan.offsets:
        found = "only blank lines" if path.stat().st_size else "an empty file"
        raise DataError(
            f'{where}: expected one {{"text": ...}} JSON object per line, found {found}. '
            "Write the texts into it, one object per line."
        )
    if not scan.labelled and model.reads_labels:
        _warn_unlabelled(scan, where)
    lengths = np.asarray(scan.lengths, dtype=np.int64)
    offsets = np.asarray(scan.offsets, dtype=np.int64)
    keep = stratified(lengths, samples)
    cut = int(np.isin(keep, scan.cut).sum())
    if cut:
        log.warning(
            "%s: %d of %d %s texts are longer than the model's %d tokens and are cut: %s only "
            "their first %d tokens",
            where,
            cut,
            len(keep),
            role,
            limit,
            "the gates see" if role == "evaluation" else "the calibration sees",
            limit,
        )
    digest = sha256_file(path)
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())
    h.update(f"{limit}".encode())  # not the tokenizer's path: the bundle moves with its copy
    index = name_index(model.labels)
    labelled = bool(scan.labelled)

    def batches() -> Iterator[Batch]:
        with open(path, "rb") as f:
            for idx in _chunks(keep, batch_size):
                rows = []
                for off in offsets[idx]:
                    f.seek(int(off))
                    rows.append(json.loads(f.readline()))
                feeds = _encode(tok, [r["text"] for r in rows], model, limit)
                labels = None
                if labelled:  # a class name stands for its index
                    labels = np.array([index.get(r["label"], r["label"]) for r in rows], np.int64)
                yield Batch(feeds, labels)

    long = f"; {cut} longer than the model's {limit} tokens, cut to them" if cut else ""
    return DataSource(
        description=f"{path.name}: {len(keep)} of {len(offsets)} texts (JSONL, model tokenizer{long})",
        kind="jsonl",
        file_sha256=digest,
        samples=len(keep),
        has_labels=labelled,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths[keep].min()), int(lengths[keep].max())),
        total=len(offsets),
        cut=cut,
        row_hashes=np.asarray(scan.hashes, dtype=np.uint64)[keep],
        labels_ignored=scan.ignored > 0,
    )


MAX_PROBLEMS = 10  # bad lines described one by one; the rest are counted
TOKEN_BATCH = 256  # texts tokenized at once to count their tokens


@dataclass
class _Scan:
    """What the first pass over a JSONL file learns; none of its texts are kept."""

    offsets: list[int] = field(default_factory=list)  # byte offset of each good line
    lengths: list[int] = field(default_factory=list)  # its token count, at most the model's
    hashes: list[int] = field(default_factory=list)  # its row hash (row_hashes)
    cut: list[int] = field(default_factory=list)  # good rows longer than the model takes
    lines: int = 0  # non-blank lines
    bad: int = 0  # lines that are not a good row
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, described
    shapes: set[tuple[str, ...] | None] = field(default_factory=set)  # how (two are enough)
    labelled: bool | None = None  # whether the good lines have a "label"; None: no good line
    first: int = 0  # the line number of the first good line, which set ``labelled``
    lo: int = 1 << 63  # the smallest and largest integer label
    hi: int = -1
    index_at: str | None = None  # the first integer label, and its line
    name_at: str | None = None  # the first string label, and its line
    null_labels: int = 0  # lines whose "label" is null (read as unlabelled)
    reads_labels: bool = True  # False: an embedding model's; its labels are not read
    ignored: int = 0  # lines whose label was not read for that
    unread: set[str] = field(default_factory=set)  # keys beside "text" and "label" there

    def add(self, lineno: int, row: Any, problem: str | None) -> bool:
        """Take in one non-blank line (``_parse_line``'s answer); True for a good row."""
        self.lines += 1
        label = row.get("label") if isinstance(row, dict) else None
        if label is not None and not self.reads_labels:
            self.ignored, label = self.ignored + 1, None
        if isinstance(label, int) and not isinstance(label, bool):
            self.lo, self.hi = min(self.lo, label), max(self.hi, label)
            self.index_at = self.index_at or f"{label} on line {lineno}"
        elif isinstance(label, str):
            self.name_at = self.name_at or f"{quote(label)} on line {lineno}"
        if problem is None and self.labelled is not None and (label is not None) != self.labelled:
            has, first = ("has a", "has none") if label is not None else ("has no", "has one")
            problem = (
                f'{has} "label", but line {self.first}, the first row, {first}: label every '
                "line or none"
            )
        if problem is not None:
            self.bad += 1
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(f"line {lineno}: {problem}")
            if len(self.shapes) < 2:
                self.shapes.add(_shape(row))
            return False
        self.labelled = label is not None
        self.first = self.first or lineno
        if not self.labelled and self.reads_labels:
            self.null_labels += "label" in row
            if len(self.unread) < MAX_PROBLEMS:  # one may be a misnamed label
                self.unread.update(k for k in row if k not in ("text", "label"))
        return True


def _scan_jsonl(path: Path, tok, limit: int | None, model: ModelInfo, where: str) -> _Scan:
    """Pass 1 over a JSONL file: every line parsed and checked; the byte offset, token count
    and row hash of every good one, and which are cut at ``limit`` (tokenized only while no
    line is bad: such a file is refused)."""
    scan = _Scan(reads_labels=model.reads_labels)
    texts: list[str] = []  # good lines waiting to be tokenized
    starts: list[int] = []  # and their offsets

    def count() -> None:
        ids = _token_ids(tok, texts, limit)
        if limit is not None:  # a row of ``limit`` tokens may have been cut: count again
            full = [i for i, row in enumerate(ids) if len(row) == limit]
            longer = _token_ids(tok, [texts[i] for i in full], limit + 1) if full else []
            first = len(scan.offsets)
            scan.cut.extend(
                first + i for i, row in zip(full, longer, strict=True) if len(row) > limit
            )
        scan.lengths.extend(len(row) for row in ids)
        scan.hashes.extend(_row_hash(np.asarray(row, dtype="<i8")) for row in ids)
        scan.offsets.extend(starts)
        texts.clear()
        starts.clear()

    with open(path, "rb") as f:
        pos = 0
        for lineno, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            if not scan.lines:
                _check_format(line, lineno, where)
            row, problem = _parse_line(line, model)
            if scan.add(lineno, row, problem) and not scan.bad:
                texts.append(row["text"])
                starts.append(start)
                if len(texts) == TOKEN_BATCH:
                    count()
    if texts and not scan.bad:
        count()
    return scan


def _refusal(scan: _Scan, model: ModelInfo, where: str) -> DataError | None:
    """The one DataError for a scanned JSONL file with bad lines, or whose labels are class
    names that cannot stand for classes (``labels.forms_problem``); None for a good file."""
    forms = forms_problem(scan.index_at, scan.name_at, model.labels)
    if not scan.bad:
        return None if forms is None else DataError(f"{where}: {forms}")
    shape = next(iter(scan.shapes)) if len(scan.shapes) == 1 else None
    if scan.bad == scan.lines and shape is not None:  # every line wrong the same way: say once
        return DataError(f"{where}: {_same_on_every_line(shape)}")
    more = scan.bad - len(scan.problems)
    body = [
        *(f"  - {p}" for p in scan.problems),
        *([f"  ... and {more} more bad line(s)"] if more else []),
        *([one_based_hint(scan.lo, scan.hi, len(model.labels)).strip()] if model.labels else []),
        *([forms] if forms else []),
    ]
    optional = (
        f'an optional "label" (a class index, or one of the model\'s {len(model.labels)} '
        "class names)"
        if model.labels
        else 'an optional integer "label"'
    )
    return DataError(
        f'{where}: expected one JSON object per line with a non-blank string "text" and '
        f"{optional}:\n" + "\n".join(part for part in body if part)
    )


def _warn_unlabelled(scan: _Scan, where: str) -> None:
    """Warn where a file read as unlabelled looks as if it meant to have labels: a "label"
    null on every line, or keys beside "text" that are not read (one may be the label)."""
    keys = ", ".join(f'"{k}"' for k in sorted(scan.unread))
    if scan.null_labels == scan.lines:
        log.warning(
            '%s: "label" is null on every line, so the rows are read as unlabelled (the gates '
            "compare with FP32 only).%s",
            where,
            f' Keys {keys} are not read: if one holds each row\'s class, put it in "label".'
            if keys
            else "",
        )
    elif keys:
        log.warning(
            '%s: no line has a "label", so the rows are read as unlabelled; keys %s are not '
            'read. If one of them holds each row\'s class, name it "label".',
            where,
            keys,
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


def _parse_line(line: bytes, model: ModelInfo) -> tuple[Any, str | None]:
    """A JSONL line's value (``UNREADABLE`` where it is not UTF-8 JSON) and what is wrong
    with it as a row, or None: a non-blank string "text", a label that is a class of the
    model (``labels.label_problem``)."""
    try:
        row = json.loads(line)
    except UnicodeDecodeError as e:
        return UNREADABLE, (
            f"not UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); save the "
            "file as UTF-8"
        )
    except ValueError as e:
        return UNREADABLE, f"not JSON ({e})"
    if not isinstance(row, dict):
        return row, f'found {_json_kind(row)}, expected an object with a "text" key'
    if "text" not in row:
        return row, f'no "text" key (found {_keys(row) or "an empty object"})'
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        return row, f'no non-blank string "text" (found {json.dumps(text)[:60]})'
    label = row.get("label") if model.reads_labels else None
    return row, None if label is None else label_problem(label, model.labels)


UNREADABLE = object()  # a JSONL line that is not UTF-8 JSON


def _shape(row: Any) -> tuple[str, ...] | None:
    """How a bad line is wrong, where every line of a file may be wrong the same way: the keys
    of an object without "text", the kind of a value that is not an object; else None."""
    if row is UNREADABLE:
        return None
    if isinstance(row, dict):
        return ("keys", *row) if "text" not in row else None
    return ("value", _json_kind(row))


def _same_on_every_line(shape: tuple[str, ...]) -> str:
    """One message for a file whose every line has the same wrong keys or is not an object."""
    if shape[0] == "value":
        fix = (
            " Wrap each, for example with: jq -c '{text: .}' IN.jsonl > OUT.jsonl"
            if shape[1] == "a string"
            else ""
        )
        return (
            f'found {shape[1]} on every line; expected one {{"text": ..., "label": ...}} '
            f'object per line ("label" optional).{fix}'
        )
    keys = shape[1:]
    found = f"found keys {_keys(keys)} on every line" if keys else "found {} on every line"
    texts = [k for k in keys if k not in ("label", "labels", "id", "idx")]
    key = texts[0] if len(texts) == 1 else "KEY"
    return (
        f'{found}; expected "text" (the text to tokenize) and optionally "label" (its class). '
        f'Rename the key that holds the text to "text", for example with: '
        f"jq -c '.text = .{key} | del(.{key})' IN.jsonl > OUT.jsonl"
    )


def _keys(keys: Iterable[str]) -> str:
    """'"sentence", "label"': the first eight keys, quoted."""
    keys = list(keys)
    shown = ", ".join(map(quote, keys[:8]))
    return shown + (f", ... {len(keys) - 8} more" if len(keys) > 8 else "")


def _json_kind(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return f"JSON {json.dumps(value)}"
    return "an array" if isinstance(value, list) else "a number"


def tokenize(texts: Sequence[str], model: ModelInfo, tokenizer: Any = None) -> Feeds:
    """``texts`` as one padded batch of the model's inputs, by the model's own tokenizer (as
    JSONL data is; ``tokenizer``, where the caller has loaded it), cut at its longest
    sequence: what a client sends the served model."""
    tok = tokenizer or tokenizer_of(model)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"expected one or more non-blank texts, found {list(texts)!r}")
    limit = model.max_seq_len or None
    if limit is not None:
        for i, n in enumerate(_token_counts(tok, list(texts), None), 1):
            if n > limit:
                log.warning(
                    "text %d is %d tokens; the model reads at most %d, so the last %d are cut",
                    i,
                    n,
                    limit,
                    n - limit,
                )
    return _encode(tok, list(texts), model, limit)


def tokenizer_of(model: ModelInfo):
    """The model's own tokenizer (a bundle's copy): text to token ids, and back. It pads
    with the model's pad id, as the server pads, also where the tokenizer names none of
    its own (GPT-2's) or another than the model's config."""
    if model.tokenizer is None:
        raise DataError(
            "text needs the model's tokenizer, and this model has none (it is not a Hugging "
            f"Face model); send its inputs ({', '.join(model.input_names)}) as arrays instead"
        )
    tok = _tokenizer(model.tokenizer)
    if (pad := model.pad_values.get("input_ids")) is not None and tok.pad_token_id != pad:
        tok.pad_token_id = int(pad)
    return tok


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
        auto = _auto_tokenizer()
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name in ("transformers", "tokenizers"):
            raise  # the `hf` extra is not installed: the CLI says to install it
        raise DataError(f"cannot import transformers' tokenizers ({e}); check its install") from e
    try:
        tok = auto.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise DataError(f"cannot load the model's tokenizer from {directory}: {e}") from e
    tok.padding_side = "right"  # as the server pads requests, whatever the config says
    # quantgate cuts texts at the model's max_seq_len itself, and says so in its own words:
    # not transformers' warning of "indexing errors" against its own, other limit
    tok.model_max_length = 1 << 62
    return tok


def _auto_tokenizer():
    """transformers' AutoTokenizer, imported without its advice that PyTorch is missing: a CI
    runner or a client tokenizes without torch by design (the `hf` extra alone)."""
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(quiet)
    os.environ[quiet] = "1"
    try:
        from transformers import AutoTokenizer
    finally:
        if before is None:
            del os.environ[quiet]
        else:
            os.environ[quiet] = before
    return AutoTokenizer


def _hf_config(directory: str) -> dict[str, Any]:
    """The config.json beside a Hugging Face tokenizer, or {} (a tokenizer saved alone)."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _token_counts(tok, texts: list[str], limit: int | None) -> list[int]:
    return [len(ids) for ids in _token_ids(tok, texts, limit)]


def _token_ids(tok, texts: list[str], limit: int | None) -> list[list[int]]:
    """Each text's ``input_ids`` without padding, cut at ``limit`` tokens (None: not cut)."""
    return tok(texts, truncation=limit is not None, max_length=limit)["input_ids"]


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

    ignored = [False]  # an item had labels, which an embedding model does not read

    def items() -> Iterator[tuple[int, Feeds, Any, np.ndarray | None]]:
        """Each item, checked: its index, its feeds, its labels as given and as indices."""
        for i, feeds in enumerate(make()):
            if not isinstance(feeds, Mapping):
                raise DataError(
                    f"data item {i} is a {type(feeds).__name__}; expected a dict of arrays"
                )
            f = check_feeds(feeds, model, f"data item {i}")
            given = feeds.get(LABELS) if model.reads_labels else None  # else not read
            ignored[0] = ignored[0] or (LABELS in feeds and not model.reads_labels)
            n = len(next(iter(f.values())))
            # class names become indices
            labels = (
                None if given is None else check_labels(given, n, model.labels, f"data item {i}")
            )
            yield i, f, given, labels

    rows, labelled, h = 0, None, hashlib.sha256(b"iterable")
    lo, hi = None, 0
    hashes = []  # row_hashes of the rows used, item by item
    forms: dict[str, str] = {}  # "indices"/"names": the first item with labels in that form
    for i, f, given, labels in items():
        if i == 0:  # JSONL is tokenized right-padded, the built-in split has no padding
            _warn_left_padding(Batch(f, None), where="the data iterable")
        if given is not None:
            for form in label_forms(given):
                forms.setdefault(form, f"data item {i}")
            problem = forms_problem(forms.get("indices"), forms.get("names"), model.labels)
            if problem is not None:
                raise DataError(f"data item {i}: {problem}")
        if labelled is not None and (labels is not None) != labelled:
            raise DataError(f"data item {i}: labels on some items but not others")
        labelled = labels is not None
        n = len(next(iter(f.values())))
        take = n if samples is None else min(n, samples - rows)  # the rows used, and hashed
        used = {k: v[:take] for k, v in f.items()}
        lens = _real_tokens(used, model).sum(1)
        lo, hi = min(lo if lo is not None else 1 << 30, int(lens.min())), max(hi, int(lens.max()))
        for k in sorted(used):
            h.update(np.ascontiguousarray(used[k]).tobytes())
        if labels is not None:
            h.update(labels[:take].tobytes())
        hashes.append(row_hashes(used, model))
        rows += take
        if samples is not None and rows >= samples:
            break
    if not rows:
        raise DataError("the data iterable yielded no rows")

    def batches() -> Iterator[Batch]:
        left = rows
        for _, f, _, labels in items():
            take = min(left, len(next(iter(f.values()))))
            for s in range(0, take, batch_size):
                sl = slice(s, min(take, s + batch_size))
                yield Batch(
                    {k: v[sl] for k, v in f.items()}, None if labels is None else labels[sl]
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
        total=None if samples is not None and rows >= samples else rows,  # else not read to the end
        row_hashes=np.concatenate(hashes),
        labels_ignored=ignored[0],
    )


def counted(source: DataSource, on_rows: Callable[[int], None]) -> Callable[[], Iterator[Feeds]]:
    """``source`` as a calibration callable that reports rows as they are handed over (a
    reader that stops at the end of its range never asks past the last batch: counted after
    it, that batch went unreported, and a bar stopped at 192 of 200)."""

    def calibration() -> Iterator[Feeds]:
        done = 0
        for feeds in source():
            done += len(next(iter(feeds.values())))
            on_rows(done)
            yield feeds

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
    "Fingerprint",
    "ModelInfo",
    "check_feeds",
    "check_held_out",
    "check_ids",
    "check_not_calibration",
    "check_path",
    "counted",
    "open_source",
    "row_hashes",
    "stratified",
    "tokenize",
    "with_graph_tables",
    "write_npz",
]
