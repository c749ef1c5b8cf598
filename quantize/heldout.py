"""Held-out evaluation data: evaluation rows told from calibration rows by their content.

Every row is known by a hash of the token ids the model sees (``row_hash``, of what
``data.row_hashes`` picks), so the same row is the same hash in any file, format or
position. ``check_held_out`` compares evaluation rows with calibration rows by those hashes:
at export with the calibration source itself, at a re-gate with the ``Fingerprint`` of them
that the manifest keeps.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quantgate.errors import DataError
from quantgate.quantize.stats import wilson

if TYPE_CHECKING:
    from quantgate.quantize.data import DataSource, ModelInfo

log = logging.getLogger(__name__)

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


def row_hash(ids: np.ndarray) -> int:
    """A row's hash (blake2b, 8 bytes) of its token ids without padding, as little-endian
    int64 (``data.row_hashes`` and the text scan pick them)."""
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
        r: Any = (calibration or {}).get(FINGERPRINT)
        try:
            raw = base64.b64decode(r["hashes"], validate=True)
            hashes = np.sort(np.frombuffer(raw, dtype=">u8").astype(np.uint64))
            rows = int(r["rows"])
        except (KeyError, TypeError, ValueError):  # none, or not one this module wrote
            return None
        if len(hashes) > rows or (len(hashes) == 0 and rows > 0):
            return None
        return cls(hashes, rows)


def distinct_rows(evaluation: DataSource, model: ModelInfo, *, where: str) -> DataSource:
    """``evaluation`` with each row once: a row repeated (every input alike) would count as
    more evidence than it is, narrowing the gates' intervals (a file repeated three times
    passed a gate its rows failed). Warned about; unchanged where no two rows share their
    token ids (``row_hashes``, known before any pass), or where those are not known."""
    from quantgate.quantize.data import without_rows

    hashes = evaluation.row_hashes
    if hashes is None or len(np.unique(hashes)) == len(hashes):
        return evaluation
    distinct = without_rows(evaluation, model, repeats=True)
    repeated = evaluation.samples - distinct.samples
    if not repeated:  # alike in their ids, not in another input
        return evaluation
    relabelled = distinct.relabelled
    log.warning(
        "%s: %d of its %d rows repeat an earlier row; each row is gated once (%d rows): a "
        "repeated row is no new evidence%s",
        where,
        repeated,
        evaluation.samples,
        distinct.samples,
        f"; {relabelled} of them carry another label than a copy before them (one copy is "
        "gated, with its label): check the labels of repeated rows"
        if relabelled
        else "",
    )
    return dataclasses.replace(
        distinct,
        repeated=repeated,
        description=f"{evaluation.description}; {repeated} repeated rows left out",
    )


def check_held_out(
    evaluation: DataSource,
    calibration: Fingerprint | None,
    *,
    model: ModelInfo,
    where: str,
    calibrated_on: str,
) -> DataSource:
    """``evaluation`` without its rows that are also calibration rows (the same
    ``row_hashes``), their count in its record and description: gates measured on rows the
    INT8 ranges were fitted to would pass a model that fails on new data. DataError when
    they are ``MAX_SHARED`` of its rows or more (the files overlap: a mistake to fix); a
    warning when fewer. ``where`` and ``calibrated_on`` name the two data for messages.
    Unchanged where either side's hashes are not known. From a sample of the calibration
    rows' hashes (a re-gate's), the rows it can tell are left out, the others stay.
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
        counts = f"{shared} of {n} evaluation rows ({share:.0%})"
    else:
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
    from quantgate.quantize.data import without_rows

    held_out = without_rows(evaluation, model, drop=calibration.hashes)
    left_out = evaluation.samples - held_out.samples
    # From a sample, only the rows whose hash falls in its range can be told: about as many
    # again, in proportion, stay among the others
    unseen = 0 if calibration.complete else max(round(share * n) - left_out, 0)
    stay = f"; about {unseen} more it cannot tell stay in them" if unseen else ""
    log.warning(
        "%s. So few can be natural duplicates (short, common texts); the %d it can tell are "
        "left out of the gates, which measure the other %d rows%s, and the report says how "
        "many.",
        what,
        left_out,
        held_out.samples,
        stay,
    )
    about = f" (about {unseen} more not told)" if unseen else ""
    return dataclasses.replace(
        held_out,
        in_calibration=left_out,
        description=f"{evaluation.description}; {left_out} calibration rows left out{about}",
    )


__all__ = [
    "FINGERPRINT",
    "MAX_SHARED",
    "Fingerprint",
    "check_held_out",
    "distinct_rows",
    "row_hash",
]
