"""Calibration and evaluation data: sources of ONNX Runtime feeds, streamed in batches.

A source is re-iterable: ``source.batches()`` starts over on every call and yields
``Batch(feeds, labels)`` of at most ``batch_size`` rows, so the search can calibrate and
evaluate as often as it needs while memory stays bounded by one batch of a text file (one
item of an iterable; a ``.npz`` file's arrays, which numpy reads whole, during a pass), plus
a few ints per sample: its length for length-stratified selection, its row hash. ``source()`` yields the
feeds alone: the ``calibration`` callable that ``quantize.recipes.quantize`` takes.

Where the data comes from (``open_source``):

- nothing, for the built-in digits model: its fixed calibration split (200 images) and its
  labelled test split (360 images), never trained on;
- ``*.npz``: one ``(N, T)`` array per model input, optionally ``labels`` ``(N,)``;
- text, tokenized with the model's own tokenizer, read row by row and tokenized batch by
  batch (``quantize.text``): ``*.jsonl``, one ``{"text": ..., "label": ...}`` object per
  line (``label`` optional; a file whose every line has the same wrong keys is told so
  once, not line by line); ``*.csv`` and ``*.tsv`` with a header naming a ``text`` column
  (and optionally ``label``); ``*.txt``, one text per line (``quantize.textfiles``);
- in the API, any iterable of feed dicts (each a batch; a ``"labels"`` entry is taken as
  labels), or a callable returning one.

A token classifier's labels are one per token, (rows, sequence) arrays (``labels.
check_token_labels``): an .npz, a dict or an iterable carries them; a text file cannot (its
labels are ignored, with a warning).

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
position, and whatever spacing the tokenizer drops; ``quantize.heldout`` tells evaluation
rows from calibration rows by those hashes.

Every source has a content ``sha256`` (of the bytes read plus the selection) for the
manifest. Problems are collected and raised as one ``DataError``: what was expected, what
was found, what to do.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.bundle import Manifest, TensorSpec, class_names, sha256_file
from quantgate.errors import ConfigError, DataError
from quantgate.quantize.heldout import FINGERPRINT, Fingerprint, row_hash
from quantgate.quantize.labels import (
    NO_LABEL,
    check_labels,
    check_token_labels,
    describe_classes,
    describe_rows,
    forms_problem,
    label_forms,
)
from quantgate.quantize.textfiles import KINDS as TEXT_KINDS
from quantgate.quantize.textfiles import SUFFIXES as TEXT_SUFFIXES
from quantgate.tasks import EMBEDDING_TASKS, MULTI_LABEL_TASKS, QA_TASKS, TOKEN_TASKS
from quantgate.tokenizer import Settings

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
LABELS = "labels"
DEFAULT_BATCH = 16  # rows per feed; calibration statistics do not depend on it
# Fewest calibration rows before a warning: static INT8 takes each activation's range from
# the calibration rows (their extremes, or a percentile of them), and from a handful of rows
# those ranges are noise, not the ranges of the data the model will serve.
MIN_CALIBRATION_ROWS = 32
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
    if model.task in MULTI_LABEL_TASKS:
        log.warning(
            "%s: labels ignored: a %s model is gated on its agreement with FP32's decisions "
            "(each label on or off) and its scores' cosine, which need none",
            where, model.task,
        )  # fmt: skip
        return
    if model.task in QA_TASKS:
        log.warning(
            "%s: labels ignored: a %s model is gated on its agreement with FP32's answer spans "
            "and its start and end scores, which need none",
            where, model.task,
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
    tokenizer: str | None = None  # Hugging Face tokenizer directory, for text files
    pad_values: dict[str, int] = field(default_factory=dict)  # per input; default 0
    # per input: the rows of the embedding table its ids index (ids must be below it);
    # an input missing here is checked for negative ids only (see ID_INPUTS)
    id_limits: dict[str, int] = field(default_factory=dict)
    # a classifier's class names by index, as its export recorded them (the Hugging Face
    # config's id2label, the digits '0'..'9'); labels are checked against them and string
    # labels mapped through them. Empty: none recorded (labels must be indices >= 0).
    labels: tuple[str, ...] = ()
    # how to run its tokenizer.json without transformers, where its export checked that
    # this gives what transformers gives (quantgate.tokenizer.check); None: by transformers
    tokenizer_settings: Settings | None = None
    # False: the data's labels are not read at all (calibration data's: only the inputs are,
    # so a reused training file's unlabelled rows, or classes the model lacks, are no matter)
    labels_read: bool = True

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def reads_row_labels(self) -> bool:
        """Whether its gates read one label per row (a class index or name): a classifier's.
        A token classifier reads one per token (``reads_token_labels``); an embedding model
        is gated on its agreement with FP32 and reads none, as a multi-label classifier
        (whose rows would need a label set each) and a question-answering model (a span
        each)."""
        return self.labels_read and self.task not in (
            *EMBEDDING_TASKS, *TOKEN_TASKS, *MULTI_LABEL_TASKS, *QA_TASKS
        )  # fmt: skip

    @property
    def reads_token_labels(self) -> bool:
        """Whether its gates read one label per token, (rows, sequence) arrays: a token
        classifier's; a text file has no way to give them."""
        return self.labels_read and self.task in TOKEN_TASKS

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
        tokenizer, pads, settings = hf.get("tokenizer"), dict(pads), None
        limits = _id_limits(extra.get("model") or {}, {"input_ids": "vocab_size"})
        if tokenizer:
            if root is not None:  # a bundle's own copy is relative to it; older ones absolute
                tokenizer = str(Path(root) / tokenizer)
                if isinstance(checked := hf.get("tokenizers"), dict):  # verified with the bundle
                    settings = Settings.from_dict(checked)
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
            tokenizer_settings=settings,
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
    # (B,) each row's index in the arrays it was read from, where they were read whole (a
    # .npz's, a dict's, the digits'): a message names the row a user can find
    rows: np.ndarray | None = None
    # (B, T) bool, a question answerer's text pairs: the tokens of each row's context, as its
    # tokenizer tells them (the pair's second text, no special token: spans.context_mask);
    # None where not known (arrays, and other models)
    context: np.ndarray | None = None
    # (B, 2) int64, a question answerer's pairs read in windows (tokenizer.Windows), a row
    # each: each row's pair (its number in the source) and its part of the context's first
    # token (its index among the context's tokens), by which the gates read one answer a
    # pair (spans.pair_spans); None where each row is a pair
    windows: np.ndarray | None = None


@dataclass(frozen=True)
class DataSource:
    """A re-iterable stream of batches; ``source()`` yields feeds (a calibration reader)."""

    description: str  # for the report: what, from where, how many
    kind: str  # "builtin" | "npz" | "jsonl" | "csv" | "tsv" | "txt" | "arrays" | "iterable"
    samples: int  # rows it yields
    has_labels: bool
    sha256: str
    _batches: Callable[[], Iterator[Batch]] = field(repr=False)
    lengths: tuple[int, int] = (0, 0)  # shortest and longest real length among the rows
    file_sha256: str | None = None  # of the whole file it reads, where it reads one
    total: int | None = None  # rows it could yield without the samples cap; None: not known
    cut: int | None = None  # texts longer than the model's longest sequence, cut to it (text)
    # rows that were also calibration rows (check_held_out), left out; None: not compared
    in_calibration: int | None = None
    repeated: int = 0  # rows that repeated an earlier row, left out (heldout.distinct_rows)
    relabelled: int = 0  # of those, rows labelled otherwise than the copy kept (without_rows)
    # (samples,) uint64: each row's row_hashes, in any order; None: not known
    row_hashes: np.ndarray | None = field(default=None, repr=False, compare=False)
    labels_ignored: bool = False  # it had labels, which the model's gates do not read
    # a text file's rows are (text, text_pair) pairs; None: not text (arrays, a .npz)
    text_pairs: bool | None = None
    # a question answerer's pairs read in windows, a row each (Batch.windows): the pairs
    # those rows read, what its span gate counts; None where each row is its own
    pairs: int | None = None
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
            **({"repeated": self.repeated} if self.repeated else {}),
            **({"text_pairs": True} if self.text_pairs else {}),
            **({"pairs": self.pairs} if self.pairs is not None else {}),  # samples: windows
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


class Role(str, enum.Enum):
    """What data is read for: it names the flag in messages and decides what is read of it."""

    CALIBRATION = "calibration"  # activation ranges: labels not read
    EVALUATION = "evaluation"  # the gates: labels read, the context of answers kept

    @property
    def flag(self) -> str:
        return "--calibration" if self is Role.CALIBRATION else "--eval"

    @property
    def samples_setting(self) -> str:
        """What caps its rows: a flag, or a gate setting."""
        return "--samples" if self is Role.CALIBRATION else "eval_samples (--gate-config)"


def open_source(
    spec: DataSpec | None,
    model: ModelInfo,
    *,
    role: Role | str,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DataSource:
    """Resolve ``spec`` (a path, a dict of arrays, an iterable of them, or None for the
    built-in split) into a source.

    ``role`` (a ``Role``, or its value "calibration" or "evaluation") names the flag in
    messages and picks the built-in split ("calibration" or "test"). Calibration rows'
    labels are not read (nor checked). Fewer than ``MIN_CALIBRATION_ROWS`` calibration rows
    are warned about.
    """
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(
            f"open_source: role {role!r}: expected one of {', '.join(repr(r.value) for r in Role)}"
        ) from None
    if samples is not None and samples < 1:
        raise DataError(f"{role.samples_setting} must be at least 1, got {samples}")
    flag = role.flag
    if role is Role.CALIBRATION:
        model = dataclasses.replace(model, labels_read=False)
    if isinstance(spec, DataSource):
        source = spec
    elif spec is None:
        if not model.builtin:
            arrays = f"a .npz with one array per input, named {' and '.join(model.input_names)}"
            labels = (
                ", and its labels as 'labels'"
                if model.reads_row_labels or model.reads_token_labels
                else ""
            )
            if model.tokenizer is None:  # text would be refused: it has no tokenizer to read it
                what = f"{arrays}{labels}"
            else:
                what = (
                    'text: a .jsonl of {"text": ..., "label": ...} lines, a .csv or .tsv with a '
                    f'"text" column, a .txt of lines; or {arrays}{labels}'
                )
            raise DataError(
                f"no {role.value} data: {flag} PATH is required for this model ({what}). Only the "
                "built-in digits model has its own."
            )
        source = _builtin(model, role, samples, batch_size)
    elif isinstance(spec, (str, Path)):
        path = check_path(spec, flag)
        if path.suffix.lower() == ".npz":
            source = _npz(path, model, samples, batch_size, flag)
        else:
            from quantgate.quantize.text import text_source  # text imports this module

            source = text_source(path, model, samples, batch_size, role)
    elif isinstance(spec, Mapping):  # one dict of arrays, as a .npz holds them
        source = _in_memory(spec, model, samples, batch_size)
    else:
        source = _iterable(spec, model, samples, batch_size)
    if role is Role.CALIBRATION and source.samples < MIN_CALIBRATION_ROWS:
        _warn_few_calibration_rows(source, samples, where=named(flag, spec, source))
    elif (
        role is Role.CALIBRATION
        and samples is not None
        and source.total is not None  # None: not read to its end, having rows enough
        and source.total < samples
    ):
        log.warning(  # not an error: every row is used, as asked; but not as many as asked
            "%s: --samples %d, but the data has %d row(s): all of them are used",
            named(flag, spec, source),
            samples,
            source.total,
        )
    if role is Role.EVALUATION and source.labels_ignored:
        _ignored_labels(named(flag, spec, source), model)
    if not isinstance(spec, DataSource):
        source = dataclasses.replace(source, pad_values=dict(model.pad_values))
    return source


def named(flag: str, spec: DataSpec | None, source: DataSource) -> str:
    """How messages name the data: '--eval heldout.jsonl', else the data and the source's
    description: 'the evaluation data (a dict: 200 rows (arrays))'."""
    if isinstance(spec, (str, Path)):
        return f"{flag} {spec}"
    if spec is None or isinstance(spec, DataSource):  # the built-in split: it says what it is
        return source.description
    role = {r.flag: r.value for r in Role}.get(flag, flag)
    return f"the {role} data ({source.description})"


def _warn_padding(rows: Batch, model: ModelInfo, *, where: str) -> None:
    """Warn when ``rows`` (an iterable's first item, an .npz file's arrays: as each source
    reads them) are padded otherwise than the server pads requests: on the left (a mask of
    0 before its 1s), or a text model's pad tokens at a row's end marked as tokens (a mask
    of 1 over them). Export validation assumes the server's padding, and gates measured on
    such rows measure inputs the served model never sees."""
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
    ids, pad = rows.feeds.get("input_ids"), model.pad_values.get("input_ids", 0)  # as served
    if model.tokenizer is None or ids is None or ids.shape != mask.shape:
        return  # the pad id is a token of the text's only where a tokenizer names it
    # A run of pad ids at a row's end under a mask of 1s: padding attended. One pad id there
    # may be a token (GPT-2 pads with its end-of-text, or with id 0, its "!")
    padded = (ids == pad) & (mask == 1)
    trailing = np.argmax(np.flip(~padded, axis=1), axis=1)  # such positions at the row's end
    attended = trailing >= 2
    if attended.any():
        log.warning(
            "%s: rows end in the pad token (id %d) with an attention_mask of 1 over it (%s): "
            "padding marked as tokens, which the model attends to; quantgate's server pads "
            "with a mask of 0 there. Set the mask to 0 on padding (as a tokenizer's "
            "attention_mask does).",
            where,
            pad,
            describe_rows(attended),
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


def check_path(spec: str | Path, flag: str) -> Path:
    """The data file ``spec`` names, if it exists in a format this module reads; else a
    DataError for ``flag``. Cheap: the CLI calls it before minutes of export."""
    path = Path(spec).expanduser()
    expected = "Expected text (.jsonl, .csv, .tsv, .txt) or arrays (.npz)."
    stream = DataError(
        f"{flag} {spec}: a stream, not a file: the data is read more than once (a pass to "
        f"check it, then one per use), so write it to a file and give its path. {expected}"
    )
    if str(spec) == "-":  # stdin
        raise stream
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        if path.is_symlink():  # it names what is not there
            raise DataError(
                f"{flag} {path}: a symbolic link to {os.readlink(path)}, which does not exist. "
                f"{expected}"
            ) from None
        raise DataError(f"{flag} {path}: no such file. {expected}") from None
    except PermissionError as e:  # a folder on its path this user may not search, say
        raise DataError(
            f"{flag} {path}: cannot be read ({e.strerror}). Make it, and every folder above "
            "it, readable by this user, or copy it to a folder this user can read"
        ) from None
    except OSError as e:  # a loop of links, a name too long, a disk that fails
        raise DataError(f"{flag} {path}: cannot be read ({e.strerror or e}). {expected}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{flag} {path}: is a directory. {expected}")
    if not stat.S_ISREG(mode):  # a pipe, <(...)
        raise stream
    suffix = path.suffix.lower()
    if suffix != ".npz" and suffix not in TEXT_SUFFIXES:
        hint = {
            ".gz": f" Decompress it first (gunzip -k {path}).",
            ".npy": " Save the arrays as a .npz, one per input: numpy.savez(PATH, input_ids=...,"
            " attention_mask=...).",
        }.get(suffix, "")
        raise DataError(
            f"{flag} {path}: unknown format {suffix or '(no suffix)'}; expected .jsonl, .csv, "
            ".tsv or .txt (text, tokenized with the model's tokenizer) or .npz (arrays named "
            f"after the model inputs).{hint}"
        )
    return path


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
    hashes = (row_hash(row[keep].astype(dtype)) for row, keep in zip(rows, real, strict=True))
    return np.fromiter(hashes, dtype=np.uint64, count=len(rows))


def whole_row_hashes(feeds: Mapping[str, np.ndarray], model: ModelInfo) -> np.ndarray:
    """(N,) uint64: each row known by every input's values at its real tokens (padding
    left out), and by its shape: two rows alike in their ids but not in another input (a
    factory's features) differ here, as they do not in ``row_hashes``."""
    real = _real_tokens(feeds, model)
    hashes = []
    for r in range(len(real)):
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(feeds):
            a = np.asarray(feeds[name])[r]
            if a.ndim >= 1 and a.shape[0] == real.shape[1]:
                a = a[real[r]]
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        hashes.append(int.from_bytes(h.digest(), "little"))
    return np.array(hashes, dtype=np.uint64)


def without_rows(
    source: DataSource,
    model: ModelInfo,
    *,
    drop: np.ndarray | None = None,
    repeats: bool = False,
) -> DataSource:
    """``source`` without the rows whose ``row_hashes`` are in ``drop`` (calibration rows),
    and with ``repeats``, without every row that repeats an earlier one (``whole_row_hashes``
    alike; the first is kept). Each pass yields the same rows in the same order; batches
    keep their length order, cut to their longest row that remains. ``samples`` and
    ``row_hashes`` are those of the rows kept, read in one pass over the source, here;
    later passes hash nothing again. ``relabelled`` counts the repeats whose label (one per
    row) is not the kept copy's."""
    drop = np.asarray([] if drop is None else drop, dtype=np.uint64)
    tokens = model.reads_token_labels
    # Which rows of each batch stay, decided once, here: every pass (the search makes one
    # per candidate) takes the same batches from ``source`` and keeps the same rows
    keeps: list[np.ndarray] = []
    hashes, lengths = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    pairs: list[np.ndarray] = []  # a question answerer's: the pair of each window kept
    seen: dict[int, int | None] = {}  # each row seen, by whole_row_hashes: its label
    relabelled = 0
    for b in source.batches():
        ids = row_hashes(b.feeds, model)
        keep = ~np.isin(ids, drop)
        if repeats:
            # one label a row (a tagger's are not compared), as it is read
            labels = b.labels.tolist() if b.labels is not None and b.labels.ndim == 1 else None
            rows = whole_row_hashes(b.feeds, model).tolist()
            for i, (h, label) in enumerate(zip(rows, labels or [None] * len(rows), strict=True)):
                if h in seen:
                    keep[i] = False
                    relabelled += seen[h] != label
                else:
                    seen[h] = label
        keeps.append(keep)
        if b.windows is not None:
            pairs.append(b.windows[keep][:, 0])
        hashes.append(ids[keep])
        lengths.append(_real_tokens(b.feeds, model).sum(1)[keep])

    def batches() -> Iterator[Batch]:
        for b, keep in zip(source.batches(), keeps, strict=True):
            if keep.all():
                yield b
            elif keep.any():
                feeds = _trim({k: v[keep] for k, v in b.feeds.items()}, model)
                labels = None if b.labels is None else b.labels[keep]
                width = _token_rows(feeds, model)[1].shape[1]
                if tokens and labels is not None:  # a tag per token: cut with the padding
                    labels = labels[:, :width]
                context = None if b.context is None else b.context[keep][:, :width]
                windows = None if b.windows is None else b.windows[keep]
                rows = None if b.rows is None else b.rows[keep]
                yield Batch(feeds, labels, rows, context, windows)

    kept, length = np.concatenate(hashes), np.concatenate(lengths)
    dropped = source.samples - len(kept)
    digest = hashlib.sha256(source.sha256.encode())
    digest.update(np.sort(drop).tobytes() + (b"distinct" if repeats else b""))
    return dataclasses.replace(
        source,
        samples=len(kept),
        row_hashes=kept,
        sha256=digest.hexdigest(),
        _batches=batches,
        relabelled=relabelled,
        # the pairs whose windows remain (32 pairs were still counted with 3 left out)
        pairs=len(np.unique(np.concatenate(pairs))) if pairs else source.pairs,
        # what it could yield without the samples cap, less the rows left out (those the cap
        # would have kept are not known: an estimate, where it capped)
        total=None if source.total is None else source.total - dropped,
        lengths=(int(length.min()), int(length.max())) if len(length) else (0, 0),
    )


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


def check_not_calibration(spec: DataSpec | None, calibration: Mapping[str, Any] | None) -> None:
    """DataError when the file ``spec`` is the one a bundle was calibrated on: it has the
    sha256 the manifest records for the calibration file. For bundles whose calibration
    record has no ``Fingerprint`` of its rows (``check_held_out`` compares rows); bundles
    before the file's sha256 was recorded pass."""
    calibration = calibration or {}
    recorded = calibration.get("file_sha256")
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


def chunks(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _trim(feeds: Feeds, model: ModelInfo) -> Feeds:
    """Drop trailing all-padding columns of a length-sorted batch (variable-length models)."""
    mask = feeds.get("attention_mask")
    if mask is None or _fixed_seq(model) is not None or mask.ndim != 2:
        return feeds
    width = int(np.flatnonzero(mask.astype(bool).any(axis=0)).max(initial=0)) + 1
    return {k: (v[:, :width] if v.ndim >= 2 else v) for k, v in feeds.items()}


def _fixed_seq(model: ModelInfo) -> int | None:
    for t in model.inputs:
        if len(t.dims) >= 2 and isinstance(t.dims[1], int):
            return t.dims[1]
    return None


# -- checks --------------------------------------------------------------------------------


def _without_padding_past(longest: int, feeds: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``feeds`` cut to the model's ``longest`` sequence where the columns past it are
    padding in every row (their attention_mask 0): arrays padded to a tokenizer's 512 for a
    model of 128. A row with real tokens past it is left for the length check to refuse."""
    mask = feeds.get("attention_mask")
    if mask is None or not longest:
        return feeds
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[1] <= longest or np.any(mask[:, longest:]):
        return feeds
    width = mask.shape[1]
    log.debug("%s: padded to %d, past the model's %d: padding cut", where, width, longest)
    return {
        k: v[:, :longest] if np.ndim(v) >= 2 and np.shape(v)[1] == width else v
        for k, v in ((k, np.asarray(v)) for k, v in feeds.items())
    }


def _cut_as(labels: Any, given: Mapping[str, Any], feeds: Feeds, model: ModelInfo) -> Any:
    """A token classifier's ``labels``, as wide as the ``given`` arrays, cut as
    ``check_feeds`` cut their padding past the model's longest sequence (``feeds``): the
    positions cut are padding, whatever label they held."""
    name, rows = _token_rows(feeds, model)
    width = np.shape(given[name])[1] if name in given and np.ndim(given[name]) >= 2 else None
    if np.ndim(labels) == 2 and width is not None and np.shape(labels)[1] == width > rows.shape[1]:
        return np.asarray(labels)[:, : rows.shape[1]]
    return labels


def check_feeds(feeds: Mapping[str, np.ndarray], model: ModelInfo, where: str) -> Feeds:
    """Names, then ranks and batch sizes, then sequence limits, then the values of masks and
    token ids; one DataError listing all."""
    problems: list[str] = []
    made = set()  # inputs filled in here: what is wrong with them is their source's
    if TYPE_IDS in model.input_names and TYPE_IDS not in feeds and "input_ids" in feeds:
        # one segment, as Hugging Face models default them (and as JSONL text and `quantgate
        # infer` fill them): a tokenizer asked for no token_type_ids gives an .npz without
        feeds = {**feeds, TYPE_IDS: np.zeros_like(np.asarray(feeds["input_ids"]))}
        made.add(TYPE_IDS)
    if TYPE_IDS in feeds and TYPE_IDS not in model.input_names and not np.any(feeds[TYPE_IDS]):
        # ...and the reverse: a tokenizer that always makes them (DeBERTa-v2's) for a model
        # without segments (type_vocab_size 0): all one segment, nothing to lose
        log.info("%s: dropped %s, all 0: the model takes none", where, TYPE_IDS)
        feeds = {k: v for k, v in feeds.items() if k != TYPE_IDS}
    feeds = _without_padding_past(model.max_seq_len, feeds, where)
    missing = [n for n in model.input_names if n not in feeds]
    extra = [n for n in feeds if n not in model.input_names and n != LABELS]
    if missing:
        hint = ""
        if "attention_mask" in missing and "input_ids" in feeds:  # not made up: it may pad
            pad = model.pad_values.get("input_ids")
            how = (
                f": (input_ids != {pad}).astype(np.int64), {pad} the pad id"
                if pad is not None
                else ""
            )
            hint = (
                " (attention_mask says which tokens are real, 1, and which are padding, 0; "
                f"quantgate does not guess it: save it beside input_ids{how}; all 1 where no "
                "row is padded)"
            )
        problems.append(f"missing input(s) {missing}{hint}")
    if extra:
        hint = f" (labels go in an array named {LABELS!r})" if "label" in extra else ""
        if TYPE_IDS in extra:
            hint += f" (the model has no {TYPE_IDS}, and these are not all 0: drop them)"
        problems.append(f"unknown input(s) {extra}{hint}")
    out: Feeds = {}
    batch = set()
    axes: dict[str, dict[str, int]] = {}  # a named axis past the batch: its size per input
    for spec in model.inputs:
        if spec.name not in feeds:
            continue
        # a problem of zeros made like input_ids is input_ids', said once, there
        said = problems if spec.name not in made else []
        a = np.asarray(feeds[spec.name])
        if a.ndim != len(spec.dims):
            said.append(
                f"{spec.name}: shape {tuple(a.shape)}, expected {len(spec.dims)} dimensions "
                f"({', '.join(map(str, spec.dims))})"
            )
            continue
        for d, (got, want) in enumerate(zip(a.shape, spec.dims, strict=True)):
            if isinstance(want, int) and got != want:
                said.append(f"{spec.name}: dimension {d} is {got}, expected {want}")
            elif isinstance(want, str) and d > 0:
                axes.setdefault(want, {})[spec.name] = got
        if a.ndim >= 2 and model.max_seq_len and a.shape[1] > model.max_seq_len:
            said.append(
                f"{spec.name}: sequence length {a.shape[1]} exceeds the model's maximum "
                f"{model.max_seq_len}; truncate the rows"
            )
        want_dtype = np.dtype(spec.dtype)
        if a.dtype != want_dtype:
            if not np.can_cast(a.dtype, want_dtype, casting="same_kind"):
                cast = (
                    f" (whole numbers stored as floats? save {spec.name}.astype(np.{want_dtype}))"
                    if a.dtype.kind == "f" and want_dtype.kind in "iu"
                    else ""
                )
                said.append(f"{spec.name}: dtype {a.dtype}, expected {want_dtype}{cast}")
                continue
            a = a.astype(want_dtype)
        said.extend(_value_problems(spec.name, a, model))
        batch.add(a.shape[0])
        out[spec.name] = a
    if len(batch) > 1:
        problems.append(f"inputs disagree on the number of rows: {sorted(batch)}")
    for axis, sizes in axes.items():
        # input_ids (4, 8) beside an attention_mask (4, 5) ran on 5 tokens of each row
        if len(set(sizes.values())) > 1:
            told = ", ".join(f"{name} {size}" for name, size in sizes.items())
            problems.append(
                f"inputs disagree on their {axis} axis: {told}; a row's inputs describe the "
                "same tokens: save them at one width"
            )
        elif 0 in sizes.values():
            problems.append(f"{', '.join(sizes)}: a {axis} axis of 0: a row needs a token")
    if problems:
        raise DataError(
            f"{where} does not fit the model (inputs: "
            + ", ".join(f"{t.name} {t.dtype} ({', '.join(map(str, t.dims))})" for t in model.inputs)
            + "):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return out


def _value_problems(
    name: str, a: np.ndarray, model: ModelInfo, indices: np.ndarray | None = None
) -> list[str]:
    """What the model would run on without complaint and answer with garbage: an attention
    mask that is not 0/1 or has no token in a row, an id outside its embedding table.
    ``indices``: each row's index where it was read from (``Batch.rows``), for messages."""
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
        empty = ~np.any(rows, axis=1)
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
    outside = rows < 0
    if limit:
        outside |= rows >= limit
    bad = np.any(outside, axis=1)  # (N,)
    if not bad.any():
        return []
    expected = f"ids 0..{limit - 1} (its embedding table has {limit} rows)" if limit else "ids >= 0"
    fix = (
        "The model has one token type: it reads no second segment, so give single texts, "
        'not pairs ("text_pair")'
        if name == TYPE_IDS and limit == 1
        else "Tokenize with this model's own tokenizer"
    )
    return [
        f"{name}: expected {expected}, found {rows.min()}..{rows.max()}, out of range in "
        f"{describe_rows(bad, indices)}. {fix}."
    ]


def check_same_texts(
    ev: DataSource, calibrated: DataSource | Mapping[str, Any] | None, where: str, other: str
) -> None:
    """Refuse evaluation text of the other form than the calibration text (``calibrated``:
    its source, or the manifest's record of it): pairs (a cross-encoder's query and passage)
    against single texts, or the reverse. The gates would judge inputs the model is never
    served, or the calibration ranges would come from them. Arrays say no form: not
    compared."""

    def pairs(kind: Any, flag: Any) -> bool | None:
        return bool(flag) if kind in TEXT_KINDS else None

    ours = pairs(ev.kind, ev.text_pairs)
    if isinstance(calibrated, DataSource):
        theirs = pairs(calibrated.kind, calibrated.text_pairs)
    else:
        record = calibrated or {}
        theirs = pairs(record.get("kind"), record.get("text_pairs"))
    if ours is None or theirs is None or ours == theirs:
        return
    said = {True: 'text pairs (a "text_pair" beside each "text")', False: "single texts"}
    before = (
        ' (a bundle exported before quantgate read "text_pair" was calibrated on each row\'s '
        '"text" alone, a "text_pair" key ignored: re-export it to calibrate on the pairs)'
        if ours and not isinstance(calibrated, DataSource)
        else ""
    )
    raise DataError(
        f"{where}: {said[ours]}, but {other} held {said[theirs]}{before}: the gates would "
        "judge the model on inputs of another form than the one it is calibrated on and served "
        "with. "
        f"Give both as {said[theirs]}" + ("" if theirs else ", or calibrate on pairs")
    )


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
            for p in _value_problems(name, a, model, batch.rows)
        ]
        if problems:
            said = (
                f", in its batch {n} (row indices within the batch)"
                if batch.rows is None
                else " (row indices as in its arrays, from 0)"
            )
            raise DataError(
                f"{where} does not fit the exported model{said}: " + "; ".join(problems)
            )


# -- sources -------------------------------------------------------------------------------


def _builtin(model: ModelInfo, role: Role, samples: int | None, batch_size: int) -> DataSource:
    from quantgate.model.data import load_digits_splits

    name = "calibration" if role is Role.CALIBRATION else "test"
    split = load_digits_splits()[name]
    feeds = check_feeds(split.feeds(), model, f"the digits {name} split")
    labels = split.labels
    lengths = _real_tokens(feeds, model).sum(1)
    keep = stratified(lengths, samples)
    h = hashlib.sha256(b"digits:" + name.encode())
    for k in sorted(feeds):
        h.update(np.ascontiguousarray(feeds[k][keep]).tobytes())
    h.update(np.ascontiguousarray(labels[keep]).tobytes())

    def batches() -> Iterator[Batch]:
        for idx in chunks(keep, batch_size):
            yield Batch({k: v[idx] for k, v in feeds.items()}, labels[idx], idx)

    return DataSource(
        description=f"built-in digits {name} split ({len(keep)} of {len(labels)} images)",
        kind="builtin",
        samples=len(keep),
        has_labels=True,
        sha256=h.hexdigest(),
        _batches=batches,
        lengths=(int(lengths[keep].min()), int(lengths[keep].max())),
        total=len(labels),
        row_hashes=row_hashes({k: v[keep] for k, v in feeds.items()}, model),
    )


def _npz(path: Path, model: ModelInfo, samples: int | None, batch_size: int, flag: str):
    expected = "expected what np.savez writes: one array per model input (and labels)"
    if path.stat().st_size and not zipfile.is_zipfile(path):  # numpy calls it pickled data
        raise DataError(
            f"{flag} {path}: not a .npz file (no zip archive's directory at its end: not a "
            f"zip, or cut short); {expected}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # EOFError: 0 bytes
        raise DataError(
            f"{flag} {path}: not a readable .npz file ({type(e).__name__}: {e}); {expected}"
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
    # labels as given, to check_labels: a list mixing indices and names made one array of
    # strings, its indices then read as names (1 as the class named "1", which is index 0)
    arrays = {
        k: v if k == LABELS and isinstance(v, (list, tuple)) else _array(k, v)
        for k, v in arrays.items()
    }
    h = hashlib.sha256(b"arrays")
    for k in sorted(arrays):
        if isinstance(arrays[k], (list, tuple)):  # the labels, as given
            h.update(f"{k}:{arrays[k]!r}".encode())
            continue
        h.update(f"{k}:{arrays[k].dtype.str}:{arrays[k].shape}".encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return _whole(
        lambda: arrays, list(arrays), model, samples, batch_size, "data", h.hexdigest(),
        kind="arrays", name="a dict",
    )  # fmt: skip


def _array(name: str, value: Any) -> np.ndarray:
    """A dict's value as one array; DataError for rows of different lengths (Python lists
    of token ids as a tokenizer gives them unpadded), which numpy cannot stack."""
    try:
        return np.asarray(value)
    except ValueError:  # numpy: "inhomogeneous shape"
        raise DataError(
            f"the data's {name!r}: its rows are of different lengths, which make no array. "
            "Pad them to one length, with an attention_mask of 0 there (a tokenizer's "
            "padding=True, return_tensors='np')"
        ) from None


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

    tokens = model.reads_token_labels  # labels (rows, sequence): a tag per token
    reads = model.reads_row_labels or tokens

    def read() -> tuple[Feeds, np.ndarray | None]:
        arrays = dict(load())
        labels = arrays.pop(LABELS, None)
        if not reads:  # an embedding model's: open_source warns that they are ignored
            labels = None
        feeds = check_feeds(arrays, model, where)
        n = len(next(iter(feeds.values())))
        if labels is not None and tokens:
            shape = _token_rows(feeds, model)[1].shape
            labels = _cut_as(labels, arrays, feeds, model)
            labels = check_token_labels(labels, shape, model.labels, where)
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
    _warn_padding(Batch(feeds, None), model, where=where)
    del feeds, labels  # not held between passes: each pass reads the arrays again, whole
    h = hashlib.sha256(digest.encode())
    h.update(keep.tobytes())

    def batches() -> Iterator[Batch]:
        feeds, labels = read()
        for idx in chunks(keep, batch_size):
            b = _trim({k: v[idx] for k, v in feeds.items()}, model)
            tags = None if labels is None else labels[idx]
            if tokens and tags is not None:  # a tag per token: cut with the batch's padding
                tags = tags[:, : _token_rows(b, model)[1].shape[1]]
            yield Batch(b, tags, idx)

    return DataSource(
        description=f"{name}: {len(keep)}{'' if len(keep) == n else f' of {n}'} rows ({kind})",
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


def _hf_config(directory: str) -> dict[str, Any]:
    """The config.json beside a Hugging Face tokenizer, or {} (a tokenizer saved alone)."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _iterable(spec, model: ModelInfo, samples: int | None, batch_size: int) -> DataSource:
    """A Python iterable (or a callable returning one) of feed dicts, each a batch."""
    make = spec if callable(spec) else None
    if make is None:
        it = spec
        if iter(it) is it:  # a one-shot iterator: kept in memory so it can be re-read
            it = list(it)
        make = lambda: it  # noqa: E731

    tokens = model.reads_token_labels  # labels (rows, sequence): a tag per token
    reads = model.reads_row_labels or tokens
    ignored = [False]  # an item had labels, which an embedding model does not read

    def items() -> Iterator[tuple[int, Feeds, Any, np.ndarray | None]]:
        """Each item, checked: its index, its feeds, its labels as given and as indices."""
        for i, feeds in enumerate(make()):
            where = f"data item {i}"
            if not isinstance(feeds, Mapping):
                raise DataError(f"{where} is a {type(feeds).__name__}; expected a dict of arrays")
            f = check_feeds(feeds, model, where)
            n = len(next(iter(f.values())))
            if n == 0:
                raise DataError(f"{where} has no rows")
            given = feeds.get(LABELS) if reads else None  # else not read
            ignored[0] = ignored[0] or (LABELS in feeds and not reads)
            if given is None:
                labels = None
            elif tokens:
                labels = check_token_labels(
                    _cut_as(given, feeds, f, model), _token_rows(f, model)[1].shape,
                    model.labels, where,
                )  # fmt: skip
            else:  # class names become indices
                labels = check_labels(given, n, model.labels, where)
            yield i, f, given, labels

    rows, labelled, h = 0, None, hashlib.sha256(b"iterable")
    lengths = []  # the real lengths of the rows used, item by item
    hashes = []  # and their row_hashes
    forms: dict[str, str] = {}  # "indices"/"names": the first item with labels in that form
    for i, f, given, labels in items():
        if i == 0:  # JSONL is tokenized right-padded, the built-in split has no padding
            _warn_padding(Batch(f, None), model, where="the data iterable")
        if given is not None and not tokens:
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
        lengths.append(_real_tokens(used, model).sum(1))
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
        for i, f, _, labels in items():
            take = min(left, len(next(iter(f.values()))))
            # every pass must yield the first pass's rows, in its order: FP32's outputs and a
            # candidate's are compared row by row, and the calibration rows left out of the
            # gates are known by their place (a shuffling DataLoader mixed them up silently)
            if i >= len(hashes) or not np.array_equal(
                row_hashes({k: v[:take] for k, v in f.items()}, model), hashes[i][:take]
            ):
                raise DataError(
                    f"data item {i} holds other rows than when the data was first read: "
                    "quantgate reads the data once for each model it gates, and compares them "
                    "row by row. Pass rows that come in the same order every time (a list, "
                    "or a DataLoader with shuffle=False)"
                )
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
        lengths=(int(min(map(np.min, lengths))), int(max(map(np.max, lengths)))),
        total=None if samples is not None and rows >= samples else rows,  # else not read to the end
        row_hashes=np.concatenate(hashes),
        labels_ignored=ignored[0],
    )


class Counted:
    """``source`` as a calibration callable that reports rows as they are handed over (a
    reader that stops at the end of its range never asks past the last batch: counted after
    it, that batch went unreported, and a bar stopped at 192 of 200). ``uncounted`` is the
    source itself, for a pass that calibrates nothing (ORT's reader counts its feeds first:
    reported, the bar ran to the end and began again)."""

    def __init__(self, source: DataSource, on_rows: Callable[[int], None]) -> None:
        self.uncounted = source
        self._on_rows = on_rows

    def __call__(self) -> Iterator[Feeds]:
        done = 0
        for feeds in self.uncounted():
            done += len(next(iter(feeds.values())))
            self._on_rows(done)
            yield feeds


def write_npz(
    path: str | Path, feeds: Mapping[str, np.ndarray], labels: Sequence[int | str] | None = None
):
    """Write feeds (and labels: class indices, or class names) as an .npz that
    ``--calibration``/``--eval`` accept; the reader checks the labels (cast to int64 here,
    names failed with a traceback and 1.7 was written as 1)."""
    arrays = dict(feeds)
    if labels is not None:
        arrays[LABELS] = np.asarray(labels)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # (numpy: a name could be allow_pickle)
    return Path(path)


__all__ = [
    "Batch",
    "DataSource",
    "ModelInfo",
    "check_feeds",
    "check_ids",
    "whole_row_hashes",
    "without_rows",
    "check_not_calibration",
    "check_path",
    "Counted",
    "open_source",
    "row_hashes",
    "stratified",
    "with_graph_tables",
    "write_npz",
]
