"""What a label means for a model: one of its classes, by index or by name.

A model's class names are a tuple by index (``ModelInfo.labels``: a classifier's id2label,
the digits '0'..'9'), empty where its export recorded none; every function here takes it.

- An index is an integer inside the model's classes (0..n-1), or any integer >= 0 that
  fits int64 where the model names none.
- A name is one of the model's class names, matched exactly, and stands for its index. A
  model without class names refuses string labels; bytes are read as UTF-8.
- Names stand for classes only where they say which. They are refused outright when the
  model names two classes alike (a name would not say which of them). Beside index labels
  they are refused when a class name is a number other than its own index (star ratings
  "1".."5" for classes 0..4: the label "1" is class 0, the label 1 is class 1); indices
  alone, or names alone, are read there as usual.
- A message names the bad rows and values, says when a name differs from a class name only
  in case, and when out-of-range indices running 1..n look 1-based.

A token classifier's labels are one class index per token, ``NO_LABEL`` where a position has
none (``check_token_labels``).

Arrays are checked a batch at a time (``check_labels``), text files a row at a time
(``label_problem``, ``forms_problem`` once the whole file is read); both say what is wrong
in the same words.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import numpy as np

from quantgate.errors import DataError

MAX_NAMES_SHOWN = 12  # class names listed in a message; the rest are counted
NO_LABEL = -100  # a position without a token label (Hugging Face's ignore index)

# What a string label meets in a model without class names, and what to do.
_NO_NAMES = (
    "labels must be integer class indices (0, 1, ...): the model carries no class names to "
    "map strings through. Number the labels from 0, in the order of the model's classes."
)


def describe_classes(names: tuple[str, ...]) -> str:
    """'3 classes (0..2: neg, neu, pos)'; names equal to their indices are not repeated."""
    n = len(names)
    if not n:
        return "no class names"
    span = f"{n} classes (0..{n - 1}" if n > 1 else "1 class (0"
    if names == tuple(map(str, range(n))):
        return f"{span})"
    shown = names[:MAX_NAMES_SHOWN]
    more = f", ... {n - len(shown)} more" if n > len(shown) else ""
    return f"{span}: {', '.join(shown)}{more})"


def index_count(classes: int) -> int:
    """How many class indices a label may take for a head of ``classes`` logits: one each,
    and two for a single logit (0 and 1: a binary classifier's, whose sign the gates score)."""
    return max(classes, 2)


def label_count(names: tuple[str, ...]) -> int:
    """``index_count`` for a model's class ``names``; 0 where it names none (any index >= 0)."""
    return index_count(len(names)) if names else 0


# A single logit's real-valued targets are a regression's: labels are for classes
_REGRESSION = (
    " A single logit with real-valued targets (a regression) is gated without labels, on its "
    "R² against FP32: leave the labels out."
)


def _classes_said(names: tuple[str, ...]) -> str:
    single = " (a single logit: label 0 or 1, its sign)" if len(names) == 1 else ""
    return describe_classes(names) + single


def _reshaped(labels: np.ndarray, n: int) -> str:
    """What would make ``labels`` one class index per row, where a usual slip made them
    otherwise: a column (n, 1), booleans, a one-hot (n, classes) matrix."""
    if labels.shape == (n, 1):
        return ". Give them as one row's worth each: labels.ravel()"
    if labels.dtype == bool and labels.shape == (n,):
        return ". Give them as class indices: labels.astype(int)"
    if labels.ndim == 2 and labels.shape[0] == n and np.isin(labels, (0, 1)).all():
        if (labels.sum(1) == 1).all():
            return ". One-hot rows: give each row's class index, labels.argmax(1)"
        return (
            ". Several classes on in a row are a multi-label model's labels: export it with "
            "--task multi-label-classification (gated against FP32, it reads no labels)"
        )
    if labels.ndim == 1 and len(labels) != n:
        return (
            f". {len(labels)} labels for {n} rows: the labels belong to other rows (a subset, "
            "or rows the data lost or gained since); save them with the rows they label"
        )
    return ""


def _json(value: Any) -> str:
    """A label as its file wrote it: JSON's true, not Python's True."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_labels(labels: Any, n: int, names: tuple[str, ...], where: str) -> np.ndarray:
    """``labels`` as ``(n,)`` int64 class indices: integers inside the model's classes (>= 0
    where it names none), or its class ``names``, mapped to their indices; else a DataError
    that names the rows."""
    if isinstance(labels, np.ndarray) and labels.dtype == object and labels.ndim == 1:
        labels = labels.tolist()  # pandas' column of class names: df["label"].to_numpy()
    if isinstance(labels, (list, tuple)) and len(label_forms(labels)) == 2:
        labels = _mixed_to_indices(labels, names, where)
    labels = np.asarray(labels)
    if labels.shape == (n,) and labels.dtype.kind == "f" and _whole(labels):
        labels = labels.astype(np.int64)  # 1.0 for 1, as pandas writes an integer column
    if labels.shape == (n,) and labels.dtype.kind in "US":  # class names
        return _name_indices(_text(labels, where), names, where)
    if labels.shape == (n,) and labels.dtype.kind == "f":  # not whole, or not finite
        odd = ~np.isfinite(labels) | (labels != np.round(labels))
        raise DataError(
            f"{where}: labels must be class indices (whole numbers); found others in "
            f"{describe_row_values(labels, odd)}. Give each row a whole class index (0, 1, ...)."
            + (_REGRESSION if len(names) == 1 else "")
        )
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        what = "class indices or class names" if names else "integers (class indices)"
        raise DataError(
            f"{where}: labels must be {n} {what}, one per row; found shape {labels.shape} "
            f"dtype {labels.dtype}" + _reshaped(labels, n)
        )
    bad = labels < 0
    if names:
        bad |= labels >= label_count(names)
    elif labels.dtype.kind == "u":  # beyond int64: it would wrap around to a negative index
        bad |= labels > np.iinfo(np.int64).max
    if not bad.any():
        return labels.astype(np.int64)
    found = describe_row_values(labels, bad)  # in their own dtype
    if not names:
        raise DataError(
            f"{where}: labels must be class indices 0, 1, ... (that fit int64); found others "
            f"in {found}. Number the classes from 0."
        )
    n = label_count(names)
    by_name = "" if names == tuple(map(str, range(len(names)))) else " or one of its class names"
    raise DataError(
        f"{where}: labels outside the model's classes in {found}: the model has "
        f"{_classes_said(names)}. Give each row a class index 0..{n - 1}{by_name}."
        + one_based_hint(int(labels.min()), int(labels.max()), n)
    )


def check_token_labels(
    labels: Any, shape: tuple[int, ...], names: tuple[str, ...], where: str
) -> np.ndarray:
    """A token classifier's ``labels`` as int64 of ``shape`` (rows, sequence: its token
    rows'): one per position, a class index (inside ``names`` where the model names its
    classes) or ``NO_LABEL``; else a DataError naming what was found."""
    labels = np.asarray(labels)
    if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: a token classifier's labels are one class index per token: an integer "
            f"array of shape {shape}, as its inputs, {NO_LABEL} where a position has "
            f"none; found shape {labels.shape} dtype {labels.dtype}"
        )
    classes = len(names)
    bad = (labels < 0) & (labels != NO_LABEL)
    if classes:
        bad |= labels >= classes
    if bad.any():
        raise DataError(
            f"{where}: token labels must be class indices"
            + (f" 0..{classes - 1} ({describe_classes(names)})" if classes else " >= 0")
            + f" or {NO_LABEL}; found {sorted(set(labels[bad].tolist()))[:8]} in "
            f"{describe_rows(bad.any(1))}"
        )
    return labels.astype(np.int64)


def label_problem(label: Any, names: tuple[str, ...]) -> str | None:
    """Why a JSON ``"label"`` is not one of the model's classes, or None when it is: an index
    inside its classes (>= 0 where it names none) or one of its class ``names``, exactly.
    A whole float (1.0, as pandas writes an integer column with gaps) is its integer."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, str):
        if not names:
            return f"label {quote(label)} is a string, but {_NO_NAMES}" + _as_number(label, names)
        if label in names:
            return None
        hint = _as_number(label, names)
        return _not_a_name(f"label {quote(label)}", [label], names) + ("." + hint if hint else "")
    if not isinstance(label, int) or isinstance(label, bool):
        if names:
            return (
                f'"label" must be a class index or name, got {_json(label)}; the model has '
                f"{_classes_said(names)}" + (_REGRESSION if len(names) == 1 else "")
            )
        return f'"label" must be an integer class index (0, 1, ...), got {_json(label)}'
    if names and not 0 <= label < label_count(names):
        return f"label {label}, but the model has {_classes_said(names)}"
    if not 0 <= label < 1 << 63:
        return f'"label" must be an integer class index (0, 1, ...), got {label!r}'
    return None


def forms_problem(index_at: str | None, name_at: str | None, names: tuple[str, ...]) -> str | None:
    """Why a source's class-name labels (the first, and where: ``name_at``) cannot stand for
    classes, or None: the model names two classes alike, so a name does not say which; or the
    source also has index labels (``index_at``) and a class name is a number other than its
    index (star ratings "1".."5" for classes 0..4), so "1" and 1 would be different classes."""
    if name_at is None or not names:
        return None
    n = len(names)
    twice = _duplicate_name(names)
    if twice is not None:
        name, at = twice
        return (
            f"labels are class names ({name_at}), but the model's class names are not unique: "
            f"{quote(name)} is class {' and class '.join(map(str, at))}, so a name does not "
            f"say which class it means. Use class indices (0..{n - 1}) instead."
        )
    number = _number_name(names) if index_at is not None else None
    if number is None:
        return None
    i, name, value = number
    other = _class_said(value, n)
    return (
        f"labels are both class indices ({index_at}) and class names ({name_at}), and the "
        f"model's class names are numbers other than their indices: it has "
        f"{describe_classes(names)}. "
        f"The two forms disagree: the label {quote(name)} means class {i}, the label {value} "
        f"{other}. Use one form for every label: the class indices 0..{n - 1}, or the names."
    )


def label_forms(labels: Any) -> set[str]:
    """How a batch gives its labels: {"indices"}, {"names"}, or both (a list may mix them)."""
    if isinstance(labels, (list, tuple)):
        return {"names" if isinstance(x, str) else "indices" for x in labels}
    return {"names" if np.asarray(labels).dtype.kind in "US" else "indices"}


def name_index(names: tuple[str, ...]) -> dict[str, int]:
    """{class name: index}; used where the names are unique (``forms_problem``)."""
    return {name: i for i, name in enumerate(names)}


def one_based_hint(lo: int, hi: int, classes: int) -> str:
    """A sentence, after a space, for index labels ``lo``..``hi`` that run 1..``classes``
    instead of 0..``classes`` - 1; else ''."""
    if lo == 1 and hi == classes:
        return " They look 1-based: renumber them from 0, in the order of the model's classes."
    return ""


def quote(name: str) -> str:
    """``name`` as JSON writes it, quoted (non-ASCII kept as is)."""
    return json.dumps(name, ensure_ascii=False)


def describe_row_values(values: np.ndarray, bad: np.ndarray) -> str:
    """'2 rows (row 3: 10, row 17: 12)': the rows of boolean mask ``bad``, each with its
    value in ``values`` (strings quoted), the first five shown."""
    idx = np.flatnonzero(bad)
    shown = [
        f"row {i}: {quote(v) if isinstance(v := values[i].item(), str) else v}" for i in idx[:5]
    ]
    more = f", ... {len(idx) - 5} more" if len(idx) > 5 else ""
    return f"{len(idx)} row{'s' if len(idx) > 1 else ''} ({', '.join(shown)}{more})"


def describe_rows(bad: np.ndarray, rows: np.ndarray | None = None) -> str:
    """'3 rows (indices 3, 7, 11)' for a boolean row mask; the first five indices shown.
    ``rows``: each row's own index (its row in the file), where the mask's order is not it."""
    idx = np.flatnonzero(bad)
    if rows is not None:
        idx = np.sort(rows[idx])
    shown = ", ".join(map(str, idx[:5])) + (f", ... {len(idx) - 5} more" if len(idx) > 5 else "")
    return f"1 row (index {shown})" if len(idx) == 1 else f"{len(idx)} rows (indices {shown})"


def _mixed_to_indices(labels: list | tuple, names: tuple[str, ...], where: str) -> list:
    """A list of class names and indices with its names replaced by their indices (numpy would
    make strings of the indices instead); a DataError where a name stands for no one class."""
    is_name = np.array([isinstance(x, str) for x in labels])
    first_name, first_index = int(is_name.argmax()), int((~is_name).argmax())
    return _names_to_indices(
        list(labels),
        names,
        where,
        name_at=f"{quote(labels[first_name])} in row {first_name}",
        index_at=f"{labels[first_index]!r} in row {first_index}",
    )


def _name_indices(labels: np.ndarray, names: tuple[str, ...], where: str) -> np.ndarray:
    """Class-name labels (str) as their class indices; else a DataError naming the rows."""
    indices = _names_to_indices(labels.tolist(), names, where, name_at=_values(labels))
    return np.array(indices, np.int64)


def _names_to_indices(
    labels: list, names: tuple[str, ...], where: str, *, name_at: str, index_at: str | None = None
) -> list:
    """``labels`` with each class name replaced by its index (indices kept); a DataError where
    the model names no classes, where a name stands for no one class (``forms_problem``: the
    first name is ``name_at``, the first index ``index_at``), or where a name is no class's."""
    if not names:
        raise DataError(f"{where}: labels are strings ({name_at}), but {_NO_NAMES}")
    problem = forms_problem(index_at, name_at, names)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    index = name_index(names)
    unknown = np.array([isinstance(x, str) and x not in index for x in labels])
    if unknown.any():
        found = [x for x, u in zip(labels, unknown, strict=True) if u]
        shown = np.array([x if isinstance(x, str) else "" for x in labels])
        raise DataError(
            f"{where}: "
            + _not_a_name(
                f"the label{'s' if len(found) > 1 else ''} in {describe_row_values(shown, unknown)}",
                found,
                names,
                verb="are" if len(found) > 1 else "is",
            )
        )
    return [index[x] if isinstance(x, str) else x for x in labels]


def _whole(a: np.ndarray) -> bool:
    """Whether every value of float array ``a`` is a whole number that fits int64."""
    return bool(np.isfinite(a).all() and (a == np.round(a)).all() and (np.abs(a) < 2**63).all())


def _text(labels: np.ndarray, where: str) -> np.ndarray:
    """String labels as str: bytes (numpy dtype S) decoded as UTF-8; a DataError where not."""
    if labels.dtype.kind == "U":
        return labels
    raw = labels.tolist()
    texts, bad = [], np.zeros(len(raw), dtype=bool)
    for i, b in enumerate(raw):
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append("")
            bad[i] = True
    if bad.any():
        raise DataError(
            f"{where}: labels in {describe_rows(bad)} are bytes that are not UTF-8 text (the "
            f"first: {raw[int(bad.argmax())]!r}). Write the class names as str (numpy dtype "
            "U), or encode them as UTF-8."
        )
    return np.array(texts, dtype=str)


def _not_a_name(found: str, labels: list[str], names: tuple[str, ...], verb: str = "is") -> str:
    """'label "NEU" is not one of the model's class names ...' for ``found``, the labels
    ``labels`` that name no class, with a hint where one differs from a name only in case."""
    return (
        f"{found} {verb} not one of the model's class names (matched exactly); it has "
        f"{describe_classes(names)}" + _case_hint(labels, names)
    )


def _as_number(label: str, names: tuple[str, ...]) -> str:
    """' For the class index 3, write "label": 3 ...' where a JSON string label reads as a
    whole number that is a class index: JSON tells a name from an index by its type (a CSV
    cell cannot, and is read as the index)."""
    index = cell_index(label)
    if index is None or index < 0 or (names and index >= label_count(names)):
        return ""
    return f' For the class index {index}, write "label": {index} (a JSON number, unquoted).'


def _values(a: np.ndarray) -> str:
    """'5, 7, 9, ...': the distinct values of ``a``, the first five (strings quoted)."""
    found = np.unique(a).tolist()
    shown = [quote(v) if isinstance(v, str) else str(v) for v in found[:5]]
    return ", ".join(shown) + (", ..." if len(found) > 5 else "")


def _duplicate_name(names: tuple[str, ...]) -> tuple[str, list[int]] | None:
    """The first class name the model gives more than one class, and those classes."""
    counts = Counter(names)
    name = next((x for x in names if counts[x] > 1), None)
    if name is None:
        return None
    return name, [i for i, other in enumerate(names) if other == name]


def cell_index(cell: str) -> int | None:
    """The class index a CSV or TSV label cell writes, or None where it writes none: a whole
    number in ASCII digits, ``1.0`` too (as pandas writes the integers of a column with
    gaps); any other cell is a class name."""
    whole = re.fullmatch(r"\s*([+-]?[0-9]+)(\.0*)?\s*", cell)
    return int(whole.group(1)) if whole else None


def number_cells_problem(names: tuple[str, ...]) -> str | None:
    """Why whole-number label cells of a CSV or TSV (text, where 1 and "1" are one) cannot be
    read for a model with class ``names``, or None: a class name reads as an index other than
    its own (star ratings "1".."5" for classes 0..4; "1.0" of "0.0", "0.5", "1.0"), so a cell
    could mean either class."""
    number = _number_name(names)
    if number is None:
        return None
    i, name, value = number
    other = _class_said(value, len(names))
    return (
        f"the model's class names are numbers other than their indices: it has "
        f"{describe_classes(names)}. A cell {name} could mean class {i} (the name) or "
        f"{other} (the index), and a CSV or TSV cell cannot say which. Write the labels as "
        f'JSONL: "label": "{name}" for the name, "label": {value} for the index.'
    )


def _number_name(names: tuple[str, ...]) -> tuple[int, str, int] | None:
    """The first class whose name reads as another class index (``cell_index``): its index,
    its name, and the index the name reads as."""
    for i, name in enumerate(names):
        if (value := cell_index(name)) is not None and value != i:
            return i, name, value
    return None


def _class_said(index: int, n: int) -> str:
    return f"class {index}" if 0 <= index < n else "no class"


def _case_hint(labels: list[str], names: tuple[str, ...]) -> str:
    """' ("POS" differs only in case from "pos")' for the first of ``labels`` that does."""
    folded = {n.casefold(): n for n in reversed(names)}
    for label in labels:
        if label.casefold() in folded:
            return f" ({quote(label)} differs only in case from {quote(folded[label.casefold()])})"
    return ""


__all__ = [
    "MAX_NAMES_SHOWN",
    "NO_LABEL",
    "check_labels",
    "check_token_labels",
    "describe_classes",
    "describe_row_values",
    "describe_rows",
    "forms_problem",
    "label_forms",
    "label_problem",
    "name_index",
    "one_based_hint",
    "quote",
]
