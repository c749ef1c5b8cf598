"""The accuracy gates: is a candidate still as accurate as FP32? (Is it faster: ``speed``.)

Accuracy, with labels (a classifier and a labelled evaluation set): the task metric, top-1
accuracy, of FP32 and of the candidate on the same rows; the gate is the drop in points.
Its confidence interval is *paired* (``paired_interval``, Tango's score interval for paired
proportions): it reflects the rows on which the two models disagree, not the difficulty of
the test set, and unlike a bootstrap of the rows it does not shrink to a point when few or
no rows flip, where INT8 lives.

Which gates a model gets is its ``Kind`` (a classifier, a multi-label or a token classifier,
a question answerer, an embedding, or none of these), read once from FP32's outputs and the
task together with the output its gates judge (``kind_of``); each kind's gates are in
``_KIND_GATES``.

Without labels: fidelity against FP32 on the evaluation rows.

- classifiers (``(batch, classes)`` logits): top-1 agreement and mean KL(FP32 || candidate)
  of the softmax distributions; a single logit (``(batch, 1)``: a reranker, a regression
  head), its R² against FP32 (``r2_gate``);
- token classifiers (``(batch, sequence, classes)``; a single logit per token read as
  [0, logit], a binary tag): top-1 agreement and KL per real token, pooled over the
  tokens, with intervals over rows (``_token_fidelity``);
- multi-label classifiers: agreement with FP32's decisions, each label on or off
  (``_decision_agreement``);
- question answerers (``start_logits`` and ``end_logits``, ``(batch, sequence)``): the
  share of rows whose answer span is FP32's (``_span_agreement``);
- embeddings (``sentence_embedding``, or ``last_hidden_state`` mean-pooled over real
  tokens): mean cosine per row, the share of rows under ``tail_cosine`` (``decide.tail_gate``),
  and top-1 nearest-neighbour agreement: for every row, its nearest other row by cosine
  among the evaluation rows, under FP32 and under the candidate;
- anything else: for each output, the cosine of every row (a batch item, flattened over its
  real tokens) with FP32, averaged over rows, and its tail; R² where a row holds one value;
  max and mean abs error in the detail (``fidelity.Fidelity``, whose gates the FP16
  variant's are too).

The server serves every output, so every float output those gates do not compare as served
gets that ``cosine:<output>`` gate as well, at the same ``min_cosine``: an embedding model's
``last_hidden_state`` next to its ``sentence_embedding`` (or next to its own mean-pooled
rows), a classifier's other float outputs next to its logits.

Each of these is a mean over rows, with an interval over rows: Wilson's score interval for
a share of agreeing rows (``wilson``; at 400 rows, one row is 0.25 points of agreement),
a bootstrap of the mean for cosine and KL (``bootstrap_mean``), of R² for R².

Each gate is decided by ``quantize/decide.py``'s rule (its point estimate by default); the
per-output fidelity (``cosine:<output>``, R²) is ``quantize/fidelity.py``'s; the intervals
are computed in ``quantize/stats.py``; the speed gates are ``quantize/speed.py``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np

from quantgate.bundle import CPU, GateResult
from quantgate.errors import DataError, QuantgateError, QuantizeFailed
from quantgate.padding import right_pad
from quantgate.quantize.data import TYPE_IDS, DataSource
from quantgate.quantize.decide import GateConfig, decide, interval_gate, mean_gate, tail_gate
from quantgate.quantize.fidelity import Fidelity, mask_fits, r2_gate, row_cosine
from quantgate.quantize.labels import NO_LABEL, index_count, one_based_hint
from quantgate.quantize.stats import (
    DESIGN_ROWS,
    clustered_paired_interval,
    clustered_share_interval,
    paired_interval,
    percentile_interval,
    resamples,
    wilson,
)
from quantgate.sessions import session
from quantgate.spans import best_spans, null_scores, pair_spans, span_scores, unreadable
from quantgate.tasks import (
    CLASSIFIER_TASKS,
    EMBEDDING_TASKS,
    MULTI_LABEL_TASKS,
    QA_OUTPUTS,
    QA_TASKS,
    TOKEN_TASKS,
)

log = logging.getLogger(__name__)

NN_BLOCK = 1 << 22  # cosine similarities held at once for nearest neighbours (32 MB)
# Fewest evaluation rows for the accuracy and agreement gates (top-1, decisions, answer spans,
# nearest neighbours): below it one row is over 3 points of accuracy, and with 2 rows each
# row's nearest is always the other.
MIN_EVAL_ROWS = 30


# -- running models ------------------------------------------------------------------------


@dataclass
class Outputs:
    """A model's outputs over an evaluation source, batch by batch (what gates compare)."""

    names: list[str]
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    labels: np.ndarray | None = None
    rows: int = 0
    # each batch's token_type_ids, where the model takes them, and a question answerer's
    # context tokens, where its tokenizer told them (``Batch.context``): where its answers
    # may be (``_answer_tokens``); empty: none kept
    segments: list[np.ndarray | None] = field(default_factory=list)
    contexts: list[np.ndarray | None] = field(default_factory=list)
    # each batch's ``Batch.windows``: a question answerer's pairs read in windows, a row each
    windows: list[np.ndarray | None] = field(default_factory=list)
    # each batch's ``Batch.rows``: its rows' indices in the arrays they were read from, where
    # known (for messages: the gates' order is by length)
    indices: list[np.ndarray | None] = field(default_factory=list)
    # the outputs whose graph declares their second axis an input's sequence axis (the same
    # symbolic dimension): values per token
    along_sequence: frozenset[str] = frozenset()

    def stacked(self, name: str) -> np.ndarray:
        return np.concatenate([b[name] for b in self.batches])


def collect(
    model: str | Path, data: DataSource, *, provider: str = CPU, threads: int = 0
) -> Outputs:
    """Run ``model`` over every batch of ``data``; keep its outputs (the integer ones too:
    ``_integer_agreement`` gates a predicted class on agreement) and the labels.

    A batch ONNX Runtime refuses as an invalid argument is a DataError (the data does not fit
    the model); any other failure of the run (out of memory, a kernel's error), or of
    opening the session, is the runtime's, a QuantizeFailed naming the provider (exit 1)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    try:
        sess = session(model, provider, threads=threads)
    except QuantgateError:  # a provider not available, a bad thread setting: said already
        raise
    except Exception as e:  # noqa: BLE001 - ORT's failures are its own exception types
        raise QuantizeFailed(
            f"ONNX Runtime cannot open {Path(model).name} on {provider}: {type(e).__name__}: {e}"
        ) from e
    names = [o.name for o in sess.get_outputs()]
    out = Outputs(names, along_sequence=_along_sequence(sess))
    labels = []
    for batch in data.batches():
        try:
            values = sess.run(names, batch.feeds)
        except InvalidArgument as e:  # feeds the model refuses, though they passed check_feeds
            raise DataError(
                f"{Path(model).name} failed on a batch of {data.description}: {e}"
            ) from e
        except Exception as e:  # noqa: BLE001 - ORT's failures are its own exception types
            raise QuantizeFailed(
                f"ONNX Runtime failed running {Path(model).name} on {provider} (a batch of "
                f"{data.description}): {e}"
            ) from e
        out.batches.append({n: np.asarray(v) for n, v in zip(names, values, strict=True)})
        out.masks.append(batch.feeds.get("attention_mask"))
        out.segments.append(batch.feeds.get(TYPE_IDS))
        out.contexts.append(batch.context)
        out.windows.append(batch.windows)
        out.indices.append(batch.rows)
        if batch.labels is not None:
            labels.append(batch.labels)
        out.rows += len(values[0])
    if not out.rows:
        raise DataError(f"{data.description} yielded no rows to evaluate")
    if labels and data.has_labels and labels[0].ndim == 2:  # per token: batches differ in width
        width = max(lab.shape[1] for lab in labels)
        labels = [np.pad(lab, ((0, 0), (0, width - lab.shape[1])), constant_values=NO_LABEL)
                  for lab in labels]  # fmt: skip
    out.labels = np.concatenate(labels) if labels and data.has_labels else None
    return out


def _along_sequence(sess) -> frozenset[str]:
    """The outputs of ``sess`` whose second axis is, by name, an input's second (symbolic)
    axis: the sequence's."""
    axes = {
        i.shape[1] for i in sess.get_inputs() if len(i.shape) >= 2 and isinstance(i.shape[1], str)
    }
    return frozenset(o.name for o in sess.get_outputs() if len(o.shape) >= 2 and o.shape[1] in axes)


# -- accuracy ------------------------------------------------------------------------------


class Kind(Enum):
    """What the gates take a model for, which decides the gates it gets (``_KIND_GATES``)."""

    CLASSIFIER = "classifier"  # (batch, classes) logits, or one score per row (batch, 1)
    MULTI_LABEL = "multi-label classifier"  # (batch, labels) scores, each label on or off
    TOKEN_CLASSIFIER = "token classifier"  # (batch, sequence, classes) logits
    QUESTION_ANSWERER = "question answerer"  # start_logits and end_logits (batch, sequence)
    EMBEDDING = "embedding"  # sentence_embedding, or last_hidden_state mean-pooled
    OTHER = "other"  # none of these: every float output on its cosine to FP32


@dataclass(frozen=True)
class Judged:
    """A model's kind and the output its kind's gates judge (``kind_of``)."""

    kind: Kind
    output: str | None  # None for OTHER alone

    def __post_init__(self):
        assert (self.output is None) == (self.kind is Kind.OTHER), self


def kind_of(reference: Outputs, task: str) -> Judged:
    """The model's kind, read once from FP32's outputs and its task, with the output judged:
    the first kind of ``_KINDS`` that finds its output, else OTHER."""
    for kind, find in _KINDS:
        if (output := find(reference, task)) is not None:
            return Judged(kind, output)
    return Judged(Kind.OTHER, None)


def accuracy_gates(
    reference: Outputs, candidate: Outputs, task: str, cfg: GateConfig, *, label: str = "INT8"
) -> list[GateResult]:
    """The gates of the model's kind (``kind_of``, ``_KIND_GATES``): its accuracy with
    labels, else its fidelity to FP32; and a ``cosine:<output>`` gate for every other float
    output (``_unjudged``): the server serves them all. ``reference`` has passed
    ``check_evaluation`` (the caller's, once)."""
    if reference.rows != candidate.rows:
        raise DataError(f"FP32 saw {reference.rows} rows, the candidate {candidate.rows}")
    judged = kind_of(reference, task)
    gates: list[GateResult] = []  # OTHER judges no output: every output on its cosine
    if judged.output is not None:
        gates = _KIND_GATES[judged.kind](reference, candidate, judged.output, cfg, label)
    others = _unjudged(reference, judged)
    gates += [_integer_agreement(reference, candidate, n, cfg) for n in _integers(reference)]
    if others:
        # The embedding's threshold, cfg.min_cosine, for token states too (the INT8 gates on
        # CUDA already hold them to it). Measured on all-MiniLM-L6-v2, 200 pydoc sentences,
        # every recipe the search tries (0-12 nodes kept FP32): last_hidden_state over each
        # row's real tokens is a little noisier than the pooled sentence_embedding (1 -
        # cosine about 1.5x): 0.9972-0.9985 against 0.9982-0.9990 for the smoothed static
        # recipes the search ships, which clear 0.99 with room. It is below 0.99
        # (0.9896-0.9899) only for static-u8s8 and dynamic INT8 without FP32 nodes, whose
        # nearest-neighbour agreement (0.815-0.835) fails them anyway. So 0.99 fails no
        # candidate the sentence_embedding gates pass; no looser bound of its own is needed.
        batches = zip(reference.batches, candidate.batches, reference.masks, strict=True)
        fidelity = Fidelity.measure(batches, others)  # start and end scores: per real token
        gates += fidelity.gates(min_cosine=cfg.min_cosine, cfg=cfg)
    return gates


def _classifier_gates(
    ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, label: str
) -> list[GateResult]:
    """With labels, the accuracy drop; and agreement with FP32 where the labels cannot tell
    enough (``labels_at_chance``) or a single score's value matters beyond its sign. Without
    labels, agreement with FP32 alone (``_classifier_fidelity``)."""
    if ref.labels is None:
        return _classifier_fidelity(ref, cand, output, cfg)
    gates = [_accuracy_drop(ref, cand, output, cfg, label)]
    if ref.batches[0][output].shape[-1] == 1:  # a score's value, beyond its sign
        gates += _classifier_fidelity(ref, cand, output, cfg)
    elif (why := labels_at_chance(ref, output)) is not None:  # a blind accuracy gate
        gates += _classifier_fidelity(ref, cand, output, cfg, labels_say=why)
    return gates


def _token_classifier_gates(
    ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, label: str
) -> list[GateResult]:
    """With token labels, the accuracy drop over the labelled tokens, and agreement with
    FP32 where the labels cannot tell enough (``token_labels_at_chance``); without,
    agreement with FP32 on every real token (``_token_fidelity``)."""
    if ref.labels is None:
        return _token_fidelity(ref, cand, output, cfg)
    gates = [_token_accuracy_drop(ref, cand, output, cfg, label)]
    if (why := token_labels_at_chance(ref, output)) is not None:  # a blind accuracy gate
        gates += _token_fidelity(ref, cand, output, cfg, labels_say=why)
    return gates


def _integers(ref: Outputs) -> list[str]:
    """The integer (and bool) outputs: a predicted class, ids."""
    first = ref.batches[0]
    return [
        n for n in ref.names if np.issubdtype(first[n].dtype, np.integer) or first[n].dtype == bool
    ]


def _integer_agreement(ref: Outputs, cand: Outputs, name: str, cfg: GateConfig) -> GateResult:
    """``agreement:<name>``: the share of rows whose integer output (a predicted class, ids)
    the candidate gives exactly as FP32 does, with Wilson's interval, at least
    ``min_top1_agreement``. A cosine or an R² of class indices would say how far 3 is from 7,
    which means nothing. A per-token output (``_integer_tokens``) is compared at the row's
    real tokens only: what a model makes of padding is no answer."""
    rows = []
    tokens = _integer_tokens(ref, name)
    for a, b, mask in zip(ref.batches, cand.batches, ref.masks, strict=True):
        x, y = a[name], b[name]
        alike = x == y
        if tokens and mask is not None:
            pad = ~mask.astype(bool)
            alike |= pad.reshape(pad.shape + (1,) * (x.ndim - 2))
        rows.append(alike.reshape(len(x), -1).all(axis=1))
    same = np.concatenate(rows)
    share = float(same.mean())
    ci = wilson(float(same.sum()), len(same), cfg.confidence)
    detail = (
        f"vs FP32 on {len(same)} rows: rows whose {name} is exactly FP32's ({int(same.sum())}), "
        f"with Wilson's {cfg.confidence:.0%} interval"
    )
    return interval_gate(f"agreement:{name}", share, ci, cfg.min_top1_agreement, ">=", cfg, detail)


def _integer_tokens(ref: Outputs, name: str) -> bool:
    """Whether integer output ``name`` holds a value per token (a tagger's predicted tags):
    its second axis is the mask's sequence axis in every batch, and is so as a sequence
    axis, not by the chance of one width: the output has three dims or more (``mask_fits``),
    its graph says so (``Outputs.along_sequence``), or its width follows the batches'
    padded lengths where they differ. A (batch, k) output (top-k ids) whose k a batch's
    length happens to equal is a row's k values, every one compared."""
    shapes = [
        (a[name].shape, None if m is None else m.shape)
        for a, m in zip(ref.batches, ref.masks, strict=True)
    ]
    if any(m is None or len(x) < 2 or x[:2] != m for x, m in shapes):
        return False
    if len(shapes[0][0]) >= 3 or name in ref.along_sequence:
        return True
    return len({m[1] for _, m in shapes if m is not None}) > 1


def _unjudged(ref: Outputs, judged: Judged) -> list[str]:
    """The float outputs the gates of the model's kind do not compare as served, which get a
    cosine gate each: all but a classifier's logits, a token classifier's per-token logits
    and a 2-D embedding. A 3-D ``last_hidden_state`` judged mean-pooled is not what a client
    receives, so its tokens are gated too; a multi-label classifier's scores are, beside
    their decisions, and a question answerer's start and end scores beside its spans.
    Integer outputs (ids, a predicted class) have no cosine: their gate is agreement
    (``_integer_agreement``)."""
    served = None if judged.kind in (Kind.MULTI_LABEL, Kind.QUESTION_ANSWERER) else judged.output
    pooled = judged.kind is Kind.EMBEDDING
    first = ref.batches[0]
    return [
        n
        for n in ref.names
        if np.issubdtype(first[n].dtype, np.floating)
        and (n != served or (pooled and first[n].ndim > 2))
    ]


def _logits_output(ref: Outputs, task: str) -> str | None:
    """The classifier output the top-1 and accuracy gates judge: the one named "logits" where
    there is one (a model returning an embedding first would otherwise have it scored as
    logits), else a classifier's first 2-D float output. None for a multi-label classifier,
    whose scores are no softmax's (``_multi_label_scores``)."""
    if task in MULTI_LABEL_TASKS or (task not in CLASSIFIER_TASKS and "logits" not in ref.names):
        return None
    scores = _float_outputs(ref, ndim=2)
    if "logits" in ref.names:
        return "logits" if "logits" in scores else None
    return next(iter(scores), None)


def decision_cut(scores: np.ndarray) -> float:
    """Where a multi-label classifier's label turns on: a logit above 0, or a probability
    above 0.5 where its scores are all in [0, 1] (a forward that returns sigmoid's, whose
    every label would be on above 0)."""
    return 0.5 if bool(((scores >= 0) & (scores <= 1)).all()) else 0.0


def _multi_label_scores(ref: Outputs, task: str) -> str | None:
    """A multi-label classifier's (batch, labels) scores: its output named "logits", else
    its first such float output; None for other tasks."""
    if task not in MULTI_LABEL_TASKS:
        return None
    scores = _float_outputs(ref, ndim=2)
    return "logits" if "logits" in scores else next(iter(scores), None)


def _float_outputs(ref: Outputs, *, ndim: int) -> list[str]:
    """The float outputs of ``ndim`` dims, in output order: (batch, n) ones are shaped as
    class scores could be, (batch, sequence, n) as a token classifier's."""
    first = ref.batches[0]
    return [
        n for n in ref.names if first[n].ndim == ndim and np.issubdtype(first[n].dtype, np.floating)
    ]


def _token_logits(ref: Outputs, task: str) -> str | None:
    """A token classifier's per-token class scores: its (batch, sequence, classes) float
    output named "logits", else its first such output; None for other tasks."""
    if task not in TOKEN_TASKS:
        return None
    scores = _float_outputs(ref, ndim=3)
    return "logits" if "logits" in scores else next(iter(scores), None)


def _class_scores(out: Outputs, name: str) -> np.ndarray:
    """(N, classes) class scores of output ``name``, a single logit per row read as a
    binary classifier's (``_as_classes``)."""
    return _as_classes(out.stacked(name))


def _as_classes(x: np.ndarray) -> np.ndarray:
    """Class scores (..., classes); a single logit (..., 1) is a binary classifier's, read
    as [0, logit]: its top class is 1 where the logit is positive, and its softmax is the
    logit's sigmoid. Taken as one class, every row (every token of a tagger) would score
    class 0, and top-1 agreement 1.0 with a KL of 0 would pass any INT8."""
    return np.concatenate([np.zeros_like(x), x], axis=-1) if x.shape[-1] == 1 else x


def _answer_starts(ref: Outputs, task: str) -> str | None:
    """A question answerer's start scores, "start_logits", judged with its "end_logits":
    both (batch, sequence) float outputs by those names (Hugging Face's); None for other
    tasks, or where they are not so named."""
    first = ref.batches[0]
    found = all(
        n in ref.names and first[n].ndim == 2 and np.issubdtype(first[n].dtype, np.floating)
        for n in QA_OUTPUTS
    )
    return QA_OUTPUTS[0] if task in QA_TASKS and found else None


def _embedding_name(task: str, names) -> str | None:
    if "sentence_embedding" in names:
        return "sentence_embedding"
    if task in EMBEDDING_TASKS and "last_hidden_state" in names:
        return "last_hidden_state"
    return None


# The kinds that judge an output, in the order they are tried: an output named "logits" is
# a classifier's even where the task says tokens, and a multi-label classifier's scores come
# before an embedding's (a sentence_embedding is 2-D, as scores are).
_KINDS: tuple[tuple[Kind, Callable[[Outputs, str], str | None]], ...] = (
    (Kind.CLASSIFIER, _logits_output),
    (Kind.TOKEN_CLASSIFIER, _token_logits),
    (Kind.MULTI_LABEL, _multi_label_scores),
    (Kind.QUESTION_ANSWERER, _answer_starts),
    (Kind.EMBEDDING, lambda ref, task: _embedding_name(task, ref.names)),
)


def counts_rows(task: str, outputs: Iterable[str]) -> bool:
    """Whether a model with these outputs gets the accuracy, top-1 or nearest-neighbour
    gates, which need ``MIN_EVAL_ROWS`` rows; known from the names before the export
    (``check_evaluation`` decides on the outputs themselves)."""
    names = set(outputs)
    return (
        task in (*CLASSIFIER_TASKS, *TOKEN_TASKS, *MULTI_LABEL_TASKS)
        or (task in QA_TASKS and set(QA_OUTPUTS) <= names)
        or "logits" in names
        or _embedding_name(task, names) is not None
    )


def check_label_range(reference: Outputs, task: str) -> None:
    """Raise DataError unless every label is a class index of the output the model's kind
    judges (1-based labels would score a broken model and pass it): a classifier's row
    labels, a token classifier's token labels; the other kinds read none."""
    _check_labels(reference, kind_of(reference, task))


def _check_labels(reference: Outputs, judged: Judged) -> None:
    """``check_label_range`` for a model whose kind is known."""
    check = _LABEL_CHECKS.get(judged.kind)
    if reference.labels is not None and check is not None and judged.output is not None:
        check(reference.labels, judged.output, reference.batches[0][judged.output].shape[-1])


def _check_class_labels(labels: np.ndarray, output: str, scores: int) -> None:
    """A classifier's labels are class indices of its ``scores`` per row (a single score:
    classes 0 and 1), one per row: token labels (rows, sequence) are no row's class."""
    if labels.ndim != 1:
        raise DataError(
            f"labels of shape {labels.shape}: one per token, but {output} is a classifier's "
            f"(batch, classes) scores, one class per row. Give one label per row, or name the "
            f"token classifier's per-token output logits"
        )
    classes = index_count(scores)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        outside = labels[(labels < 0) | (labels >= classes)]
        values = ", ".join(map(str, sorted(set(outside.tolist()))[:8]))
        raise DataError(
            f"labels must be class indices 0..{classes - 1} ({output} has {classes} classes), "
            f"found labels {lo}..{hi}: {len(outside)} of {len(labels)} rows out of range "
            f"(label {values})."
            + (
                one_based_hint(lo, hi, classes)
                or " Is this the evaluation data of this model? Number its labels 0.."
                f"{classes - 1}, in the order of the model's classes."
            )
        )


def _check_token_labels(labels: np.ndarray, output: str, scores: int) -> None:
    """A token classifier's labels are class indices of its per-token scores (a single
    score: classes 0 and 1), or ``NO_LABEL``, and tag at least one token."""
    classes = index_count(scores)
    if labels.max() >= classes:
        raise DataError(
            f"token labels must be class indices 0..{classes - 1} ({output} has {classes} "
            f"classes) or {NO_LABEL}; found {int(labels.max())}"
        )
    if labels.max() < 0:
        raise DataError(f"the evaluation rows label no token ({NO_LABEL} everywhere)")


# The kinds whose gates read labels, each with how its labels are checked.
_LABEL_CHECKS: dict[Kind, Callable[[np.ndarray, str, int], None]] = {
    Kind.CLASSIFIER: _check_class_labels,
    Kind.TOKEN_CLASSIFIER: _check_token_labels,
}


# How sure the data must make it that FP32's answers follow the labels at all.
LABELS_MATCH_CONFIDENCE = 0.99


def labels_at_chance(reference: Outputs, logits: str) -> str | None:
    """Where FP32's own top classes agree with the labels no better than chance, or every
    row is labelled one class, why, in words; else None. Labels shuffled, numbered in
    another order than the model's classes, or a model not trained for them: the accuracy
    gate compares INT8 with FP32 on the labels, so on such labels it passes any INT8
    (random labels on the digits model put FP32 at 11.9%, and passed an INT8 broken to 9%).
    Labels of one class cannot tell an INT8 that answers it everywhere from FP32. Such rows
    are gated on agreement with FP32 as well. "Chance" is Cohen's kappa: the agreement
    beyond what the two class distributions give unrelated answers, whose one-sided lower
    bound must be above 0; a skewed set (98% one class) is judged by its few other rows,
    not by its accuracy."""
    assert reference.labels is not None
    y = reference.labels
    return _at_chance(_class_scores(reference, logits), y, len(y), "rows")


def token_labels_at_chance(reference: Outputs, logits: str) -> str | None:
    """``labels_at_chance`` for a token classifier, over its labelled real tokens: token
    labels numbered in another order than the model's tags (its label2id) left an INT8
    answering noise passing its accuracy gate. The kappa's bound counts the tokens as many
    as they are worth (``stats.effective_tokens``): a sentence's tokens move together."""
    scores, labels, hits, counts = [], [], [], []
    for xt, _, tags, per_row in _token_pairs(reference, reference, logits, labelled=True):
        assert tags is not None
        scores.append(xt)
        labels.append(tags)
        hits.append(per_row(_hits(xt, tags)))
        counts.append(per_row(np.ones(len(tags))))
    y = np.concatenate(labels)
    if not len(y):  # labels at padding only: the accuracy gate refuses them
        return None
    _, effective = clustered_share_interval(
        np.concatenate(hits), np.concatenate(counts), LABELS_MATCH_CONFIDENCE
    )
    return _at_chance(np.concatenate(scores), y, effective, "labelled tokens")


def _at_chance(x: np.ndarray, y: np.ndarray, effective: float, what: str) -> str | None:
    """``labels_at_chance``'s test of FP32's (N, classes) scores ``x`` against labels ``y``
    (N,), the N counting for ``effective`` independent ones; ``what`` names them."""
    n, classes = len(y), x.shape[-1]
    if one_class(y):  # nothing to tell FP32's answers from chance by, nor INT8's from a
        # constant answer: FP32 right on every row left an INT8 broken to one class passing
        return f"every one of the {n} {what} is labelled class {int(y[0])}"
    observed = float(_hits(x, y).mean())
    predicted = np.bincount(x.argmax(-1), minlength=classes) / n
    labelled = np.bincount(y, minlength=classes) / n
    chance = float(predicted @ labelled)
    kappa = (observed - chance) / (1 - chance)
    m = max(effective, 1.0)
    se = math.sqrt(max(observed * (1 - observed), 1 / m) / m) / (1 - chance)
    low = kappa - _Z_ONE_SIDED * se
    if low > 0:
        return None
    worth = "" if m == n else f" (worth {m:.0f} independent ones)"
    return (
        f"FP32's own top class is the label on {observed:.1%} of {n} {what}{worth}, against "
        f"{chance:.1%} for answers unrelated to the labels (Cohen's kappa {kappa:.3f}, its "
        f"{LABELS_MATCH_CONFIDENCE:.0%} lower bound {low:.3f}: no agreement beyond chance)"
    )


_Z_ONE_SIDED = 2.326  # the normal quantile of LABELS_MATCH_CONFIDENCE, one-sided


def one_class(labels: np.ndarray) -> bool:
    """Whether every row is labelled the same class."""
    return bool(len(labels)) and bool((labels == labels.flat[0]).all())


def _unscored_labels(reference: Outputs, task: str) -> None:
    """Labelled rows for a model no output of which is known to hold class scores. An
    embedding model is judged against FP32, and says so. A model of no known task with a
    (batch, n) float output is likely a classifier that did not say so: refused (a
    DataError), as its accuracy gate would silently give way to per-output cosines."""
    scores = _float_outputs(reference, ndim=2)
    if task in EMBEDDING_TASKS or not scores or _embedding_name(task, reference.names):
        log.warning(
            "labels ignored: the model (task %s) has no output of class scores; its INT8 is "
            "judged against FP32's outputs",
            task,
        )
        return
    raise DataError(
        f"the evaluation rows have labels, but the model's task is {task!r} and no output is "
        f"named 'logits', so none is known to hold class scores ({', '.join(map(repr, scores))} "
        "may): the accuracy gate would not run. Say the model is a classifier (a `task = "
        '"sequence-classification"` attribute on your module, or --task '
        "sequence-classification), or name its class-score output 'logits'. An embedding model "
        'says `task = "feature-extraction"`, and its labels are ignored. Or leave the labels '
        "out to gate on agreement with FP32 (the one way for a bundle already exported, "
        "short of exporting it again)."
    )


def unread_answer_rule(task: str, cfg: GateConfig) -> GateConfig:
    """``cfg``, where its model answers no questions, without the settings that say how a
    question answerer's answers are read (null_answer, max_answer_tokens): warned about, as
    they change nothing, and not recorded (each later re-gate would keep and warn again)."""
    names = ("null_answer", "max_answer_tokens")
    default = GateConfig()
    given = [f"{n} {getattr(cfg, n)}" for n in names if getattr(cfg, n) != getattr(default, n)]
    if not given or task in QA_TASKS:
        return cfg
    log.warning(
        "%s: how a question answerer's answers are read; this is a %s model, which has none: "
        "%s nothing",
        " and ".join(given),
        task,
        "they change" if len(given) > 1 else "it changes",
    )
    return replace(cfg, **{n: getattr(default, n) for n in names})


def _gated_rows(out: Outputs) -> int:
    """The rows a gate counts: a question answerer's pairs where its rows are their windows
    (``Outputs.windows``: the span gate reads one answer a pair), else the rows."""
    windows = [w[:, 0] for w in out.windows if w is not None]
    return len(np.unique(np.concatenate(windows))) if windows else out.rows


def check_evaluation(reference: Outputs, task: str) -> None:
    """Raise DataError unless the evaluation rows can decide the gates: labels that are class
    indices (``check_label_range``), at least ``MIN_EVAL_ROWS`` rows for the accuracy, top-1
    and nearest-neighbour gates (a handful of rows passes them by chance), and a classifier's
    labels FP32's answers follow better than chance (else a warning: ``labels_at_chance``)."""
    _check_fp32_answers(reference)
    judged = kind_of(reference, task)
    _check_labels(reference, judged)
    labelled = judged.kind in (Kind.CLASSIFIER, Kind.TOKEN_CLASSIFIER)  # gates read labels
    if reference.labels is not None and not labelled:
        _unscored_labels(reference, task)
    if judged.kind is Kind.OTHER:
        return  # per-output cosine: a measurement on any number of rows
    rows = _gated_rows(reference)
    if rows < MIN_EVAL_ROWS:
        measure = "accuracy" if judged.kind is Kind.CLASSIFIER else "agreement"
        what = "row(s)" if rows == reference.rows else "question/context pair(s), read in windows,"
        raise DataError(
            f"the evaluation data has {rows} {what}; the accuracy and agreement "
            f"gates (top-1, decisions, spans, nearest neighbours) need at least "
            f"{MIN_EVAL_ROWS} (here each is {100 / max(rows, 1):.3g} points of {measure})."
            " Pass --eval with more held-out rows "
            "(hundreds for a 1-point accuracy gate), or raise eval_samples (--gate-config)."
        )
    # An embedding's nearest neighbours are gated (a sentence_embedding beside another
    # kind's output gets its cosine alone: ``_unjudged``).
    if judged.kind is Kind.EMBEDDING and judged.output is not None:
        distinct = len(_distinct(_normalize(_pooled(reference, judged.output))))
        if distinct < MIN_EVAL_ROWS:
            raise DataError(
                f"the evaluation data has {reference.rows} rows but only {distinct} distinct "
                f"ones (FP32 answers the others alike: repeated texts); the nearest-neighbour "
                f"gate needs at least {MIN_EVAL_ROWS} distinct rows, as a row's copy is always "
                "its nearest. Pass --eval with more different held-out texts"
            )
    chance = _LABEL_CHANCE.get(judged.kind)
    if reference.labels is None or chance is None or judged.output is None:
        return
    if (why := chance(reference, judged.output)) is None:
        return
    unit = "row" if judged.kind is Kind.CLASSIFIER else "token"
    if one_class(reference.labels[reference.labels != NO_LABEL]):
        log.warning(
            "%s: labels of one class cannot tell an INT8 that answers it on every %s from "
            "FP32, so INT8 is gated on agreement with FP32 as well (as on unlabelled rows). "
            "Evaluate on rows of several classes",
            why,
            unit,
        )
    else:
        log.warning(
            "the labels do not follow the model's answers: %s. On them the accuracy gate "
            "would pass any INT8, so INT8 is gated on agreement with FP32 as well (as on "
            "unlabelled rows). Check that the labels are this data's (not shuffled) and "
            "numbered in the order of the model's classes (its config's id2label)",
            why,
        )


# The kinds whose accuracy gate reads labels, each with the test of whether FP32 follows
# them (``labels_at_chance``).
_LABEL_CHANCE: dict[Kind, Callable[[Outputs, str], str | None]] = {
    Kind.CLASSIFIER: labels_at_chance,
    Kind.TOKEN_CLASSIFIER: token_labels_at_chance,
}


def _check_fp32_answers(reference: Outputs) -> None:
    """Raise DataError where FP32 itself answers NaN or +infinity on an evaluation row (at
    a real token; -infinity is a masked score's, which the gates excuse where both models
    give it): no gate can compare a candidate with it there, and each would blame the
    candidate (an identical model failed with "rows with non-finite candidate scores")."""
    indices = reference.indices or [None] * len(reference.batches)
    for name in reference.names:
        rows, named, unknown = 0, [], False
        for batch, mask, index in zip(reference.batches, reference.masks, indices, strict=True):
            a = np.atleast_1d(batch[name])
            if a.dtype.kind != "f":
                continue
            bad = np.isnan(a) | np.isposinf(a)
            if mask is not None and _per_token(name, a, mask):  # padding: no gate reads it
                bad &= mask.astype(bool).reshape(mask.shape + (1,) * (a.ndim - 2))
            bad_rows = bad.reshape(len(a), -1).any(1)
            rows += int(bad_rows.sum())
            if index is None:
                unknown = True
            else:
                named.append(index[bad_rows])
        if rows:
            which = f"{rows} of {reference.rows} evaluation row(s)"
            if named and not unknown:  # read whole: rows a user can find
                found = np.sort(np.concatenate(named))
                which += (
                    f" (indices as in its arrays, from 0: {', '.join(map(str, found[:5]))}"
                    f"{f', ... {len(found) - 5} more' if len(found) > 5 else ''})"
                )
            raise DataError(
                f"FP32 itself answers NaN or infinity in {name!r} on {which}: no gate can "
                "compare a candidate with it there. Check the "
                "model on those inputs (an overflow, an input it was not made for), or leave "
                "them out of --eval"
            )


def _per_token(name: str, a: np.ndarray, mask: np.ndarray) -> bool:
    """Whether output ``a`` holds a value per token (hidden states, a tagger's logits, a
    question answerer's scores), not per row: a sentence embedding as wide as the batch is
    long is still one row's."""
    if a.ndim < 2 or a.shape[1] != mask.shape[1]:
        return False
    return a.ndim >= 3 or name in QA_OUTPUTS


def check_eval_rows(
    ev: DataSource,
    task: str,
    outputs: Sequence[str],
    eval_samples: int | None,
    *,
    where: str,
) -> None:
    """DataError where the accuracy, top-1 or nearest-neighbour gates would refuse ``ev`` for
    having fewer than ``MIN_EVAL_ROWS`` rows (``check_evaluation``): known when the data
    are opened, before minutes of export, and said with the advice that fits: a file too
    small, or an ``eval_samples`` cap too low. A model with neither a classifier's nor an
    embedding's outputs is gated on cosine alone, on any number of rows."""
    if not counts_rows(task, outputs):
        return
    if ev.pairs is not None:  # rows that are windows: the span gate counts their pairs
        if ev.pairs < MIN_EVAL_ROWS:
            raise DataError(
                f"{where} has {ev.pairs} question/context pair(s) (read as {ev.samples} "
                f"windows); the span gate reads one answer a pair and needs at least "
                f"{MIN_EVAL_ROWS} pairs (with {ev.pairs}, each pair is "
                f"{100 / max(ev.pairs, 1):.3g} points of agreement). Pass more held-out pairs"
                + (", or raise eval_samples (--gate-config)" if eval_samples is not None else "")
            )
        return
    if ev.samples >= MIN_EVAL_ROWS:
        return
    # a classifier's rows are points of accuracy; an embedding's, of its neighbours' agreement
    measure = "accuracy" if task in CLASSIFIER_TASKS else "agreement"
    need = (
        f"the accuracy and agreement gates (top-1, decisions, spans, nearest neighbours) need "
        f"at least {MIN_EVAL_ROWS} evaluation rows (with {ev.samples}, each row is "
        f"{100 / ev.samples:.3g} points of "
        f"{measure})"
    )
    left = [
        f"{n} {what}"
        for n, what in ((ev.repeated, "repeated"), (ev.in_calibration, "calibration"))
        if n
    ]
    # rows that are no evidence (heldout): the rows to gate are fewer than the file's
    dropped = f" once {' and '.join(left)} rows were left out" if left else ""
    capped = eval_samples is not None and ev.capped
    if capped and not left and (ev.total is None or ev.total >= MIN_EVAL_ROWS):
        of = f" of its {ev.total}" if ev.total is not None else ""
        raise DataError(
            f"eval_samples {eval_samples} (--gate-config) keeps {ev.samples}{of} rows of {where}; "
            f"{need}. Raise eval_samples to {MIN_EVAL_ROWS} or more, or leave it out to use "
            "every row."
        )
    if left and capped:  # the cap, or the file: which rows the cap left are not known
        raise DataError(
            f"eval_samples {eval_samples} (--gate-config) keeps {eval_samples} rows of {where}, "
            f"{ev.samples}{dropped}; {need}. Raise eval_samples, or leave it out to use every "
            "row, where the file holds more; else pass more held-out rows."
        )
    if left:
        rows, kept = ev.samples, dropped
    else:
        rows = ev.total if ev.total is not None else ev.samples
        kept = f" (eval_samples {eval_samples} keeps {ev.samples})" if capped else ""
    raise DataError(
        f"{where} has {rows} row(s){kept}; {need}. Pass more held-out rows (hundreds for a "
        "1-point accuracy gate)."
    )


def _accuracy_drop(ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, label: str):
    y = ref.labels
    assert y is not None  # gated on labelled rows only
    x, z = _class_scores(ref, output), _class_scores(cand, output)
    broken = _broken(x, z)  # (N,) NaN/inf logits: argmax would pick a class anyway
    a = _hits(x, y)
    b = _hits(z, y) & ~broken
    drop, ci = paired_interval(a, b, cfg.confidence)
    passed, rule = decide(
        drop, ci, cfg.max_accuracy_drop, "<=",
        rule=cfg.ci_rule, confidence=cfg.confidence, valid=not broken.any(),
    )  # fmt: skip
    flips = int((a & ~b).sum()), int((~a & b).sum())
    return GateResult(
        name="accuracy_drop",
        value=drop,
        threshold=cfg.max_accuracy_drop,
        op="<=",
        passed=passed,
        ci=ci,
        detail=(
            f"top-1 accuracy FP32 {a.mean():.2%} -> {label} {b.mean():.2%} on {len(y)} labelled "
            f"rows; {flips[0]} row(s) newly wrong, {flips[1]} newly right; drop in points with a "
            f"{cfg.confidence:.0%} paired score interval (Tango)"
            + rule
            + (
                f"; {int(broken.sum())} rows with non-finite {label} logits (counted wrong; "
                "any fails the gate)"
                if broken.any()
                else ""
            )
        ),
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64: no probability is clamped, so a class the
    candidate gives e^-100 costs its full KL."""
    with np.errstate(invalid="ignore"):  # a +inf score: NaN, which fails the gate
        z = x.astype(np.float64) - x.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _top(logits: np.ndarray) -> np.ndarray:
    """(N, classes): which classes hold each row's highest score. argmax alone would credit a
    flattened (saturated) row with the lowest of its tied classes: a free hit whenever that
    is the right one."""
    return logits == logits.max(-1, keepdims=True)


def _hits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) rows whose top class is the label, alone: a tie with another class is no hit."""
    top = _top(logits)
    return top[np.arange(len(labels)), labels] & (top.sum(-1) == 1)


def _same_top(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) rows whose top classes agree: the same class, or the same tied classes. A row of
    ``y`` with a NaN has no top class, and agrees with nothing; a class masked at -inf is
    just never the top."""
    top_y = _top(y)
    return (_top(x) == top_y).all(-1) & top_y.any(-1)


def _broken(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) rows where ``y`` has a score that is not finite and not one ``x`` masks too (a
    class both set to -inf, as a masked vocabulary does, is no fault)."""
    return (~np.isfinite(y) & ~(np.isneginf(y) & np.isneginf(x))).any(-1)


def _logit_change(x: np.ndarray, y: np.ndarray) -> float:
    """The largest |x - y|, a class both mask at -inf counting 0."""
    with np.errstate(invalid="ignore"):
        return float(np.abs(np.where(x == y, 0, x.astype(np.float64) - y)).max())


def _classifier_fidelity(
    ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, *, labels_say: str | None = None
):
    """Agreement with FP32: a score's r2, else top-1 agreement and KL, on unlabelled rows or
    on labels that tell too little (``labels_say``: why; ``labels_at_chance``)."""
    x, y = ref.stacked(output), cand.stacked(output)
    if x.shape[-1] == 1:  # a score (a reranker's, a regression's): its value is the answer
        where = f"{output} vs FP32 on {len(x)} rows"
        return [r2_gate("r2", x[:, 0], y[:, 0], cfg.min_cosine, cfg, where)]
    agree = _same_top(x, y)  # (N,)
    kl = _kl(x, y)  # (N,)
    broken = _broken(x, y)
    rows = (
        "unlabelled rows"
        if labels_say is None
        else f"rows whose labels tell too little ({labels_say})"
    )
    detail = f"{output} vs FP32 on {len(x)} {rows}, max abs {_logit_change(x, y):.3g}"
    if broken.any():
        detail += f"; {int(broken.sum())} rows with non-finite candidate scores (any fails)"
    return [
        mean_gate("top1_agreement", agree, cfg.min_top1_agreement, ">=", cfg, detail,
                   valid=not broken.any()),
        mean_gate("kl", kl, cfg.max_kl, "<=", cfg,
                   detail + "; mean KL(FP32 || candidate) in nats",
                   valid=bool(np.isfinite(kl).all())),
    ]  # fmt: skip


def _decision_agreement(ref: Outputs, cand: Outputs, output: str, cfg: GateConfig) -> GateResult:
    """``decision_agreement``: the share of rows whose labels are each on or off as FP32's
    (on where its score is above ``decision_cut``: a logit's 0, a probability's 0.5), with
    Wilson's interval, at least ``min_top1_agreement``. A softmax's top-1 agreement and KL
    cannot see these decisions: scores all shifted down by one kept every row's top label
    and its softmax, and turned off labels on 99% of rows. The scores' own cosine to FP32's
    is gated beside it."""
    x, y = ref.stacked(output), cand.stacked(output)
    broken = _broken(x, y)
    detail = (
        f"{output} vs FP32 on {len(x)} rows of {x.shape[-1]} labels: rows whose every label "
        f"is on or off as FP32's (a score above {decision_cut(x):g})"
    )
    if broken.any():
        detail += f"; {int(broken.sum())} rows with non-finite candidate scores (any fails)"
    return mean_gate(
        "decision_agreement", _same_decisions(x, y), cfg.min_top1_agreement, ">=", cfg,
        detail, valid=not broken.any(),
    )  # fmt: skip


def _same_decisions(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) rows whose every label ``y`` turns on or off as ``x`` does (at ``x``'s
    ``decision_cut``); a row of ``y`` with a score that is not finite never (``_broken``)."""
    cut = decision_cut(x)
    return ((x > cut) == (y > cut)).all(-1) & ~_broken(x, y)


def _token_fidelity(
    ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, *, labels_say: str | None = None
):
    """A token classifier against FP32 on every real token (the mask's, where the output
    has the data's sequence axis): the share whose top class agrees, and the mean KL(FP32 ||
    candidate), both pooled over the tokens, with intervals over the rows: a sentence's
    tokens move together, so they are not as many independent samples. On unlabelled rows,
    or on labels that tell too little (``labels_say``: why; ``token_labels_at_chance``)."""
    hits, kls, counts, broken, change = [], [], [], False, 0.0
    for xt, yt, _, per_row in _token_pairs(ref, cand, output):
        hits.append(per_row(_same_top(xt, yt)))
        kls.append(per_row(_kl(xt, yt)))
        counts.append(per_row(np.ones(len(xt))))
        broken |= bool(_broken(xt, yt).any())
        change = max(change, _logit_change(xt, yt) if len(xt) else 0.0)
    h, k, n = np.concatenate(hits), np.concatenate(kls), np.concatenate(counts)
    rows = (
        "unlabelled rows"
        if labels_say is None
        else f"rows whose labels tell too little ({labels_say})"
    )
    detail = (
        f"{output} vs FP32 on {int(n.sum())} real tokens of {len(n)} {rows}, max abs {change:.3g}"
    )
    share = float(h.sum() / max(n.sum(), 1))
    agree_ci, rows_worth = clustered_share_interval(h, n, cfg.confidence)
    kl = float(k.sum() / max(n.sum(), 1))
    kl_ci = None
    if np.isfinite(k).all() and len(n) > 1:
        stats = np.concatenate(
            [
                k[r].sum(1) / np.maximum(n[r].sum(1), 1)
                for r in resamples(len(n), count=cfg.bootstrap, seed=cfg.seed)
            ]
        )
        kl_ci = percentile_interval(stats, cfg.confidence)
    return [
        interval_gate("token_top1_agreement", share, agree_ci, cfg.min_top1_agreement, ">=", cfg,
              detail + f"; share of tokens whose top class agrees; {cfg.confidence:.0%} Wilson "
              f"score interval over {_worth(rows_worth, n)}", valid=not broken),
        interval_gate("token_kl", kl, kl_ci, cfg.max_kl, "<=", cfg,
              detail + ", mean KL(FP32 || candidate) per token in nats"
              + (f"; {cfg.confidence:.0%} bootstrap interval over rows" if kl_ci else ""),
              valid=math.isfinite(kl)),
    ]  # fmt: skip


def _token_pairs(ref: Outputs, cand: Outputs, output: str, *, labelled: bool = False):
    """Batch by batch, the real tokens of ``output`` (the mask's, where the output has the
    data's sequence axis; with ``labelled``, only those the labels tag, as (tokens,) with
    them): FP32's and the candidate's (tokens, C) scores, their labels or None, and
    ``per_row(values)``: a value per token summed over each row of the batch."""
    start = 0
    for xb, yb, mask in zip(ref.batches, cand.batches, ref.masks, strict=True):
        x, y = xb[output], yb[output]  # (B, T, C)
        real = mask.astype(bool) if mask_fits(mask, x) else np.ones(x.shape[:2], bool)
        tags = None
        if labelled:  # (B, T), padded with NO_LABEL to the widest batch
            assert ref.labels is not None
            tags = ref.labels[start : start + len(x), : x.shape[1]]
            real = real & (tags >= 0)
        start += len(x)
        rows = np.repeat(np.arange(len(x)), real.sum(1))  # each token's row
        per_row = functools.partial(_row_sums, rows, len(x))
        yield (
            _as_classes(x[real]),
            _as_classes(y[real]),
            None if tags is None else tags[real],
            per_row,
        )


def _row_sums(rows: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """(n,) ``values`` (one per token) summed by the row each token is in."""
    return np.bincount(rows, values, minlength=n)


def _token_accuracy_drop(
    ref: Outputs, cand: Outputs, output: str, cfg: GateConfig, label: str
) -> GateResult:
    """A token classifier's accuracy with token labels: FP32's and the candidate's top-1
    accuracy over the labelled real tokens (``NO_LABEL`` and padding left out), the drop in
    points with Tango's paired interval over the tokens' effective number
    (``clustered_paired_interval``: a sentence's tokens flip together)."""
    lost, gained, counts, broken = [], [], [], False
    right = np.zeros(2)  # FP32's and the candidate's right tokens
    for xt, yt, t, per_row in _token_pairs(ref, cand, output, labelled=True):
        bad = _broken(xt, yt)
        a, b = _hits(xt, t), _hits(yt, t) & ~bad
        broken |= bool(bad.any())
        right += a.sum(), b.sum()
        lost.append(per_row(a & ~b))
        gained.append(per_row(~a & b))
        counts.append(per_row(np.ones(len(xt))))
    lo, ga, n = np.concatenate(lost), np.concatenate(gained), np.concatenate(counts)
    if not n.sum():  # labels at padding only
        raise DataError(f"the evaluation rows label no real token ({NO_LABEL} or padding)")
    drop, ci, worth = clustered_paired_interval(lo, ga, n, cfg.confidence)
    fp32, cand_ = right / n.sum()
    return interval_gate(
        "token_accuracy_drop", drop, ci, cfg.max_accuracy_drop, "<=", cfg,
        f"{output}: top-1 accuracy FP32 {fp32:.2%} -> {label} {cand_:.2%} over {int(n.sum())} "
        f"labelled tokens of {len(n)} rows, {int(lo.sum())} tokens newly wrong, "
        f"{int(ga.sum())} newly right; drop in points with a {cfg.confidence:.0%} paired "
        f"score interval (Tango) over {_worth(worth, n)}"
        + (f"; non-finite {label} logits (counted wrong; any fails the gate)" if broken else ""),
        valid=not broken,
    )  # fmt: skip


def _worth(effective: float, counts: np.ndarray) -> str:
    """What an interval over tokens counted them as (``stats.effective_tokens``), in words."""
    if effective == (np.asarray(counts) > 0).sum():
        return f"{effective:.0f} tokens' worth: each row as one, until {DESIGN_ROWS} rows flip"
    return f"{effective:.0f} tokens' worth: a row's tokens move together"


def _kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) KL(softmax x || softmax y) of each row in nats, exact however small the
    candidate's probability; a class FP32 masks (-inf: p = 0) adds nothing."""
    log_p, log_q = _log_softmax(x), _log_softmax(y)
    with np.errstate(invalid="ignore"):  # -inf - -inf: the masked classes, zeroed next
        terms = np.exp(log_p) * (log_p - log_q)
    return np.where(np.isneginf(log_p), 0.0, terms).sum(-1)


def _pooled(out: Outputs, name: str) -> np.ndarray:
    """(N, H) rows: the output itself when 2-D, else mean-pooled over real tokens."""
    rows = []
    for batch, mask in zip(out.batches, out.masks, strict=True):
        v = batch[name].astype(np.float64)
        if v.ndim == 3:
            w = (np.ones(v.shape[:2]) if mask is None else mask.astype(np.float64))[..., None]
            v = (v * w).sum(1) / np.maximum(w.sum(1), 1e-9)  # (B, H)
        rows.append(v.reshape(len(v), -1))
    return np.concatenate(rows)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _distinct(x: np.ndarray) -> np.ndarray:
    """Indices of the unit rows of ``x`` that are no copy of an earlier row: a cosine above
    1 - 1e-6, as a copy batched with other padding gives, differing in its last bits."""
    keep = np.ones(len(x), dtype=bool)
    block = max(1, NN_BLOCK // max(len(x), 1))
    for s in range(0, len(x), block):
        sims = x[s : s + block] @ x.T  # (block, N)
        earlier = np.arange(len(x))[None, :] < np.arange(s, s + len(sims))[:, None]
        keep[s : s + len(sims)] = ~((sims > 1 - 1e-6) & earlier).any(1)
    return np.flatnonzero(keep)


def _nearest(x: np.ndarray) -> np.ndarray:
    """Each unit row's nearest other row by cosine, a block of rows at a time."""
    block = max(1, NN_BLOCK // len(x))
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), block):
        sims = x[s : s + block] @ x.T  # (block, N)
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not itself
        out[s : s + block] = sims.argmax(1)
    return out


def neighbours_agree(x: np.ndarray, y: np.ndarray, *, tie: float) -> tuple[np.ndarray, int]:
    """The nearest-neighbour gate's measure (the bench reports it too): per unit row of
    FP32's ``x``, whether the candidate's ``y`` finds it a nearest other row that FP32 finds
    nearest too: FP32's own, or one FP32 puts within ``tie`` cosine of
    it. Two neighbours that close are a near tie, which the candidate's allowed per-row
    error (the cosine gate's 1 - min_cosine) may turn either way: counting such a flip as a
    disagreement failed sound models on text with near-duplicate neighbours. Also how many
    rows agree by a near tie only."""
    if len(x) < 2:
        return np.ones(len(x), bool), 0
    mine, theirs = _nearest(x), _nearest(y)
    best = (x * x[mine]).sum(1)  # FP32's cosine to its nearest neighbour
    given = (x * x[theirs]).sum(1)  # FP32's cosine to the candidate's nearest
    agree = (mine == theirs) | (given >= best - tie)
    return agree, int((agree & (mine != theirs)).sum())


def _embedding_fidelity(ref: Outputs, cand: Outputs, output: str, cfg: GateConfig):
    px, py = _pooled(ref, output), _pooled(cand, output)
    cos = row_cosine(px, py)  # (N,)
    x, y = _normalize(px), _normalize(py)
    # Each row's nearest neighbour is searched among all N rows, once; the interval is over
    # these per-row agreements. Searching again inside a resample would not do: a row drawn
    # twice would find its own copy nearest, under both models, and agree by construction;
    # for the same reason a row that is in the data twice counts once.
    distinct = _distinct(x)
    dx, dy = x[distinct], y[distinct]
    nn_agree, ties = neighbours_agree(dx, dy, tie=1 - cfg.min_cosine)  # (distinct,)
    among = f" ({len(dx)} distinct)" if len(dx) < len(x) else ""
    among += (
        f", the candidate's against FP32's: the same row, or one FP32 puts within "
        f"{1 - cfg.min_cosine:.3g} cosine of it (a near tie; {ties} row(s))"
    )
    if len(dx) < MIN_EVAL_ROWS:  # a pair of rows is always each other's nearest
        among += f"; fewer than the {MIN_EVAL_ROWS} distinct rows it needs"
    err = ""
    if output == "sentence_embedding":  # its values as the model gives them (not pooled)
        err = f", max abs {np.abs(ref.stacked(output) - cand.stacked(output)).max():.3g}"
    # Labels, if the rows have any, score nothing here: an embedding is judged against FP32.
    rows = "unlabelled rows" if ref.labels is None else "rows (labels unused)"
    detail = f"{output} vs FP32 on {len(x)} {rows}{err}"
    return [
        mean_gate("cosine", cos, cfg.min_cosine, ">=", cfg,
                   detail + f"; mean cosine per row (worst row {cos.min():.5f}, "
                   f"best {cos.max():.5f})",
                   valid=bool(np.isfinite(px).all() and np.isfinite(py).all())),
        tail_gate("cosine_tail", cos, cfg, detail),
        mean_gate("nn_top1_agreement", nn_agree, cfg.min_top1_agreement, ">=", cfg,
                   detail + f"; each row's nearest other row by cosine{among}",
                   valid=len(dx) >= MIN_EVAL_ROWS),
    ]  # fmt: skip


def _span_agreement(ref: Outputs, cand: Outputs, cfg: GateConfig) -> GateResult:
    """``span_agreement``: the share of rows whose answer is FP32's, with Wilson's interval,
    at least ``min_top1_agreement``. The answer is ``spans.best_spans``' over the row's
    context (``_answer_tokens``), or none where ``cfg.null_answer`` and its score beats the
    span's: the answer `quantgate infer` prints. A pair read in windows (``Batch.windows``)
    is one row, its answer its best-scoring window's, compared as tokens of the whole
    context (``spans.pair_spans``). The start and end scores' cosine to FP32's is gated
    beside it."""
    read, broken, seen, windowed = set(), 0, 0, False
    found: list[tuple[np.ndarray, ...]] = []  # (pairs, shifts, then x's and y's answers)
    for a, b, mask, types, context, windows in _span_batches(ref, cand):
        allowed, how = _answer_tokens(a[QA_OUTPUTS[0]], mask, types, context)
        ours, theirs = _scored_spans(a, allowed, cfg), _scored_spans(b, allowed, cfg)
        read.add(how)
        broken += int(_unread(*theirs, cfg).sum())  # a row's (a window's) scores not finite
        if windows is None:  # a row a pair
            pairs, shifts = seen + np.arange(len(allowed)), np.zeros(len(allowed), np.int64)
        else:  # a pair's windows, in whatever batches: its answer as context tokens
            pairs, shifts = windows[:, 0], windows[:, 1] - np.argmax(allowed, axis=1)
            windowed = True
        seen += len(allowed)
        found.append((pairs, shifts, *ours, *theirs))
    # (a source's rows are all windows or none: text_source windows all or no pairs)
    pair_ids, shifts, *scored = (np.concatenate(c) for c in zip(*found, strict=True))
    _, pair = np.unique(pair_ids, return_inverse=True)
    fp32, other = scored[:3], scored[3:]  # each model's (spans, scores, null scores)

    def answer(spans: np.ndarray, scores: np.ndarray, nulls: np.ndarray) -> np.ndarray:
        return pair_spans(spans, scores, pair, shifts, nulls if cfg.null_answer else None)

    x, y = answer(*fp32), answer(*other)
    agree = (x == y).all(1) & (y[:, 0] != -1)
    rows = f"{len(agree)} {'pairs, their windows read as one' if windowed else 'rows'}"
    null = "; or none, where the first token's span scores higher" if cfg.null_answer else ""
    detail = (
        f"{' and '.join(QA_OUTPUTS)} vs FP32 on {rows}: rows whose answer span is FP32's (the "
        f"highest start + end score, start <= end, at most {cfg.max_answer_tokens} tokens, of "
        f"{' / '.join(sorted(read))}{null})"
    )
    if broken:
        which = "windows" if windowed else "rows"
        detail += f"; {broken} {which} without an answer, their scores not finite (any fails)"
    return mean_gate(
        "span_agreement", agree, cfg.min_top1_agreement, ">=", cfg, detail, valid=not broken
    )


def _scored_spans(
    scores: dict[str, np.ndarray], allowed: np.ndarray, cfg: GateConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's best spans of the ``allowed`` tokens (at most ``cfg.max_answer_tokens``),
    their scores, and each row's score of no answer (``spans.null_scores``)."""
    start, end = (scores[n] for n in QA_OUTPUTS)
    spans = best_spans(start, end, allowed, cfg.max_answer_tokens)
    return spans, span_scores(start, end, spans), null_scores(start, end)


def _row_answers(
    spans: np.ndarray, scores: np.ndarray, nulls: np.ndarray, cfg: GateConfig
) -> np.ndarray:
    """(N, 2) each row's answer, a row a pair (``spans.pair_spans``): its span, or
    ``NO_ANSWER`` where ``cfg.null_answer`` and its null score beats the span's."""
    rows = np.arange(len(spans))
    return pair_spans(spans, scores, rows, np.zeros_like(rows), nulls if cfg.null_answer else None)


def _unread(
    spans: np.ndarray, scores: np.ndarray, nulls: np.ndarray, cfg: GateConfig
) -> np.ndarray:
    """(N,) bool: rows whose answer cannot be read: no span (``spans.best_spans``: NaN or
    +inf scores, or none finite), or, where answers may be none (``cfg.null_answer``), a
    null score of NaN or +inf (one of -inf, a first token the model masks, is never the
    answer)."""
    return (spans[:, 0] < 0) | (cfg.null_answer & unreadable(nulls))


_Maybe = np.ndarray | None  # a batch's mask, token types or context, where kept


def _span_batches(
    out: Outputs, cand: Outputs | None = None
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray], _Maybe, _Maybe, _Maybe, _Maybe]]:
    """Batch by batch: ``out``'s outputs, ``cand``'s (``out``'s again without one), and
    ``out``'s mask, token types, context tokens and windows (None where not kept)."""
    n = len(out.batches)
    return zip(
        out.batches,
        (cand or out).batches,
        out.masks,
        out.segments or [None] * n,
        out.contexts or [None] * n,
        out.windows or [None] * n,
        strict=True,
    )


# What the context is read from, as a span gate's detail says it
_FROM_TOKENIZER = "the context's tokens, as the tokenizer tells them"
_FROM_TYPES = "the context's tokens, of token type 1"
_FROM_REAL = "every real token (neither token types nor the tokenizer tell the context)"


def _answer_tokens(
    scores: np.ndarray,
    mask: np.ndarray | None,
    types: np.ndarray | None,
    context: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """(N, T) the tokens a row's answer may span, and what told them: the ``context`` tokens
    the tokenizer marked (text data: ``Batch.context``, `quantgate infer`'s rule); else, in
    a row that has a second segment (token type 1), that segment but its last token, the
    separator that ends the pair ([SEP], XLNet's <sep>): the same tokens for BERT's family;
    else every real token (the mask's): the question's and the special tokens too, which the
    gate then also holds to FP32's. Padding never."""
    if mask_fits(mask, scores, tokens=True):
        real = mask.astype(bool)
    else:
        real = np.ones(scores.shape, bool)
    if context is not None and context.shape == scores.shape:
        chosen, how = real & context, _FROM_TOKENIZER
    elif types is not None and types.shape == scores.shape:
        chosen, how = real & (types == 1), _FROM_TYPES
        last = chosen.shape[1] - 1 - np.argmax(chosen[:, ::-1], axis=1)  # (N,) its last token
        chosen[np.arange(len(chosen)), last] = False
    else:
        return real, _FROM_REAL
    if not chosen.any(1).all():
        how += "; of every real token in a row without one"
    return np.where(chosen.any(1, keepdims=True), chosen, real), how


# The gates of each kind that judges an output: (FP32's outputs, the candidate's, the output
# judged, cfg, the candidate's label in details) -> its gates, in order.
_KIND_GATES: dict[Kind, Callable[[Outputs, Outputs, str, GateConfig, str], list[GateResult]]] = {
    Kind.CLASSIFIER: _classifier_gates,
    Kind.TOKEN_CLASSIFIER: _token_classifier_gates,
    # read no labels; a multi-label classifier's scores get their cosine too (``_unjudged``)
    Kind.MULTI_LABEL: lambda ref, cand, out, cfg, _: [_decision_agreement(ref, cand, out, cfg)],
    # read no labels; its start and end scores get their cosine too (``_unjudged``)
    Kind.QUESTION_ANSWERER: lambda ref, cand, out, cfg, _: [_span_agreement(ref, cand, cfg)],
    Kind.EMBEDDING: lambda ref, cand, out, cfg, _: _embedding_fidelity(ref, cand, out, cfg),
}


# -- batch consistency ---------------------------------------------------------------------


def batch_consistency(
    model: str | Path, data: DataSource, task: str, cfg: GateConfig
) -> GateResult | None:
    """How far a row's answer moves with the rows it is batched with, as the server batches:
    ``model`` run on each row of ``data`` alone (its real tokens, as a lone request reaches
    the server) against the same row in a batch of its evaluation batch's rows, padded on
    the right to the longest (as the server's batcher pads, whatever padding the data came
    with). Dynamic INT8 computes its activation scales from the whole batch at run time, so
    the server's batching changes its answers (on the built-in digits model: logits by up to
    0.16, and the top class of 1 row in 360). Gated as top-1 agreement at
    ``min_top1_agreement`` for a classifier (R² for a single logit), per real token for a
    token classifier, each label's decision for a multi-label one, the answer span for a
    question answerer, else the mean cosine of its embedding at ``min_cosine``; None for a
    model of none of these kinds (nothing to judge it by)."""
    sess = session(model, cfg.provider, threads=cfg.threads)
    names = [o.name for o in sess.get_outputs()]
    together, alone = Outputs(names), Outputs([])
    kind, judged = Kind.OTHER, None
    for batch in data.batches():
        # a question answerer's context tokens ride with the inputs: cut to each row's real
        # tokens and padded back as they are
        rows = _lone_requests(
            batch.feeds if batch.context is None else {**batch.feeds, _CONTEXT: batch.context}
        )
        feeds = right_pad(rows, data.pad_values)
        context = feeds.pop(_CONTEXT, None)
        contexts = [row.pop(_CONTEXT, None) for row in rows]
        wanted = names if judged is None else alone.names  # all until the judged are known
        together.batches.append(dict(zip(wanted, sess.run(wanted, feeds), strict=True)))
        together.masks.append(feeds.get("attention_mask"))
        together.segments.append(feeds.get(TYPE_IDS))
        together.contexts.append(context)
        together.rows += len(rows)
        if judged is None:  # the output judged, known from the first batch; alone, only
            # it (and a question answerer's end scores with its start scores)
            found = kind_of(together, task)
            if found.output is None:  # OTHER: nothing to judge it by
                return None
            kind, judged = found.kind, found.output
            # a question answerer's span needs its end scores beside its start scores
            alone.names = list(QA_OUTPUTS) if kind is Kind.QUESTION_ANSWERER else [judged]
        for row, context in zip(rows, contexts, strict=True):
            alone.batches.append(dict(zip(alone.names, sess.run(alone.names, row), strict=True)))
            alone.masks.append(row.get("attention_mask"))
            alone.segments.append(row.get(TYPE_IDS))
            alone.contexts.append(context)
            alone.rows += 1
    if judged is None:  # no rows
        return None
    largest = max(len(b[judged]) for b in together.batches)
    detail = (
        f"{' and '.join(alone.names)}: each of {alone.rows} rows run alone vs in a batch (of "
        f"up to {largest}, right-padded as the server pads); dynamic quantization scales "
        "activations per batch"
    )
    return _BATCH_GATES[kind](together, alone, judged, cfg, detail)


def _batch_classifier(
    together: Outputs, alone: Outputs, output: str, cfg: GateConfig, detail: str
) -> GateResult:
    """Top-1 agreement of each row alone with the same row batched; a single score's R²."""
    x, y = together.stacked(output), alone.stacked(output)
    if x.shape[-1] == 1:  # a score: its value, as the unlabelled gates judge it
        return r2_gate("batch_r2", x[:, 0], y[:, 0], cfg.min_cosine, cfg, detail)
    agree = _same_top(x, y)
    detail += f"; max logit change {_logit_change(x, y):.3g}"
    return mean_gate(
        "batch_top1_agreement", agree, cfg.min_top1_agreement, ">=", cfg, detail,
        valid=not _broken(x, y).any(),
    )  # fmt: skip


def _batch_token_classifier(
    together: Outputs, alone: Outputs, output: str, cfg: GateConfig, detail: str
) -> GateResult:
    """Top-1 agreement of each token of a row alone with the same token batched."""
    lone = (b[output][0] for b in alone.batches)  # (L, C): the row's real tokens
    pairs = []  # (the row in its batch, cut to its length; the row alone)
    for outs in together.batches:
        for x in outs[output]:
            y = next(lone)
            pairs.append((x[: len(y)], y))
    pairs = [(_as_classes(x), _as_classes(y)) for x, y in pairs]  # one logit: a binary tag
    hits = np.array([_same_top(x, y).sum() for x, y in pairs])
    counts = np.array([len(y) for _, y in pairs])
    ci, worth = clustered_share_interval(hits, counts, cfg.confidence)
    return interval_gate(
        "batch_token_top1_agreement", float(hits.sum() / max(counts.sum(), 1)), ci,
        cfg.min_top1_agreement, ">=", cfg,
        detail + f"; {int(counts.sum())} tokens, {cfg.confidence:.0%} Wilson score interval "
        f"over {_worth(worth, counts)}",
        valid=not any(_broken(x, y).any() for x, y in pairs),
    )  # fmt: skip


def _batch_multi_label(
    together: Outputs, alone: Outputs, output: str, cfg: GateConfig, detail: str
) -> GateResult:
    """Rows whose every label is on or off alone as batched."""
    x, y = together.stacked(output), alone.stacked(output)
    return mean_gate(
        "batch_decision_agreement", _same_decisions(x, y), cfg.min_top1_agreement, ">=",
        cfg, detail + "; rows whose every label is on or off alike",
        valid=not _broken(x, y).any(),
    )  # fmt: skip


def _batch_embedding(
    together: Outputs, alone: Outputs, output: str, cfg: GateConfig, detail: str
) -> GateResult:
    """The mean cosine of each row's embedding alone to the same row's batched."""
    x, y = _pooled(together, output), _pooled(alone, output)
    cos = row_cosine(x, y)
    return mean_gate(
        "batch_cosine", cos, cfg.min_cosine, ">=", cfg,
        detail + f"; mean cosine per row (worst row {cos.min():.5f})",
        valid=bool(np.isfinite(x).all() and np.isfinite(y).all()),
    )  # fmt: skip


def _batch_spans(
    together: Outputs, alone: Outputs, output: str, cfg: GateConfig, detail: str
) -> GateResult:
    """Rows whose answer alone is the one they get batched (a window a row)."""
    batched = [
        _scored_spans(b, _answer_tokens(b[output], mask, types, context)[0], cfg)
        for b, _, mask, types, context, _ in _span_batches(together)
    ]
    lone = [  # a row each, its real tokens alone
        _scored_spans(b, _answer_tokens(b[output], None, types, context)[0], cfg)
        for b, _, _, types, context, _ in _span_batches(alone)
    ]
    x = np.concatenate([_row_answers(*a, cfg) for a in batched])
    y = np.concatenate([_row_answers(*a, cfg) for a in lone])
    # a row whose answer cannot be read, batched or alone, agrees with nothing
    broken = np.concatenate([_unread(*a, cfg) for a in lone]) | np.concatenate(
        [_unread(*a, cfg) for a in batched]
    )
    return mean_gate(
        "batch_span_agreement", (x == y).all(1) & ~broken, cfg.min_top1_agreement,
        ">=", cfg, detail + "; rows whose answer span is the same alone as batched",
        valid=not broken.any(),
    )  # fmt: skip


# The batch gate of each kind that judges an output: (the rows batched, the rows alone, the
# output, cfg, the detail) -> its gate.
_BATCH_GATES: dict[Kind, Callable[[Outputs, Outputs, str, GateConfig, str], GateResult]] = {
    Kind.CLASSIFIER: _batch_classifier,
    Kind.TOKEN_CLASSIFIER: _batch_token_classifier,
    Kind.MULTI_LABEL: _batch_multi_label,
    Kind.QUESTION_ANSWERER: _batch_spans,
    Kind.EMBEDDING: _batch_embedding,
}


_CONTEXT = "quantgate.context"  # no input's name: Batch.context beside the feeds


def _lone_requests(feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each row of a batch as a client sends it alone: its real tokens (where the
    attention mask has them, left or right padding alike), no padding."""
    mask = feeds.get("attention_mask")
    rows = []
    for i in range(len(next(iter(feeds.values())))):
        row = {k: v[i : i + 1] for k, v in feeds.items()}
        if mask is not None:
            real = mask[i].astype(bool)
            row = {
                k: v[:, real] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v
                for k, v in row.items()
            }
        rows.append(row)
    return rows


__all__ = [
    "Judged",
    "Kind",
    "Outputs",
    "accuracy_gates",
    "batch_consistency",
    "check_eval_rows",
    "check_evaluation",
    "check_label_range",
    "collect",
    "counts_rows",
    "kind_of",
    "labels_at_chance",
    "neighbours_agree",
    "token_labels_at_chance",
    "unread_answer_rule",
]
