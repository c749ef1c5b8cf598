"""What a bundle's manifest.json must hold, checked before quantgate reads a value of it.

``manifest_problems(d)`` lists every way a parsed manifest differs from what
``bundle.write_manifest`` writes: a field missing, unknown or of the wrong kind, a gate
whose verdict its value does not support, a path that leads out of the bundle. ``bundle``
reads a manifest only once the list is empty, and says every problem at once.

Also here: the names a manifest is written with (the bundle's own files, the verdicts, the
precisions), and which names may name a model (``printable_name``). Standard library only,
as ``bundle`` is.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REPORT = "report.md"
TOKENIZER_DIR = "tokenizer"  # a text model's tokenizer, saved by export.writer
PASS, FAIL = "pass", "fail"
PRECISIONS = ("fp32", "int8", "fp16")


RECREATE = (
    "Restore the manifest from the original bundle, or re-create the bundle with "
    "`quantgate export`."
)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# numpy dtype names of ONNX tensor types a model may take or give
_DTYPES = frozenset(
    ("bool", "float16", "bfloat16", "float32", "float64")
    + tuple(f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64))
)
_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


def problem_list(problems: list[str]) -> str:
    """One problem inline, several as a list; either way ready for the advice after it."""
    if len(problems) == 1:
        return problems[0] + ". "
    return f"{len(problems)} problems:\n" + "".join(f"  - {p}\n" for p in problems)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _list(d: dict, key: str) -> list:
    """``d[key]`` where it is a list, else [] (a damaged manifest: its checks say why)."""
    x = d.get(key)
    return x if isinstance(x, list) else []


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RepeatedKeys(ValueError):
    """A JSON object that names a key twice (``unique_keys``); ``keys``: those keys."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        super().__init__(f"the key(s) {', '.join(map(repr, keys))} appear twice in one object")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice (RepeatedKeys):
    JSON keeps its last value, and the first is lost without a word."""
    seen: set[str] = set()
    repeated: set[str] = set()
    for key, _ in pairs:
        (repeated if key in seen else seen).add(key)
    if repeated:
        raise RepeatedKeys(sorted(repeated))
    return dict(pairs)


def described(x: Any) -> str:
    """``x`` as a person reads it in an error message: its JSON kind, and short values."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if _is_number(x):
        return f"the number {x!r}"
    if isinstance(x, str):
        return f"the string {x[:60]!r}" + ("..." if len(x) > 60 else "")
    if isinstance(x, list):
        return "a list"
    return "an object" if isinstance(x, dict) else f"a Python {type(x).__name__}, not JSON"


def _is_name(x: Any) -> bool:
    """A file name inside the bundle's own directory: no folder, no way out of it."""
    return (
        isinstance(x, str)
        and x not in ("", ".", "..", MANIFEST, REPORT)
        and "\x00" not in x
        and "/" not in x
        and "\\" not in x
    )


def is_relative_path(x: Any) -> bool:
    """A path inside the bundle, below its directory: "tokenizer/vocab.txt"."""
    if not isinstance(x, str) or x in (MANIFEST, REPORT) or "\x00" in x or "\\" in x:
        return False
    parts = x.split("/")
    return all(part not in ("", ".", "..") for part in parts)


# A field's check: None when the value is right, else what was expected.
_Check = Callable[[Any], "str | None"]


def _kind(test: Callable[[Any], bool], expected: str) -> _Check:
    return lambda x: None if test(x) else expected


_TEXT = _kind(lambda x: isinstance(x, str), "a string")
_NAME = _kind(lambda x: isinstance(x, str) and x.strip() != "", "a non-empty string")


def printable_name(name: str) -> bool:
    """Whether ``name`` may name a model: not blank, no control character (a line break, an
    escape), no invisible formatting (a right-to-left override, which shows a line's text in
    another order) and no Unicode line separator. The name goes into log lines, metadata
    and terminals as it is: one holding a line break forged a `listening on` line that
    scripts read the port from."""
    return name.strip() != "" and unprintable(name) is None


def unprintable(name: str) -> str | None:
    """The first character of ``name`` that ``printable_name`` refuses, as U+XXXX; None."""
    for c in name:
        kind = unicodedata.category(c)
        if kind in _UNPRINTABLE or (kind == "Cf" and c not in _JOINERS and not _tag(c)):
            return f"U+{ord(c):04X}"
    return None


# Control characters, line and paragraph separators, and invisible formatting (direction
# overrides and marks, which reorder what a line shows; a zero-width space, which makes two
# names that look the same) but for what real names are written with: the joiners of emoji
# and Persian, a soft hyphen, and the tags of a flag emoji
_UNPRINTABLE = ("Cc", "Zl", "Zp")
_JOINERS = frozenset("\u200c\u200d\u00ad")


def _tag(c: str) -> bool:
    return 0xE0020 <= ord(c) <= 0xE007F


_MODEL_NAME = _kind(
    lambda x: isinstance(x, str) and printable_name(x),
    "a non-empty name without control characters (line breaks, escapes, direction overrides)",
)
_OBJECT = _kind(lambda x: isinstance(x, dict), "an object")
_OBJECT_OR_NULL = _kind(lambda x: x is None or isinstance(x, dict), "an object or null")
_NAMES = _kind(
    lambda x: isinstance(x, list) and all(isinstance(s, str) and s for s in x),
    "a list of non-empty strings",
)
_SHA = _kind(
    lambda x: isinstance(x, str) and _SHA256.fullmatch(x) is not None,
    "64 hexadecimal digits (a sha256)",
)


def _fields(
    d: Any,
    where: str,
    required: dict[str, _Check],
    optional: dict[str, _Check],
    *,
    others: bool = False,
) -> list[str]:
    """Problems with object ``d``: a missing or unknown field (unless ``others`` may be
    there), or a value its check refuses."""
    if not isinstance(d, dict):
        return [f"{where}: expected an object, found {described(d)}"]
    problems = [f"{where}: the field {k!r} is missing" for k in required if k not in d]
    unknown = [] if others else sorted(set(d) - set(required) - set(optional))
    if unknown:
        problems.append(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; quantgate writes none "
            "by that name (your own fields belong under extra)"
        )
    for k, check in {**required, **optional}.items():
        if k in d and (expected := check(d[k])):
            problems.append(f"{where}.{k}: expected {expected}, found {described(d[k])}")
    return problems


def validation_problems(val: Any) -> list[str]:
    """What keeps a manifest's ``export.validation`` (the export's checks, which serving does
    not read, so ``manifest_problems`` does not check it) from being shown; [] where it can."""
    where = "export.validation"
    diffs = _kind(
        lambda x: isinstance(x, dict) and all(_is_number(d) for d in x.values()),
        "an object of output names to numbers",
    )
    cases = _kind(lambda x: isinstance(x, list), "a list of objects")
    problems = _fields(val, where, {"max_abs_diff": diffs, "cases": cases}, {}, others=True)
    if problems:
        return problems
    case = dict.fromkeys(("batch", "sequence", "padded_rows"), _kind(is_int, "a whole number"))
    for i, c in enumerate(val["cases"]):
        problems += _fields(c, f"{where}.cases[{i}]", case, {}, others=True)
    return problems


def _tensor(t: Any, where: str) -> list[str]:
    dims = _kind(
        lambda x: (
            isinstance(x, list)
            and all((is_int(n) and n >= 0) or (isinstance(n, str) and n) for n in x)
        ),
        "a list of sizes (whole numbers >= 0) and axis names",
    )
    dtype = _kind(lambda x: x in _DTYPES, f"a dtype name ({', '.join(sorted(_DTYPES))})")
    return _fields(t, where, {"name": _NAME, "dtype": dtype, "dims": dims}, {})


def _gate(g: Any, where: str) -> list[str]:
    number = _kind(_is_number, "a number")
    ci = _kind(
        lambda x: x is None or (isinstance(x, list) and len(x) == 2 and all(map(_is_number, x))),
        "null or [low, high], two numbers",
    )
    problems = _fields(
        g,
        where,
        {
            "name": _NAME,
            "value": _kind(
                lambda x: _is_number(x) or x is None, "a number (null: not measurable, failed)"
            ),
            "threshold": number,
            "op": _kind(lambda x: x in _OPS, "'<=' or '>='"),
            "passed": _kind(lambda x: isinstance(x, bool), "true or false"),
        },
        {
            "ci": ci,
            "provider": _kind(lambda x: x is None or isinstance(x, str), "a string or null"),
            "detail": _TEXT,
        },
    )
    if problems or not g["passed"]:
        return problems
    if g["value"] is None:
        return [f"{where}: passed is true, but its value is null (not measurable)"]
    # "passed" must follow from the numbers: a gate can fail with good numbers (a fallback,
    # broken rows), never pass with bad ones. The slack covers rounding in the bootstrap.
    value, threshold = g["value"], g["threshold"]
    slack = 1e-6 * max(1.0, abs(threshold)) if math.isfinite(threshold) else 0.0
    bound = threshold + slack if g["op"] == "<=" else threshold - slack
    if not (math.isfinite(value) and _OPS[g["op"]](value, bound)):
        return [f"{where}: passed is true, but its value {value!r} is not {g['op']} {threshold!r}"]
    return []


def _variant(v: Any, where: str) -> list[str]:
    problems = _fields(
        v,
        where,
        {
            "file": _kind(_is_name, "a file name inside the bundle (no folder, not .. or /)"),
            "precision": _kind(lambda x: x in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            "sha256": _SHA,
        },
        {
            "providers": _NAMES,
            "recipe": _OBJECT_OR_NULL,
            "gates": _kind(lambda x: isinstance(x, list), "a list of gates"),
            "verdict": _kind(lambda x: x in (PASS, FAIL), f"{PASS!r} or {FAIL!r}"),
            "not_for": _NAMES,
            "notes": _TEXT,
        },
    )
    if not isinstance(v, dict):
        return problems
    gates = _list(v, "gates")
    for i, g in enumerate(gates):
        name = g.get("name") if isinstance(g, dict) else None
        problems += _gate(g, f"{where}.gates[{i}]" + (f" ({name})" if name else ""))
    failed = [g.get("name") for g in gates if isinstance(g, dict) and g.get("passed") is False]
    if v.get("verdict", PASS) == PASS and failed:
        problems.append(
            f"{where}: verdict is 'pass', but its gate(s) {', '.join(map(str, failed))} failed; "
            "a variant passes only when every gate passed"
        )
    elif v.get("verdict", PASS) == PASS and not gates and v.get("precision") != "fp32":
        problems.append(
            f"{where}: verdict is 'pass', but it has no gates; an {v.get('precision')} variant "
            "ships on the evidence of its gates, which export and gate always record"
        )
    elif v.get("verdict") == FAIL and gates and not failed:
        problems.append(
            f"{where}: verdict is 'fail', but every one of its {len(gates)} gate(s) passed; "
            "a variant's verdict is its gates'"
        )
    return problems


def _tokenizer_problem(hf: dict[str, Any]) -> str | None:
    """What is wrong with where a manifest says its tokenizer is. Export writes a folder of
    the bundle ("tokenizer", its files hashed in ``files``); a bundle of 0.1.0 (and one a
    re-gate of such a bundle wrote) may name the model's own directory, an absolute path,
    or a tokenizer folder it did not hash. A path out of the bundle through ``..`` is
    none of these: text would be read by files of another folder, refused."""
    tok = hf["tokenizer"]
    if not isinstance(tok, str) or not tok.strip():
        return f"expected a folder path, found {described(tok)}"
    if not os.path.isabs(tok) and ".." in Path(tok).parts:
        return (
            f"expected a folder of the bundle ({TOKENIZER_DIR!r}, as export writes it), "
            f"found {described(tok)}, which leads out of it"
        )
    return None


def manifest_problems(d: dict[str, Any]) -> list[str]:
    """Every way ``d`` (a parsed manifest.json) differs from what ``write_manifest`` writes."""
    files = _kind(
        lambda x: isinstance(x, dict) and all(map(is_relative_path, x)),
        "an object of paths inside the bundle (a/b.txt, no .. or leading /) to sha256s",
    )
    problems = _fields(
        d,
        "manifest",
        {
            "name": _MODEL_NAME,
            "task": _NAME,
            "inputs": _kind(lambda x: isinstance(x, list), "a list of tensors"),
            "outputs": _kind(lambda x: isinstance(x, list), "a list of tensors"),
            "variants": _kind(lambda x: isinstance(x, list) and x != [], "a non-empty list"),
            "opset": _kind(lambda x: is_int(x) and x >= 1, "a whole number >= 1"),
            "source": _OBJECT,
        },
        {
            "version": _kind(lambda x: is_int(x) and x >= 1, "a whole number >= 1"),
            "created": _TEXT,
            "tools": _kind(
                lambda x: isinstance(x, dict) and all(isinstance(v, str) for v in x.values()),
                "an object of package names to version strings",
            ),
            "calibration": _OBJECT_OR_NULL,
            "export": _OBJECT,
            "extra": _OBJECT,
            "files": files,
            "format_version": _kind(lambda x: is_int(x) and x >= 1, "a whole number >= 1"),
            "verdict": _kind(lambda x: x in (PASS, FAIL), f"{PASS!r} or {FAIL!r}"),
        },
    )
    for key in ("inputs", "outputs"):
        for i, t in enumerate(_list(d, key)):
            problems += _tensor(t, f"{key}[{i}]")
    variants = _list(d, "variants")
    for i, v in enumerate(variants):
        label = v.get("precision") if isinstance(v, dict) else None
        problems += _variant(
            v, f"variants[{i}]" + (f" ({label})" if isinstance(label, str) else "")
        )
    entries = [v for v in variants if isinstance(v, dict)]
    for key in ("precision", "file"):
        seen = [x for v in entries if isinstance(x := v.get(key), str)]
        if repeated := sorted({x for x in seen if seen.count(x) > 1}):
            problems.append(
                f"variants: {key} {', '.join(map(repr, repeated))} appears more than once; "
                f"each variant has its own {key}"
            )
    if isinstance(d.get("files"), dict):
        for path, sha in d["files"].items():
            if expected := _SHA(sha):
                problems.append(f"files[{path!r}]: expected {expected}, found {described(sha)}")
            if path in {v.get("file") for v in entries}:
                problems.append(f"files[{path!r}]: is a variant's file; list it once, as a variant")
    export, extra = d.get("export"), d.get("extra")
    seq = export.get("max_seq_len") if isinstance(export, dict) else None
    if seq is not None and not (is_int(seq) and seq >= 1):
        problems.append(
            f"export.max_seq_len: expected a whole number >= 1 or null, found {described(seq)}"
        )
    if isinstance(extra, dict):
        hf = extra.get("huggingface")
        if hf is not None and not isinstance(hf, dict):
            problems.append(f"extra.huggingface: expected an object, found {described(hf)}")
        elif hf and hf.get("tokenizer") is not None and (said := _tokenizer_problem(hf)):
            problems.append(f"extra.huggingface.tokenizer: {said}")
        elif hf and hf.get("tokenizers") is not None:  # how to run the tokenizer: its module's
            from quantgate.tokenizer import settings_problems

            problems.extend(settings_problems(hf["tokenizers"]))
        regates = extra.get("regates", [])
        if not isinstance(regates, list):
            problems.append(f"extra.regates: expected a list, found {described(regates)}")
        elif bad := [i for i, r in enumerate(regates) if not isinstance(r, dict)]:
            problems.append(
                f"extra.regates[{bad[0]}]: expected an object (a re-gate's record), found "
                f"{described(regates[bad[0]])}"
            )
    stated = d.get("verdict")
    if stated in (PASS, FAIL) and not problems:
        failed = [v["precision"] for v in entries if v.get("verdict", PASS) != PASS]
        if (stated == PASS) != (not failed):
            why = f"variant(s) {', '.join(failed)} failed" if failed else "every variant passed"
            problems.append(
                f"verdict is {stated!r}, but {why}; the bundle passes exactly when every "
                "variant passed"
            )
    return problems
