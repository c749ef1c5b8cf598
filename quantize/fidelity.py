"""Fidelity against FP32 output by output: the ``cosine:<output>`` gates of any variant.

``Fidelity.measure`` compares a candidate's outputs with FP32's on the same rows, batch by
batch: per output, the cosine of every row (a batch item flattened over its real tokens,
``flat_rows``), the max and mean abs error, the NaN/inf count, and, for an output of one
value per row, the values themselves. ``Fidelity.gates`` turns them into gates: the mean
cosine and its tail, or R² where a row holds one value (``r2_gate``, at the R² that stands
for the cosine threshold, ``r2_threshold``). INT8's other outputs, the FP16 variant and the
CUDA re-gates are all judged by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from quantgate.bundle import GateResult
from quantgate.errors import QuantizeError
from quantgate.quantize.decide import GateConfig, interval_gate, mean_gate, tail_gate
from quantgate.quantize.stats import percentile_interval, r_squared, resamples
from quantgate.tasks import token_scores


def flat_rows(x: np.ndarray, mask: np.ndarray | None, *, tokens: bool = False) -> np.ndarray:
    """(B, rest): each batch item of output ``x`` flattened, its padded positions zeroed
    where ``mask`` (B, T) fits x's first two dims (``mask_fits``), so padding noise does
    not count."""
    if mask_fits(mask, x, tokens=tokens):
        x = np.where(mask.astype(bool)[(...,) + (None,) * (x.ndim - 2)], x, 0)
    return x.reshape(len(x), -1)


def mask_fits(
    mask: np.ndarray | None, x: np.ndarray, *, tokens: bool = False
) -> TypeGuard[np.ndarray]:
    """Whether ``mask`` (B, T) marks the positions of output ``x`` (B, T, ...): one of three
    or more dims, or of two where the output is known to score each token (``tokens``: a
    question answerer's start and end scores). Another (B, n) output holds n values of a
    row, not n tokens, even where n happens to be T."""
    return mask is not None and x.ndim >= (2 if tokens else 3) and x.shape[:2] == mask.shape


# A row whose norm is below this share of the typical (median) row's norm has no direction
# worth a cosine: float error alone turns it any way.
NEGLIGIBLE_NORM = 1e-6


def row_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine of each row of FP32's ``x`` with the same row of the candidate's ``y``; -1
    where either is not finite. A row that is zero, or negligible, in both (below
    ``NEGLIGIBLE_NORM`` of FP32's median row norm) agrees: 1. One negligible in FP32 alone,
    where the candidate's is not, has no direction to agree with: -1."""
    return _cosines(*_row_products(x, y))


def _row_products(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3, N): each row's norm in ``x``, in ``y``, and their dot product, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1), (x * y).sum(axis=1)


def _cosines(nx: np.ndarray, ny: np.ndarray, dot: np.ndarray) -> np.ndarray:
    """``row_cosine`` of rows given by their norms and dot products: the negligible norm
    is read from all of them at once (the rows of every batch: a batch of short rows alone
    would have its own, smaller, median)."""
    sized = nx[np.isfinite(nx) & (nx > 0)]
    tiny = NEGLIGIBLE_NORM * float(np.median(sized)) if len(sized) else 0.0
    negligible = (nx <= tiny) & (ny <= tiny)
    alone = (nx <= tiny) & ~negligible  # the candidate's direction is no FP32's
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(negligible, 1.0, np.where(alone, -1.0, dot / (nx * ny)))
    return np.nan_to_num(cos, nan=-1.0, posinf=-1.0, neginf=-1.0)


@dataclass(frozen=True)
class Fidelity:
    """A candidate's outputs against FP32's on the same rows, output by output: the one source
    of the ``cosine:<output>`` gates, whichever variant (INT8, FP16) and provider they are for."""

    max_abs_diff: dict[str, float]  # per output
    mean_abs_diff: dict[str, float]
    rows: int  # batch items compared
    provider: str | None  # where the candidate ran; None: where the gates run (cfg.provider)
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf count per output
    # Per output, the cosine of every row, (rows,): what the interval of the mean resamples,
    # and what cosine_mean and cosine_min are taken from.
    cosines: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    # Per output of one value per row (a score, a regression's prediction): FP32's and the
    # candidate's values, (2, rows). Such a row's cosine is only the sign of the product.
    scalars: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def cosine_mean(self) -> dict[str, float]:
        """Per output: the cosine of each row (batch item), averaged."""
        return {n: float(c.mean()) for n, c in self.cosines.items()}

    @property
    def cosine_min(self) -> dict[str, float]:
        """Per output: the cosine of the worst row."""
        return {n: float(c.min()) for n, c in self.cosines.items()}

    @classmethod
    def measure(
        cls,
        batches: Iterable[tuple[Mapping[str, Any], Mapping[str, Any], np.ndarray | None]],
        names: Sequence[str],
        *,
        provider: str | None = None,
    ) -> Fidelity:
        """Compare the outputs ``names`` over ``batches`` of (FP32 outputs, candidate outputs,
        attention mask or None). A question answerer's (batch, sequence) start and end
        scores (``tasks.token_scores``) count per token too: the mask zeroes their padded
        positions (``mask_fits``), for INT8, FP16 and CUDA alike.

        Rows are batch items: an output (batch, ...) is flattened per item, its padded
        positions zeroed where the mask is (batch, sequence) and the output (batch, sequence,
        ...), so padding noise does not count (``flat_rows``). NaN/inf are counted over the
        whole candidate output, padding included (a NaN times a mask of 0 is still NaN), but
        for a -inf where FP32 has one too: a masked score (a question's tokens, or padding,
        set to -inf by the model) is no fault, and is left out of the row's cosine and
        errors, as the classifier gates' ``_broken`` leaves it out.
        """
        seen = {n: _Tally() for n in names}
        tokens = token_scores(names)
        rows = 0
        for reference, candidate, mask in batches:
            for n in names:
                x, y = np.asarray(reference[n]), np.asarray(candidate[n])
                seen[n].add(n, x, y, mask, tokens=n in tokens)
            rows += len(reference[names[0]])
        if not rows:
            raise QuantizeError("fidelity needs at least one feed")
        return cls(
            max_abs_diff={n: float(np.max(s.max_abs)) for n, s in seen.items()},
            mean_abs_diff={n: s.sum_abs / max(s.values, 1) for n, s in seen.items()},
            rows=rows,
            provider=provider,
            nonfinite={n: s.nonfinite for n, s in seen.items()},
            cosines={n: _cosines(*np.concatenate(s.products, 1)) for n, s in seen.items()},
            # one value per row in every batch (a (batch, sequence) output is not, even where a
            # batch holds one token)
            scalars={n: np.concatenate(s.scalars, 1) for n, s in seen.items() if s.scalar},
        )

    def gates(
        self,
        *,
        min_cosine: float,
        cfg: GateConfig | None = None,
    ) -> tuple[GateResult, ...]:
        """The accuracy gates of outputs without labels, ``cosine:<output>`` and
        ``cosine_tail:<output>`` per output; ``r2:<output>`` for an output of one value per
        row, which has no cosine.

        The first passes when the mean per-row cosine is >= ``min_cosine`` and the output has
        no NaN/inf; the second when the share of rows below ``cfg.tail_cosine`` is at most
        ``cfg.max_tail_share``; R² (``r2_gate``) when it is >= 1 - 2 (1 - ``min_cosine``).
        ``min_cosine`` is the variant's threshold (``GateConfig.min_cosine`` for INT8's
        outputs, ``QuantConfig.fp16_min_cosine`` for FP16's): ``cfg``'s is not read. Their
        intervals over rows, and the rule that decides with them, are ``cfg``'s (the defaults
        when None). The max abs difference is told in the detail, not gated: its scale is the
        output's own.
        """
        cfg = cfg or GateConfig()
        where = f"vs FP32 on {self.rows} rows" + (f", {self.provider}" if self.provider else "")
        gates = []
        for name, cosines in self.cosines.items():
            bad = self.nonfinite.get(name, 0)
            if name in self.scalars:
                x, y = self.scalars[name]
                gates.append(r2_gate(f"r2:{name}", x, y, min_cosine, cfg, where, self.provider))
            else:
                detail = (
                    f"{where}; mean cosine per row (worst row {cosines.min():.5f}), max abs "
                    f"{self.max_abs_diff[name]:.3g}, mean abs {self.mean_abs_diff[name]:.3g}"
                    + (f", {bad} non-finite values" if bad else "")
                )
                gates += [
                    mean_gate(f"cosine:{name}", cosines, min_cosine, ">=", cfg, detail,
                               valid=not bad, provider=self.provider),
                    tail_gate(f"cosine_tail:{name}", cosines, cfg, where, provider=self.provider),
                ]  # fmt: skip
        return tuple(gates)


def r2_threshold(min_cosine: float) -> float:
    """The R² that stands for a cosine of ``min_cosine``: 1 - 2 (1 - c), the same squared
    error relative to the output's size (0.98 for 0.99)."""
    return 1 - 2 * (1 - min_cosine)


def cosine_of_r2(threshold: float) -> float:
    """``r2_threshold`` undone: the cosine an R² threshold was made from."""
    return 1 - (1 - threshold) / 2


def r2_gate(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    min_cosine: float,
    cfg: GateConfig,
    where: str,
    provider: str | None = None,
) -> GateResult:
    """The gate of an output with one value per row: R² of the candidate's values ``y``
    against FP32's ``x`` over the rows, at least 1 - 2 (1 - ``min_cosine``): the squared
    error relative to FP32's spread that a cosine of ``min_cosine`` allows relative to a
    vector's length (0.98 for 0.99), and stricter, as the spread leaves out the mean. Its
    interval is a bootstrap over the rows; none where the resamples that hold one value only
    (R² undefined: the worst) reach its lower tail, as a few rows or a two-valued output
    can."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    threshold = r2_threshold(min_cosine)
    nonfinite = int((~np.isfinite(y)).sum())
    value = float(r_squared(x, y)) if len(x) else math.nan
    valid = not nonfinite and math.isfinite(value) and len(x) > 1
    ci = None
    if valid:
        stats = np.concatenate(
            [
                r_squared(x[rows], y[rows])
                for rows in resamples(len(x), count=cfg.bootstrap, seed=cfg.seed)
            ]
        )
        # an undefined resample counts as the worst R²; where they reach the lower tail, the
        # interval's lower end is undefined too (dropping them narrowed it)
        if (~np.isfinite(stats)).mean() < (1 - cfg.confidence) / 2:
            lo, hi = percentile_interval(
                np.where(np.isfinite(stats), stats, -np.inf), cfg.confidence
            )
            ci = (lo, hi) if math.isfinite(lo) else None  # -inf, or NaN from interpolating it
    constant = " (FP32's value is the same on every row)" if len(x) and np.ptp(x) == 0 else ""
    spread = float(np.std(x)) if len(x) else 0.0
    size = float(np.mean(np.abs(x))) if len(x) else 0.0
    barely = (
        f"; FP32's values barely vary over these rows (std {spread:.3g} against a mean size "
        f"of {size:.3g}), and R² weighs the error against that spread: judge it on rows the "
        "model tells apart"
        if 0 < spread < 1e-3 * size
        else ""
    )
    detail = (
        f"{where}; one value per row: R² of the candidate's values against FP32's, 1 - "
        f"residual / FP32's variance{constant}, max abs {np.abs(y - x).max(initial=0):.3g}, "
        f"FP32's std over the rows {spread:.3g}{barely}"
        + (f", {nonfinite} non-finite values" if nonfinite else "")
        + ("; R² needs 2 rows or more" if len(x) < 2 else "")
        + (
            f"; {cfg.confidence:.0%} bootstrap interval over rows ({cfg.bootstrap} resamples)"
            if ci
            else ""
        )
    )
    return interval_gate(
        name, value, ci, threshold, ">=", cfg, detail, valid=valid, provider=provider
    )


class _Tally:
    """One output compared batch by batch (``Fidelity.measure``): what its row cosines are
    made of, its values where a row holds one, and its absolute errors and NaN/inf as
    running totals."""

    def __init__(self):
        self.products: list[np.ndarray] = []  # (3, B) per batch: ``_row_products``
        self.scalars: list[np.ndarray] = []  # (2, B) per batch: FP32's and the candidate's
        self.scalar = True  # whether every batch so far holds one value per row
        self.max_abs: list[float] = []  # per batch; NaN when a real value is NaN
        self.sum_abs = 0.0
        self.values = 0
        self.nonfinite = 0

    def add(
        self, name: str, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None, *, tokens: bool
    ) -> None:
        if x.shape != y.shape:
            raise QuantizeError(f"output {name!r}: FP32 shape {x.shape}, candidate {y.shape}")
        masked = np.isneginf(x) & np.isneginf(y)  # a score both mask: no fault, no error
        self.nonfinite += int((~np.isfinite(y) & ~masked).sum())
        if masked.any():
            x, y = np.where(masked, 0, x), np.where(masked, 0, y)
        if mask_fits(mask, x, tokens=tokens):
            real = int(mask.astype(bool).sum()) * math.prod(x.shape[2:])
        else:
            real = x.size
        x = flat_rows(x, mask, tokens=tokens).astype(np.float64)
        y = flat_rows(y, mask, tokens=tokens).astype(np.float64)
        self.products.append(np.stack(_row_products(x, y)))
        self.scalar &= x.shape[1] == 1  # one value per row
        if self.scalar:
            self.scalars.append(np.stack([x[:, 0], y[:, 0]]))
        diff = np.abs(x - y)  # (B, rest), 0 at padded positions
        self.max_abs.append(float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.values += real  # the mean is over real positions, not padding's zeros


__all__ = [
    "Fidelity",
    "cosine_of_r2",
    "flat_rows",
    "mask_fits",
    "r2_gate",
    "r2_threshold",
    "row_cosine",
]
