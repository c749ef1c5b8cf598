"""The recipe search: try INT8 recipes, gate each, keep the fastest one that passes.

1. Start from ``default_recipes()``: the best recipes for the detected CPU, best first.
2. Quantize, then gate each candidate: accuracy (or fidelity) on the evaluation data
   against FP32 outputs computed once, and speed against FP32 at the served shapes.
3. When a candidate fails accuracy but is fast enough to be worth saving, ask
   ``node_sensitivity`` which nodes cost the outputs most (the INT8 graph with each node
   alone back in FP32, on calibration rows), keep the ``sensitivity_top_k`` whose return
   helps most in FP32 and retry, up to ``max_keep_rounds`` rounds per recipe.
4. Stop when the queue is empty, ``search_budget_s`` is spent or ``max_candidates`` have
   run (the first candidate always runs). A candidate that fails accuracy when nothing is
   left to refine it is not timed, once another has passed: its speed would serve nothing.
   Among the candidates that pass every gate, the fastest (geometric mean of the speedups)
   is chosen, not the first. When none passes, the closest ships, marked failed
   (``SearchResult.best``).
5. The chosen one is timed again (``_confirm``), apart from the search that picked it: the
   fastest of several noisy measurements is optimistic. Its speed gates are that second
   measurement's; when they fail, the next fastest winner is timed again in turn.

Every candidate is recorded, passing or not, with its gates; each round of nodes kept in
FP32 records what it bought (accuracy) and what it cost (speedup).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec

from quantgate import cpus
from quantgate.bundle import GateResult, TensorSpec, all_passed, speed_score
from quantgate.configs import check_fields, config_class
from quantgate.errors import ConfigError, NothingToQuantize, QuantizeError, QuantizeFailed
from quantgate.fsutil import raise_if_full
from quantgate.progress import ProgressFn, no_progress
from quantgate.quantize.data import Counted, DataSource, Feeds
from quantgate.quantize.decide import GateConfig
from quantgate.quantize.gates import (
    Outputs,
    accuracy_gates,
    batch_consistency,
    check_evaluation,
    collect,
)
from quantgate.quantize.speed import TimingConditions, speed_gates

if TYPE_CHECKING:  # recipes import onnx; the search loads them when it runs
    from quantgate.quantize.recipes import Recipe

log = logging.getLogger(__name__)
P = ParamSpec("P")


@config_class
@dataclass(frozen=True)
class QuantConfig:
    # Wall-clock seconds for the whole search (calibration, quantization, gates); checked
    # before each new candidate, so the last one may overrun it. The first always runs.
    search_budget_s: float = 900.0
    calibration_samples: int | None = None  # cap on calibration rows (stratified); None: all
    sensitivity_top_k: int = 4  # nodes moved to FP32 per round
    max_keep_rounds: int = 3  # rounds of keeping nodes FP32, per starting recipe
    sensitivity_samples: int = 32  # calibration rows compared node by node
    max_candidates: int = 12
    recipes: tuple[str, ...] = ()  # restrict default_recipes() to these names; empty: all
    # Also ship an FP16 variant for the CUDA execution provider (INT8 is slower there:
    # docs/gpu.md), gated on fidelity against FP32 (and on CUDA speed where a GPU is present).
    fp16: bool = True
    fp16_min_cosine: float = 0.999  # mean per-row cosine of every output vs FP32
    # op types the FP16 variant keeps FP32, beyond ORT's defaults and the nodes whose values
    # leave FP16's range (``fp16.out_of_range``): where its gate names an op that FP16 hurts
    fp16_op_block_list: tuple[str, ...] = ()
    # Where a CUDA GPU is present: placement and speed gates on the CUDA provider for every
    # variant (quantize/cuda.py); INT8 that is slower there is marked not for CUDA.
    cuda_gates: bool = True

    def __post_init__(self):
        check_fields(self)  # types first: recipes="name" is one recipe, not its letters
        if not self.search_budget_s > 0:  # NaN too: no budget would ever run out
            raise ConfigError(
                f"search_budget_s (--search-budget) must be > 0 seconds, got {self.search_budget_s}"
            )
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise ConfigError(
                f"calibration_samples (--samples) must be >= 1, got {self.calibration_samples}"
            )
        for name, value, least in (
            ("sensitivity_top_k", self.sensitivity_top_k, 1),
            ("max_candidates", self.max_candidates, 1),
            ("max_keep_rounds", self.max_keep_rounds, 0),
        ):
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")


@dataclass(frozen=True)
class Candidate:
    """One recipe tried: its model, every gate, and what keeping nodes FP32 did."""

    name: str
    recipe: dict[str, Any]
    method: str  # "static" (calibrated) or "dynamic"
    path: Path | None  # None when quantization failed
    accuracy: tuple[GateResult, ...] = ()
    speed: tuple[GateResult, ...] = ()
    kept_fp32: tuple[str, ...] = ()
    added_fp32: tuple[tuple[str, float], ...] = ()  # nodes this round kept FP32, sensitivity
    parent: str | None = None  # the candidate these nodes were added to
    quantize_s: float = 0.0
    error: str = ""
    timing: TimingConditions | None = None  # the machine before its speed gates timed it

    @property
    def gates(self) -> tuple[GateResult, ...]:
        return (*self.accuracy, *self.speed)

    @property
    def passed(self) -> bool:
        return not self.error and all_passed(self.accuracy) and all_passed(self.speed)

    @property
    def accurate(self) -> bool:
        return not self.error and all_passed(self.accuracy)

    @property
    def speedup(self) -> float:
        return speed_score(self.speed)

    @property
    def slowest(self) -> float:
        """The speedup at the slowest shape: what decides the speed gate (every shape must
        reach the threshold) and what serving promises; 0 without a speed gate."""
        return min((g.value for g in self.speed), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "passed": self.passed,
            "accuracy": {g.name: g.value for g in self.accuracy},
            "speedup": {g.name: g.value for g in self.speed},
            "kept_fp32": list(self.kept_fp32),
            "parent": self.parent,
            "quantize_s": round(self.quantize_s, 1),
            "error": self.error,
            "timing": asdict(self.timing) if self.timing else None,
        }


@dataclass(frozen=True)
class NodeCost:
    """A node kept in FP32: how sensitive it was, and what its round cost and bought."""

    node: str
    sensitivity: float
    candidate: str  # the candidate that first kept it
    speedup_before: float
    speedup_after: float | None  # None: the round's candidate was not timed (_try)
    accuracy_gate: str
    accuracy_before: float
    accuracy_after: float
    nodes_in_round: int

    @property
    def speedup_cost(self) -> float | None:
        """Speedup lost by the round, split evenly over its nodes (None: not timed)."""
        if self.speedup_after is None:
            return None
        return (self.speedup_before - self.speedup_after) / max(self.nodes_in_round, 1)


@dataclass(frozen=True)
class SearchResult:
    candidates: tuple[Candidate, ...]  # as the search measured them
    # the fastest passing candidate, with its speed gates timed again (``_confirm``); None
    # when none passed, or none held when timed again
    chosen: Candidate | None
    seconds: float
    budget_s: float
    max_candidates: int = 0  # 0: not recorded
    skipped: tuple[str, ...] = ()  # recipes not tried: the search was stopped
    stopped: str = ""  # why the search stopped before its queue was empty, in words
    retimed: tuple[Candidate, ...] = ()  # the winners timed again, in order; chosen is last

    @property
    def best(self) -> Candidate:
        """What to ship: the chosen one, else the closest to passing (for a failed bundle).

        The closest ran, then passes every accuracy gate, or fails the fewest, then is the
        fastest at its slowest shape.
        Accuracy comes first because it is the model's own, while speed depends on the
        machine: a re-gate on faster hardware can pass an accurate candidate, never an
        inaccurate one. Speed goes by the slowest shape, not the geometric mean that ranks
        passing candidates, because that shape is the one the speed gate fails on.
        """
        if self.chosen is not None:
            return self.chosen
        again = {c.name: c for c in self.retimed}  # a winner that did not hold: as retimed
        made = [again.get(c.name, c) for c in self.candidates if c.path is not None]
        # a winner beyond CONFIRMATIONS was never timed again: nothing vouches for its pass
        made = [c for c in made if not c.passed] or made
        if not made:
            raise QuantizeFailed(
                "no INT8 recipe produced a model:\n"
                + "\n".join(f"  - {c.name}: {c.error}" for c in self.candidates)
            )
        # one that did not run when timed again is behind every one that did; then the
        # gates failed, not those passed: a dynamic recipe has one accuracy gate more
        return max(
            made,
            key=lambda c: (
                not c.error,
                c.accurate,
                -sum(not g.passed for g in c.accuracy),
                c.slowest,
            ),
        )

    def node_costs(self) -> list[NodeCost]:
        by_name = {c.name: c for c in self.candidates}
        costs = []
        for c in self.candidates:
            parent = by_name.get(c.parent or "")
            if parent is None or not c.added_fp32 or c.path is None:
                continue
            # The gate the round tried to fix: the parent's first failing accuracy gate.
            want = next((g.name for g in parent.accuracy if not g.passed), None)
            gate = next((g for g in c.accuracy if g.name == want), None) or (
                c.accuracy[0] if c.accuracy else None
            )
            before = next((g.value for g in parent.accuracy if gate and g.name == gate.name), 0.0)
            for node, score in c.added_fp32:
                costs.append(
                    NodeCost(
                        node=node,
                        sensitivity=score,
                        candidate=c.name,
                        speedup_before=parent.speedup,
                        speedup_after=c.speedup if c.speed else None,
                        accuracy_gate=gate.name if gate else "",
                        accuracy_before=before,
                        accuracy_after=gate.value if gate else 0.0,
                        nodes_in_round=len(c.added_fp32),
                    )
                )
        return costs


def _callers_exceptions_pass(search_fn: Callable[P, SearchResult]) -> Callable[P, SearchResult]:
    """``search_fn`` with an exception from its ``on_progress`` (a caller cancelling) ending
    it as it is: the search catches a recipe's failures, not the caller's. It travels past
    those handlers as a BaseException (``_CallerRaised``) and is raised again as it was."""

    @functools.wraps(search_fn)
    def search(*args: P.args, **kwargs: P.kwargs) -> SearchResult:
        if (report := kwargs.get("on_progress")) is not None:
            kwargs["on_progress"] = _guarded(report)  # type: ignore[arg-type]
        try:
            return search_fn(*args, **kwargs)
        except _CallerRaised as e:
            raise e.error from None

    return search


def _guarded(report: ProgressFn) -> ProgressFn:
    """``report``, its exceptions carried as ``_CallerRaised``."""

    def emit(task: str, done: int, total: int | None, status: str) -> None:
        try:
            report(task, done, total, status)
        except Exception as e:  # noqa: BLE001 - carried past the handlers of recipe failures
            raise _CallerRaised(e) from e

    return emit


class _CallerRaised(BaseException):
    """The caller's progress callback raised ``error``: a BaseException, so that no handler of
    a recipe's failure (``except Exception``) takes it for one."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


@_callers_exceptions_pass
def search(
    fp32: Path,
    calibration: DataSource,
    evaluation: DataSource,
    *,
    task: str,
    inputs: Sequence[TensorSpec],
    max_seq_len: int,
    workdir: Path,
    quant_cfg: QuantConfig | None = None,
    gate_cfg: GateConfig | None = None,
    unfused: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> SearchResult:
    """Try recipes within the budget; return every candidate and the fastest that passed.
    An exception from ``on_progress`` ends the search as the caller's."""
    emit = on_progress or no_progress
    quant_cfg = quant_cfg or QuantConfig()
    gate_cfg = gate_cfg or GateConfig()
    t0 = time.monotonic()
    reference = collect(fp32, evaluation, provider=gate_cfg.provider, threads=gate_cfg.threads)
    check_evaluation(reference, task)  # before minutes of quantization
    work = _Work(
        fp32=fp32, unfused=unfused, calibration=calibration, evaluation=evaluation,
        reference=reference, task=task, inputs=inputs, max_seq_len=max_seq_len,
        sample=next(evaluation.batches()).feeds, workdir=workdir, gate_cfg=gate_cfg, emit=emit,
    )  # fmt: skip
    queue = deque(_Attempt(r) for r in chosen_recipes(quant_cfg))
    candidates: list[Candidate] = []
    skipped: list[str] = []
    stopped = ""
    while queue:
        if candidates and not stopped:  # the first candidate always runs
            stopped = _out_of_room(len(candidates), quant_cfg, t0)
        if stopped:
            skipped += [a.name for a in queue]
            break
        attempt = queue.popleft()
        total = min(len(candidates) + len(queue) + 1, quant_cfg.max_candidates)
        emit("search", len(candidates), total, attempt.name)
        refinable = attempt.round < quant_cfg.max_keep_rounds
        worth_timing = functools.partial(_worth_timing, refinable, candidates, quant_cfg, t0)
        cand, qmodel = _try(work, attempt, len(candidates), worth_timing)
        candidates.append(cand)
        log.info(
            "candidate %s: %s (%s)",
            cand.name,
            "pass" if cand.passed else "fail",
            ", ".join(f"{g.name} {g.value:.4g}" for g in cand.gates) or cand.error,
        )
        if refinable and _worth_refining(cand, gate_cfg):
            # no room left for the retry: it is not worth its sensitivity scan, only a word
            stopped = _out_of_room(len(candidates), quant_cfg, t0)
            if stopped:
                which = "more of its" if attempt.round else "its"  # a retry's retry
                skipped.append(f"{cand.name} with {which} most sensitive nodes kept FP32")
                continue
            nodes = _sensitive_nodes(fp32, qmodel, calibration, cand, quant_cfg)
            if nodes:
                more = attempt.recipe.with_keep_fp32([n for n, _ in nodes])
                queue.appendleft(_Attempt(more, cand.name, nodes, attempt.round + 1))
    if stopped:
        log.info("search stopped after %.0f s, %s; not tried: %s",
                 time.monotonic() - t0, stopped, skipped)  # fmt: skip
    chosen, retimed = _confirmed(work, candidates)
    return SearchResult(
        candidates=tuple(candidates),
        chosen=chosen,
        seconds=time.monotonic() - t0,
        budget_s=quant_cfg.search_budget_s,
        max_candidates=quant_cfg.max_candidates,
        skipped=tuple(skipped),
        stopped=stopped,
        retimed=tuple(retimed),
    )


@dataclass(frozen=True)
class _Attempt:
    """A recipe the search will try: a starting recipe, or one that refines the candidate
    ``parent`` with the nodes ``added`` to FP32 (name, sensitivity) in its ``round``."""

    recipe: Recipe
    parent: str | None = None
    added: tuple[tuple[str, float], ...] = ()
    round: int = 0

    @property
    def name(self) -> str:
        keep = self.recipe.keep_fp32
        return self.recipe.name + (f"+fp32x{len(keep)}" if keep else "")


@dataclass(frozen=True)
class _Work:
    """What every candidate of one search is made from and gated against."""

    fp32: Path
    unfused: Path | None  # the FP32 graph before fusion, for recipes that quantize it
    calibration: DataSource
    evaluation: DataSource
    reference: Outputs  # FP32's outputs on ``evaluation``, computed once
    task: str
    inputs: Sequence[TensorSpec]
    max_seq_len: int
    sample: Feeds  # one evaluation batch: what the speed gates time
    workdir: Path
    gate_cfg: GateConfig
    emit: ProgressFn

    def timed(self, path: Path, on_timing: ProgressFn) -> tuple[TimingConditions, list[GateResult]]:
        """The speed gates of the INT8 model at ``path`` against FP32, with the machine's
        conditions they were timed under."""
        timing = TimingConditions.now(self.gate_cfg.threads, self.gate_cfg.provider)
        start = cpus.CpuTime.now()
        speed = speed_gates(
            self.fp32, path, self.inputs, self.max_seq_len, self.gate_cfg,
            sample=self.sample, on_progress=on_timing, conditions=timing,
        )  # fmt: skip
        return timing.measured(start), speed


# Winners timed again, at most, before the search gives up on shipping one: each is a
# full speed measurement, after the search's budget was checked.
CONFIRMATIONS = 3


def _confirmed(
    work: _Work, candidates: list[Candidate]
) -> tuple[Candidate | None, list[Candidate]]:
    """The candidate that ships, and the winners timed again to choose it: the fastest that
    passed, timed again (``_confirm``); where that measurement fails its gates, the next
    fastest, up to ``CONFIRMATIONS``. None where none holds."""
    chosen, retimed = None, []
    winners = sorted((c for c in candidates if c.passed), key=lambda c: -c.speedup)
    # timing the winners again is one more step of the search, said with its time (the last
    # candidate's time was charged with it)
    steps = len(candidates) + (1 if winners else 0)
    for cand in winners[:CONFIRMATIONS]:
        work.emit("search", len(candidates), steps, f"timing {cand.name} again")
        retimed.append(_confirm(work, cand))
        if retimed[-1].passed:
            chosen = retimed[-1]
            break
    # the bars of the last candidate's calibration and timing stay; this one says who won
    if chosen is not None:
        done = f"done: {chosen.name} ships"
    elif winners:
        done = f"done: {len(retimed)} passed in the search, none when timed again"
    else:
        done = "done: no candidate passed"
    work.emit("search", steps, steps, done)
    return chosen, retimed


def _confirm(work: _Work, cand: Candidate) -> Candidate:
    """``cand`` with its speed gates timed again, after and apart from the search that chose
    it. The fastest of several noisy measurements overstates its candidate (six candidates
    of a true 1.25x: the fastest measured 1.32x on average, in a simulation of the speed
    gate); a second measurement of the one chosen does not, and it is the one that ships.
    A failure to time it fails it, as in the search."""

    def on_timing(task: str, done: int, total: int | None, status: str) -> None:
        work.emit(task, done, total, f"{cand.name}: again, {status}")

    assert cand.path is not None  # it passed
    try:
        timing, speed = work.timed(cand.path, on_timing)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types
        raise_if_full(e, work.workdir, f"timing INT8 recipe {cand.name} again")
        why = f"timed again, the INT8 model did not run: {e}"
        # its speed gates fail with it: kept as the search measured them, they passed, and a
        # bundle shipping it as the closest to passing said pass
        failed = tuple(
            replace(
                g, passed=False, detail=f"{why} (the search measured {g.value:.4g}): {g.detail}"
            )
            for g in cand.speed
        )
        return replace(cand, speed=failed, error=why)
    searched = {g.name: g.value for g in cand.speed}
    speed = [
        replace(g, detail=f"timed again as a winner of the search (the search measured "
                f"{searched[g.name]:.4g}): {g.detail}")
        for g in speed
    ]  # fmt: skip
    log.info("candidate %s timed again: %s", cand.name,
             ", ".join(f"{g.name} {searched[g.name]:.4g} -> {g.value:.4g}" for g in speed))  # fmt: skip
    return replace(cand, speed=tuple(speed), timing=timing)


def chosen_recipes(quant_cfg: QuantConfig) -> list[Recipe]:
    """The recipes the search tries, best first: this CPU's (``default_recipes``), only
    those ``quant_cfg.recipes`` names where it names any; a ConfigError for a name that is
    not one of them."""
    from quantgate.quantize.recipes import default_recipes

    recipes = list(default_recipes())
    if not quant_cfg.recipes:
        return recipes
    names = [r.name for r in recipes]
    unknown = [n for n in quant_cfg.recipes if n not in names]
    if unknown:
        raise ConfigError(
            f"unknown recipe(s) {', '.join(unknown)}; this CPU's are, best first: "
            f"{', '.join(names)}"
        )
    return [r for r in recipes if r.name in quant_cfg.recipes]


def _try(
    work: _Work, attempt: _Attempt, index: int, worth_timing: Callable[[], bool]
) -> tuple[Candidate, Any]:
    """Quantize ``attempt``'s recipe and gate the candidate: accuracy, then speed, unless it
    failed accuracy and ``worth_timing()`` says its speed would serve nothing (a fifth of an
    export's time, on MiniLM, went to timing such a last try). The candidate, and the
    quantized model where there is one (its sensitivity refines it)."""
    from quantgate.quantize.recipes import quantize

    name, recipe, gate_cfg = attempt.name, attempt.recipe, work.gate_cfg
    out = work.workdir / f"candidate-{index:02d}.int8.onnx"

    def on_rows(done: int) -> None:
        work.emit("calibration", done, work.calibration.samples, name)

    t = time.monotonic()
    try:
        qm = quantize(
            work.fp32, recipe, Counted(work.calibration, on_rows), out, unfused_model=work.unfused
        )
    except Exception as e:  # noqa: BLE001 - one recipe's crash must not end the search
        raise_if_full(e, work.workdir, f"INT8 recipe {name}")  # ...but a full disk ends all
        if not isinstance(e, QuantizeError):
            log.exception("recipe %s crashed", name)
        msg = str(e) if isinstance(e, QuantizeError) else f"{type(e).__name__}: {e}"
        quiet = isinstance(e, NothingToQuantize)  # not this graph's recipe: no alarm
        return _failed(attempt, msg, time.monotonic() - t, quiet=quiet), None

    def on_timing(task: str, done: int, total: int | None, status: str) -> None:
        work.emit(task, done, total, f"{name}: {status}")

    try:  # FP32 ran on the same data: a failure here is the INT8 model's
        got = collect(
            qm.path, work.evaluation, provider=gate_cfg.provider, threads=gate_cfg.threads
        )
        # Static recipes fix their scales at calibration: a row cannot move another's answer.
        consistency = (
            batch_consistency(qm.path, work.evaluation, work.task, gate_cfg)
            if recipe.method == "dynamic"
            else None
        )
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; the search goes on
        return _did_not_run(work, e, attempt, t), None
    accuracy = accuracy_gates(work.reference, got, work.task, gate_cfg)
    if consistency is not None:
        accuracy.append(consistency)
    timing: TimingConditions | None = None
    speed: list[GateResult] = []
    if all_passed(accuracy) or worth_timing():
        try:
            timing, speed = work.timed(qm.path, on_timing)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; the search goes on
            return _did_not_run(work, e, attempt, t), None
    else:
        log.info("candidate %s failed accuracy and nothing can refine it: not timed", name)
    return (
        Candidate(
            name=name,
            recipe=recipe.to_dict(),
            method=recipe.method,
            path=qm.path,
            accuracy=tuple(accuracy),
            speed=tuple(speed),
            kept_fp32=tuple(recipe.keep_fp32),
            added_fp32=attempt.added,
            parent=attempt.parent,
            quantize_s=qm.seconds,
            timing=timing,
        ),
        qm,
    )


def _did_not_run(work: _Work, e: Exception, attempt: _Attempt, started: float) -> Candidate:
    """The candidate whose gating failed in ONNX Runtime with ``e`` (a full disk ends the
    search instead)."""
    raise_if_full(e, work.workdir, f"gating INT8 recipe {attempt.name}")
    msg = f"the INT8 model does not run in ONNX Runtime: {e}"
    return _failed(attempt, msg, time.monotonic() - started)


def _failed(attempt: _Attempt, error: str, seconds: float, *, quiet: bool = False) -> Candidate:
    """The candidate of a recipe that produced no model to gate (``quiet``: one with
    nothing to quantize in this graph, said at INFO: others may quantize it)."""
    log.log(logging.INFO if quiet else logging.WARNING, "recipe %s failed: %s", attempt.name, error)
    recipe = attempt.recipe
    return Candidate(
        name=attempt.name,
        recipe=recipe.to_dict(),
        method=recipe.method,
        path=None,
        kept_fp32=recipe.keep_fp32,
        added_fp32=attempt.added,
        parent=attempt.parent,
        quantize_s=seconds,
        error=error,
    )


def _worth_timing(refinable: bool, candidates: list[Candidate], qc: QuantConfig, t0: float) -> bool:
    """For a candidate that failed accuracy, asked once it has: its speed is wanted to refine
    it (in a ``refinable`` round, with room left for one more candidate), or to rank it
    against the others where none has passed (``SearchResult.best``)."""
    room = not _out_of_room(len(candidates) + 1, qc, t0)
    return (refinable and room) or not any(c.passed for c in candidates)


def _out_of_room(made: int, qc: QuantConfig, t0: float) -> str:
    """Why the search, started at ``t0`` with ``made`` candidates made, may make no more;
    "" while it may."""
    if made >= qc.max_candidates:
        return f"the limit of {qc.max_candidates} candidate(s) was reached"
    if time.monotonic() - t0 > qc.search_budget_s:
        return f"the {qc.search_budget_s:g} s budget was spent"
    return ""


def _worth_refining(c: Candidate, gc: GateConfig) -> bool:
    """Inaccurate but fast: keeping a few nodes FP32 may save it. Slow: it cannot."""
    if c.path is None or c.accurate:
        return False
    return bool(c.speed) and c.slowest >= gc.min_speedup


def _sensitive_nodes(fp32, qmodel, calibration, cand, qc: QuantConfig):
    from quantgate.quantize.sensitivity import node_sensitivity

    feeds, rows = [], 0
    for f in calibration():
        feeds.append(f)
        rows += len(next(iter(f.values())))
        if rows >= qc.sensitivity_samples:
            break
    try:
        ranked = node_sensitivity(fp32, qmodel, feeds, top_k=qc.sensitivity_top_k * 2)
    except Exception as e:  # noqa: BLE001 - no sensitivity: the search goes on without it
        log.warning("sensitivity of %s failed: %s", cand.name, e)
        return ()
    fresh = [(n, float(s)) for n, s in ranked if n not in cand.kept_fp32]
    return tuple(fresh[: qc.sensitivity_top_k])


__all__ = ["Candidate", "NodeCost", "QuantConfig", "SearchResult", "chosen_recipes", "search"]
