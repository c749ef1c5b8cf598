"""How a gate is decided: the thresholds (``GateConfig``), and a value with its interval
against its threshold (``decide``).

The decision rule, chosen and documented here: a gate passes when its *point estimate* is
on the right side of its threshold; the interval is reported next to it, and where it
holds values on both sides of the threshold the detail says the pass (or fail) is within
the measurement's uncertainty (``uncertain``). Requiring the interval's bound on the
failing side to pass instead (``GateConfig(ci_rule="upper")``: the upper bound of a drop or
a KL, the lower bound of a cosine or an agreement) is also available, but on small test
sets it fails sound models: on the 360 digits test images one net flipped row is 0.28
points, and even none leaves the upper 95% bound above 1 point (1.06).

``mean_gate``, ``interval_gate`` and ``tail_gate`` make a ``GateResult`` by that rule, for
every accuracy and fidelity gate (``gates``, ``fidelity``); the speed gates decide with
``decide`` too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.bundle import CPU, CUDA, GateResult
from quantgate.configs import check_fields, config_class, unknown_fields, wrong_types
from quantgate.errors import ConfigError
from quantgate.quantize.stats import bootstrap_mean, wilson
from quantgate.tasks import MULTI_LABEL_TASKS, QA_TASKS, TOKEN_TASKS


@config_class
@dataclass(frozen=True)
class GateConfig:
    max_accuracy_drop: float = 1.0  # points of the task metric (percent), FP32 -> candidate
    # Which value decides a gate with an interval: "point", the estimate; "upper", the
    # interval's bound on the failing side (upper for a drop or KL, lower for cosine or
    # agreement). Speed gates are decided by their median either way.
    ci_rule: str = "point"
    confidence: float = 0.95  # of every gate's interval
    bootstrap: int = 1000  # resamples, of the cosine and KL gates' means
    min_speedup: float = 1.2  # candidate vs FP32, at every speed shape
    min_cosine: float = 0.99  # embeddings / other outputs without labels
    # The tail under a mean cosine: the share of rows whose cosine to FP32 is below
    # tail_cosine may be at most max_tail_share (a mean of 0.99 alone allows 20% of rows
    # at 0.95). Every cosine-gated output has it.
    tail_cosine: float = 0.95
    max_tail_share: float = 0.02
    min_top1_agreement: float = 0.95  # classifier top-1, or embedding nearest neighbour
    max_kl: float = 0.05  # nats, mean KL(FP32 || candidate) for classifiers without labels
    batch_sizes: tuple[int, ...] = (1, 32)  # the shapes a user serves, by default
    seq_len: int = 128  # capped at the model's longest (64 for the built-in digits model)
    provider: str = CPU  # the execution provider the speed gate runs on
    warmup: int = 3  # runs of each model before timing (allocations, caches, threads)
    # Timed A/B pairs per shape (``pairs`` to time_interleaved); the gate takes their median
    # ratio. The name is the one gate-config files and manifests hold.
    iterations: int = 15
    # ORT intra-op threads (0: its default, or the CPUs a container has; one on CUDA: cpus)
    threads: int = 0
    eval_samples: int | None = None  # cap on evaluation rows (length-stratified); None: all
    seed: int = 0  # bootstrap resampling
    # How a question answerer's answer is read, by its span gates and by `quantgate infer`
    # (quantgate.spans): an answer spans at most max_answer_tokens tokens (run_qa.py's 30);
    # with null_answer (a SQuAD 2.0 model), a question may have none: where the score of the
    # span at the first token ([CLS]) beats every span's, as run_qa.py's version_2 rule.
    max_answer_tokens: int = 30
    null_answer: bool = False

    def __post_init__(self):
        check_fields(self)  # types first: a list of batch sizes becomes a tuple, 1.7 is refused
        # "cpu" and "cuda" as --device spells them, for ONNX Runtime's provider names
        spelled = {"cpu": CPU, "cuda": CUDA}.get(str(self.provider).lower(), self.provider)
        object.__setattr__(self, "provider", spelled)
        problems: list[tuple[str, str]] = []  # (field, what is wrong with its value)
        if not self.provider.endswith("ExecutionProvider"):  # not only when a re-gate runs
            problems.append((
                "provider",
                f"{self.provider!r}: expected 'cpu', 'cuda' or an ONNX Runtime provider's name "
                f"({CPU}, {CUDA})",
            ))  # fmt: skip
        if self.ci_rule not in ("point", "upper"):
            problems.append(("ci_rule", f"{self.ci_rule!r}: expected 'point' or 'upper'"))
        if not 0 < self.confidence < 1:
            problems.append(("confidence", f"{self.confidence}: expected 0 < c < 1"))
        # finite: the manifest records the thresholds as JSON, which has no infinity, and a
        # re-gate reads them back (`not >=`: NaN fails too, which no value would pass)
        for name, low in (
            ("max_accuracy_drop", ">= 0"),
            ("min_speedup", "> 0"),
            ("max_kl", ">= 0"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
                problems.append((name, f"{value}: expected a finite number {low}"))
        for name in ("min_cosine", "tail_cosine"):
            if not -1 <= getattr(self, name) <= 1:
                problems.append((name, f"{getattr(self, name)}: expected -1..1"))
        for name in ("min_top1_agreement", "max_tail_share"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append((name, f"{getattr(self, name)}: expected 0..1"))
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.seq_len < 1:
            problems.append(
                ("batch_sizes", f"{self.batch_sizes} / seq_len {self.seq_len}: expected >= 1")
            )
        if self.iterations < 3:
            problems.append(("iterations", f"{self.iterations}: expected >= 3"))
        if self.warmup < 0:
            problems.append(("warmup", f"{self.warmup}: expected >= 0"))
        if self.threads < 0:
            problems.append(
                ("threads", f"{self.threads}: expected >= 0 (0: ONNX Runtime's default)")
            )
        if self.bootstrap < 100:
            problems.append(("bootstrap", f"{self.bootstrap}: expected >= 100"))
        if self.max_answer_tokens < 1:
            problems.append(("max_answer_tokens", f"{self.max_answer_tokens}: expected >= 1"))
        if self.eval_samples is not None and self.eval_samples < 1:
            problems.append(("eval_samples", f"{self.eval_samples}: expected >= 1 (or unset: all)"))
        if problems:
            listed = "\n".join(f"  - {name} {what}" for name, what in problems)
            raise ConfigError("invalid gate config:\n" + listed, problems)

    @classmethod
    def from_file(
        cls, path: str | Path, base: GateConfig | None = None, **overrides: Any
    ) -> GateConfig:
        """Read a TOML or JSON file of GateConfig fields (a ``[gates]`` table is accepted):
        they replace ``base``'s (the defaults when None), and ``overrides`` replace both."""
        try:
            import tomllib  # Python 3.11+
        except ModuleNotFoundError:  # pragma: no cover - 3.10
            import tomli as tomllib
        path = Path(path)
        kind = {".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower())
        if path.is_dir():
            raise ConfigError(
                f"{path}: is a directory; gate settings are read from a .toml or "
                ".json file (e.g. gates.toml holding `min_speedup = 1.3`)"
            )
        if kind is None:
            raise ConfigError(
                f"{path}: a {path.suffix or 'suffix-less'} file; gate settings are "
                "read from .toml or .json (e.g. gates.toml holding `min_speedup = 1.3`)"
            )
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as Notepad saves
            data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ) from e
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: not valid {kind} ({e})") from e
        if isinstance(data, dict) and "gates" in data:
            if len(data) > 1:  # one of the two would be silently ignored
                raise ConfigError(
                    f"{path}: settings both in a [gates] table and outside it "
                    f"({sorted(set(data) - {'gates'})}); put them all in one place"
                )
            data = data["gates"]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table of gate settings")
        known = {f.name for f in fields(cls)}
        problems = [
            f"{name} = {data[name]!r}: expected {what}"
            for name, what in wrong_types(cls, {k: v for k, v in data.items() if k in known})
        ]
        if unknown := sorted(set(data) - known):  # said as GateConfig(min_speedp=...) says it
            problems.insert(0, unknown_fields(cls.__name__, unknown, known, where=str(path)))
        if problems:  # (the path leads: unknown_fields' own, else put here)
            raise ConfigError(("" if unknown else f"{path}: ") + "; ".join(problems))
        merged = {
            **(asdict(base) if base is not None else {}),
            **data,
            **{k: v for k, v in overrides.items() if v is not None},
        }
        try:
            return cls(**merged)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from e

    def with_overrides(self, **overrides: Any) -> GateConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def uncertain(gate: GateResult) -> bool:
    """Whether ``gate`` was decided by its point estimate with its interval holding values on
    both sides of its threshold: another sample of the rows (or of the timings) could as well
    have decided it the other way. A gate failed by ``ci_rule="upper"`` because its interval
    reaches the failing side is not: that is the rule, and another sample would not pass it
    with any confidence."""
    if gate.ci is None or not _straddles(gate.ci, gate.op, gate.threshold):
        return False
    return gate.passed == meets(gate.value, gate.op, gate.threshold)


def failed_by_bound(gate: GateResult) -> str | None:
    """Where ``gate`` failed on its interval's bound though its value passes (``ci_rule``
    "upper"): that bound, as "upper bound 0.037" (its figure in the gate's terms); else
    None. A reader who sees "0 <= 0.02: FAIL" needs it."""
    if gate.passed or gate.ci is None or not meets(gate.value, gate.op, gate.threshold):
        return None
    side, bound = ("upper", gate.ci[1]) if gate.op == "<=" else ("lower", gate.ci[0])
    if _by_bound(side) not in gate.detail:  # decided otherwise (too few rows, ...)
        return None
    return None if meets(bound, gate.op, gate.threshold) else f"{side} bound {bound:.4g}"


def _by_bound(side: str) -> str:
    """What a gate's detail says where its ``side`` ("upper", "lower") bound decided it
    (``decide``): the words ``failed_by_bound`` reads back from a manifest."""
    return f"its {side} bound must be"


def meets(value: float, op: str, threshold: float) -> bool:
    """Whether ``value`` is on the passing side of ``threshold`` (``op`` "<=" or ">="), with
    1e-9 of slack for sums of floats; NaN never is."""
    return value <= threshold + 1e-9 if op == "<=" else value >= threshold - 1e-9


def _straddles(ci: tuple[float, float], op: str, threshold: float) -> bool:
    return meets(ci[0], op, threshold) != meets(ci[1], op, threshold)


def decide(
    value: float,
    ci: tuple[float, float] | None,
    threshold: float,
    op: str,
    *,
    rule: str,
    confidence: float,
    valid: bool = True,
) -> tuple[bool, str]:
    """Whether a gate passes under ``rule`` (``GateConfig.ci_rule``), and the words its detail
    ends with: what decided it, and, where its interval straddles the threshold, that the
    verdict is within the measurement's uncertainty. ``valid`` False (non-finite outputs)
    fails it whatever the value."""
    bound = "upper" if op == "<=" else "lower"  # the bound on the failing side
    if rule == "upper" and ci is None:  # no evidence to pass on: not its value instead
        return False, f"; {_by_bound(bound)} {op} the threshold, and it has no interval"
    by_bound = rule == "upper"
    if ci is not None and by_bound:
        decisive, words = (ci[1] if op == "<=" else ci[0]), f"; {_by_bound(bound)} {op}"
    else:
        decisive, words = value, f"; the point estimate must be {op}"
    passed = bool(valid and meets(decisive, op, threshold))
    words += " the threshold"
    if not valid or ci is None or not _straddles(ci, op, threshold):
        return passed, words
    if not by_bound:
        words += (
            f": it {'passes' if passed else 'fails'} by less than its {confidence:.0%} "
            "interval, within the measurement's uncertainty"
        )
    elif meets(value, op, threshold):
        words += f": the point estimate passes, its {bound} bound does not"
    return passed, words


def mean_gate(
    name: str,
    values: np.ndarray,
    threshold: float,
    op: str,
    cfg: GateConfig,
    detail: str,
    *,
    valid: bool = True,
    provider: str | None = None,
) -> GateResult:
    """The gate of the mean of per-row ``values``, with its interval over the rows: Wilson's
    for booleans (a share of rows that agree), else ``bootstrap_mean`` (a float measure,
    even one of exactly 1.0 on every row), decided under ``cfg.ci_rule``. Rows that are not
    finite (NaN outputs) are left out of the mean, which is NaN only when no row is finite;
    ``valid`` False fails the gate whatever its value."""
    finite = np.isfinite(values)
    value = float(np.mean(values[finite])) if finite.any() else math.nan
    if not finite.all():  # a mean of the others, failed whatever it is (``valid``)
        detail += f"; {int((~finite).sum())} of {len(values)} rows not finite, left out of the mean"
    ci: tuple[float, float] | None
    if values.dtype == bool and len(values):  # a share of rows: agreement
        ci = wilson(int(values.sum()), len(values), cfg.confidence)
        how = f"; {cfg.confidence:.0%} Wilson score interval over {len(values)} rows"
    else:
        ci = bootstrap_mean(values, cfg.confidence, count=cfg.bootstrap, seed=cfg.seed)
        how = f"; {cfg.confidence:.0%} bootstrap interval over rows ({cfg.bootstrap} resamples)"
    return interval_gate(
        name, value, ci, threshold, op, cfg, detail + (how if ci else ""),
        valid=valid, provider=provider,
    )  # fmt: skip


def interval_gate(
    name: str,
    value: float,
    ci: tuple[float, float] | None,
    threshold: float,
    op: str,
    cfg: GateConfig,
    detail: str,
    *,
    valid: bool = True,
    provider: str | None = None,
) -> GateResult:
    """A gate of ``value`` with its interval ``ci``, decided under ``cfg.ci_rule``."""
    passed, rule = decide(
        value, ci, threshold, op, rule=cfg.ci_rule, confidence=cfg.confidence, valid=valid
    )
    return GateResult(
        name, value, threshold, op, passed, ci=ci, provider=provider, detail=detail + rule
    )


def tail_gate(
    name: str, cosines: np.ndarray, cfg: GateConfig, detail: str, *, provider: str | None = None
) -> GateResult:
    """The share of rows whose cosine to FP32 is below ``cfg.tail_cosine`` (a NaN row is
    one), at most ``cfg.max_tail_share``: the rows a mean cosine hides. One row in ten at
    0.93, the rest at 0.9999, averages 0.993."""
    low = ~(cosines >= cfg.tail_cosine)  # (N,) bool: Wilson's interval of a share
    return mean_gate(
        name, low, cfg.max_tail_share, "<=", cfg,
        detail + f"; share of rows with cosine < {cfg.tail_cosine:g}: {int(low.sum())} of "
        f"{len(low)}", provider=provider,
    )  # fmt: skip


# How the gates measure and decide, by version. Every gating records the version it ran
# under (``gate_definitions``, beside its gate_config), and a re-gate of a bundle gated under
# an older one says what changed since: the same gate, threshold and data can decide
# differently. Bump it, with what changed, when a gate's value or decision changes.
GATE_DEFINITIONS = 8


@dataclass(frozen=True)
class Change:
    """One change of the gates' definitions: what changed, and the tasks whose gates it
    changed (empty: every task's). A re-gate names only the changes to its bundle's task."""

    what: str
    tasks: tuple[str, ...] = ()


DEFINITION_CHANGES: dict[int, tuple[Change, ...]] = {
    2: (
        Change(
            "nn_top1_agreement counts a near tie as agreement (the candidate's nearest row is "
            "one FP32 puts within 1 - min_cosine of its own)"
        ),
        Change(
            "a row that is zero (or negligible) under both models agrees in every cosine gate "
            "(it scored 0)"
        ),
        Change("under ci_rule 'upper' a gate with no interval fails (its value decided it)"),
        Change("R²'s resamples in which FP32 is constant count as the worst (they were dropped)"),
    ),
    3: (
        Change(
            "a classifier's labels that FP32's answers do not follow (no agreement beyond "
            "chance, Cohen's kappa) add top1_agreement and kl to its accuracy gate"
        ),
        Change(
            "evaluation rows with fewer than 30 distinct embeddings are refused (the "
            "nearest-neighbour gate failed on them)"
        ),
    ),
    4: (
        Change(
            "an integer output (a predicted class, ids) is gated on exact agreement with FP32, "
            "agreement:<output> (it had an R² of its values, or no gate)"
        ),
        Change(
            "evaluation rows that are also calibration rows are left out of the gates (they "
            "were counted), and a repeated row is gated once"
        ),
    ),
    5: (
        Change(
            "a classifier's evaluation rows all labelled one class add top1_agreement and kl "
            "to its accuracy gate (an INT8 answering that class on every row passed)"
        ),
        Change(
            "a row negligible in FP32 alone (below 1e-6 of its median row norm) scores -1 in "
            "the cosine gates, as its docstring said (it scored the cosine of float noise's "
            "direction)"
        ),
    ),
    6: (
        Change(
            "a question-answering model (start_logits and end_logits) is gated on its answer "
            "spans' agreement with FP32, span_agreement and batch_span_agreement, on at least "
            "30 evaluation rows (it had the scores' cosine alone)",
            tasks=QA_TASKS,
        ),
        Change(
            "a multi-label classifier's sentence_embedding, served beside its scores, is gated "
            "on its cosine (it had no gate), and its evaluation rows need no 30 distinct "
            "embeddings",
            tasks=MULTI_LABEL_TASKS,
        ),
    ),
    7: (
        Change(
            "a question answerer's text pair longer than the model is read in overlapping "
            "windows, a row each, and span_agreement reads one answer a pair, its best-scoring "
            "window's (the pair was cut at the model's length)",
            tasks=QA_TASKS,
        ),
    ),
    8: (
        Change(
            "a token classifier's single logit per token is a binary tag, read as [0, logit], "
            "with token labels 0 and 1 (taken as one class, every candidate agreed on every "
            "token)",
            tasks=TOKEN_TASKS,
        ),
        Change(
            "token labels FP32's answers do not follow (no agreement beyond chance, Cohen's "
            "kappa over the tokens' effective number, or every token one tag) add "
            "token_top1_agreement and token_kl to the accuracy gate",
            tasks=TOKEN_TASKS,
        ),
        Change(
            "a score FP32 and the candidate both set to -inf (a masked token) is no fault in "
            "the cosine and span gates (an identical model failed them)"
        ),
        Change(
            "the cosine gates read a row as negligible against the median row norm of all the "
            "rows, not of its batch's (the verdict moved with how the rows were batched)"
        ),
        Change(
            "an integer output of shape (batch, n) is compared at every column, unless its "
            "second axis is the sequence's (its graph says so, or its width follows the "
            "batches' lengths): a row's top-k ids as many as a batch's tokens had their "
            "columns past the row's length excused"
        ),
    ),
}


def definition_changes(since: int | None, task: str | None = None) -> list[str]:
    """What changed in the gates' definitions after version ``since`` (None: a gating from
    before versions were recorded, version 1), for a model of ``task`` (None: any)."""
    return [
        c.what
        for v in range((since or 1) + 1, GATE_DEFINITIONS + 1)
        for c in DEFINITION_CHANGES[v]
        if task is None or not c.tasks or task in c.tasks
    ]


__all__ = [
    "GATE_DEFINITIONS",
    "GateConfig",
    "decide",
    "definition_changes",
    "failed_by_bound",
    "interval_gate",
    "mean_gate",
    "meets",
    "tail_gate",
    "uncertain",
]
