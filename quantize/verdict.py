"""A bundle's verdict, in words: which gates failed, by how much, and their likely causes.

``passed_bundle`` is the end of a build and of a re-gate alike: the bundle as written, or
``GateFailed`` with ``failure_message``: every failed gate with its value and threshold, then
what is likely to have caused the INT8 variant's failures (a search stopped early, a
candidate whose speed did not hold when timed again, a small calibration set, evaluation
rows much longer than the calibration's) and where the thresholds in force came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.bundle import PASS, Bundle, GateResult, Manifest, load
from quantgate.errors import GateFailed, QuantgateError
from quantgate.quantize.data import MIN_CALIBRATION_ROWS
from quantgate.quantize.decide import GateConfig, failed_by_bound

if TYPE_CHECKING:
    from quantgate.quantize.search import SearchResult


def passed_bundle(
    path: Path,
    search: SearchResult | None = None,
    *,
    verify: bool = True,
    replaced: Manifest | None = None,
) -> Bundle:
    """The bundle written at ``path`` (its files verified unless ``verify`` is False: a
    re-gate verified them before it measured, and rewrote only the manifest and report);
    ``GateFailed`` unless every gate of every variant passed. ``search``: the recipe search
    of a build, which the message names where it stopped early; ``replaced``: the manifest
    of the bundle the build replaced, which the message names where it had passed."""
    bundle = load(path, verify=verify)
    if bundle.manifest.verdict != PASS:
        message = failure_message(bundle.manifest, path, search)
        if replaced is not None and replaced.verdict == PASS:
            message += (
                f"\nIt replaced the bundle there that had passed its gates (written "
                f"{replaced.created or 'by an earlier export'}), which serve would have served."
            )
        raise GateFailed(message, bundle_path=str(path))
    return bundle


def manifest_at(path: Path) -> Manifest | None:
    """The manifest of the bundle at ``path``, where one can be read; else None."""
    try:
        return load(path, verify=False).manifest
    except QuantgateError:
        return None


def failure_message(manifest: Manifest, where, search: SearchResult | None = None) -> str:
    """Which gates failed, by how much; and, where the INT8 variant failed, what is likely to
    be the cause: a search stopped before it tried every recipe, a small calibration set."""
    bad = [(v.precision, g) for v in manifest.variants for g in v.gates if not g.passed]
    lines = [
        f"{precision} {g.label} = {g.value:.4g}, required {g.op} {g.threshold:g}"
        + (f" (interval {g.ci[0]:.4g}..{g.ci[1]:.4g})" if g.ci else "")
        + (
            f": its {bound} is not, and ci_rule 'upper' decides by it (more rows narrow it)"
            if (bound := failed_by_bound(g))
            else ""
        )
        for precision, g in bad
    ]
    int8 = [g for precision, g in bad if precision == "int8"]
    # Calibration explains failed accuracy gates of a calibrated (static) INT8 only, and
    # not its batch_* gates, which measure dynamic scaling.
    calibrated = any(v.precision == "int8" and not v.dynamic for v in manifest.variants)
    inaccurate = calibrated and any(
        not g.is_speed and not g.name.startswith("batch_") for g in int8
    )
    causes = [  # the likelier first: a recipe not tried cannot mend a calibration's noise
        *(_did_not_hold(search) if int8 and search is not None else []),
        *(_few_calibration_rows(manifest) if inaccurate else []),
        *(_longer_than_calibrated(manifest) if inaccurate else []),
        *(_stopped_early(search) if _beatable(int8) and search is not None else []),
        *_thresholds_origin(manifest),
    ]
    return (
        f"{len(bad)} gate(s) failed; the bundle at {where} is written and marked failed "
        "(see its report.md):\n"
        + "\n".join(f"  - {line}" for line in lines)
        + "".join(f"\n{cause}" for cause in causes)
    )


def _did_not_hold(search: SearchResult) -> list[str]:
    """Where candidates passed in the search but not when timed again: their speed is at the
    threshold, within the machine's noise."""
    if search.chosen is not None or not search.retimed:
        return []
    return [
        f"{len(search.retimed)} candidate(s) passed every gate in the search but not when "
        "timed again: "
        + "; ".join(
            f"{c.name} {', '.join(f'{g.name} {g.value:.3g}' for g in c.speed if not g.passed)}"
            for c in search.retimed
        )
        + ". Their speed is at the threshold, within this machine's noise."
    ]


def _beatable(failed: list[GateResult]) -> bool:
    """Whether another recipe could pass the INT8 gates that ``failed``: not where each is
    a share (an agreement) at 1, every row agreeing, failed on its interval's bound alone,
    which then depends on the number of rows only: more evaluation rows can pass it. (Not a
    drop at 0: its interval widens with the rows that flipped both ways, which another
    recipe may flip fewer of.)"""
    return any(not _unbeatable(g) for g in failed)


def _unbeatable(g: GateResult) -> bool:
    at_best = g.op == ">=" and g.value >= 1 and g.threshold <= 1
    return not g.is_speed and at_best and failed_by_bound(g) is not None


def _stopped_early(search: SearchResult) -> list[str]:
    """What to raise when the search stopped before trying every recipe: one not tried may
    pass (and a time budget stops it sooner on a loaded machine)."""
    if not search.skipped:
        return []
    by_count = search.max_candidates and len(search.candidates) >= search.max_candidates
    raise_it = (
        f"--max-candidates (now {search.max_candidates})"
        if by_count
        else f"--search-budget (now {search.budget_s:g} s; this search took {search.seconds:.0f} s)"
    )
    return [
        f"The search stopped early: {search.stopped}, with {len(search.skipped)} recipe(s) not "
        f"tried ({', '.join(search.skipped)}), and one of them may pass. Raise {raise_it} to try "
        "them."
    ]


def _few_calibration_rows(manifest: Manifest) -> list[str]:
    """The likely cause of failed INT8 accuracy gates where fewer than MIN_CALIBRATION_ROWS
    rows calibrated the model."""
    rows = (manifest.calibration or {}).get("samples")
    if not isinstance(rows, int) or rows >= MIN_CALIBRATION_ROWS:
        return []
    return [
        f"The INT8 model was calibrated on only {rows} row(s), fewer than "
        f"{MIN_CALIBRATION_ROWS}: activation ranges taken from so few rows are noise, a likely "
        "cause of its failed accuracy gates. Calibrate on a few hundred rows like those the "
        "model will serve (--calibration) and export again."
    ]


def _thresholds_origin(manifest: Manifest) -> list[str]:
    """Where the thresholds in force came from, when a re-gate set them (not the build): a
    re-gate keeps the last gating's settings, which a user may have forgotten setting."""
    regates = [r for r in manifest.extra.get("regates") or [] if isinstance(r, dict)]
    build = (manifest.extra.get("quantization") or {}).get("gate_config")

    default = GateConfig()

    def policy(config: Any) -> dict:  # a setting added since a record was written: its default
        if not isinstance(config, dict):
            return {}
        return {k: config.get(k, getattr(default, k)) for k in POLICY}

    if not regates or policy(regates[-1].get("gate_config")) == policy(build):
        return []
    since = regates[-1]
    for record in reversed(regates[:-1]):
        if policy(record.get("gate_config")) != policy(since.get("gate_config")):
            break
        since = record
    if since is regates[-1]:  # this re-gate's own flags set them: nothing to remind
        return []
    return [
        f"The thresholds are those set by the re-gate of {since.get('at')} (a re-gate keeps "
        "the last gating's; its flags or --gate-config change them)."
    ]


# What a bundle's gating stands for, and so what a re-gate keeps from the last one: the
# thresholds, how an interval decides, and the shapes a user serves. How a machine measures
# (provider, threads, iterations, warm-up, resamples, the eval_samples cap) is the re-gate's
# own: a re-gate on CUDA must not make the next one, on a CPU runner, ask for CUDA.
POLICY = (
    "max_accuracy_drop",
    "min_speedup",
    "min_cosine",
    "tail_cosine",
    "max_tail_share",
    "min_top1_agreement",
    "max_kl",
    "ci_rule",
    "confidence",
    "batch_sizes",
    "seq_len",
    "max_answer_tokens",
    "null_answer",
)


# Evaluation rows this many times longer than the longest calibration row were judged on
# activations the calibration never saw (attention over more positions, later position
# embeddings): say so where the INT8 accuracy gates fail.
LONGER_THAN_CALIBRATED = 2


def much_longer(cal_longest: int, ev_longest: int) -> bool:
    """Whether evaluation rows run ``LONGER_THAN_CALIBRATED`` times the longest calibrated
    row (the one rule for the build's warning and the failure's likely cause)."""
    return bool(cal_longest) and ev_longest >= LONGER_THAN_CALIBRATED * cal_longest


def _longer_than_calibrated(manifest: Manifest) -> list[str]:
    """A likely cause of failed INT8 accuracy gates: evaluation rows (the newest re-gate's,
    else the build's) much longer than any row the model was calibrated on."""
    cal = manifest.calibration or {}
    regates = manifest.extra.get("regates") or []
    ev = (regates[-1] if regates else cal).get("evaluation") or {}
    try:
        (_, cal_longest), (_, ev_longest) = cal["lengths"], ev["lengths"]
    except (KeyError, TypeError, ValueError):  # an older bundle's record: nothing to compare
        return []
    if not much_longer(cal_longest, ev_longest):
        return []
    return [
        f"The evaluation rows run to {ev_longest} tokens, the calibration rows only to "
        f"{cal_longest}: the INT8 activation ranges were calibrated on shorter sequences than "
        "it was judged on, a likely cause of its failed accuracy gates. Calibrate on rows of "
        "the lengths the model will serve (--calibration) and export again."
    ]


__all__ = ["LONGER_THAN_CALIBRATED", "POLICY", "failure_message", "much_longer", "passed_bundle"]
