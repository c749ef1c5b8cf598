"""Config dataclasses checked as they are made, from their own annotations.

``ExportConfig(opset="17")`` or ``GateConfig(iterations=5.5)`` written in a notebook should
fail there, naming the field, not minutes later as a TypeError deep in the pipeline. A
config's ``__post_init__`` calls ``check_fields(self)`` before its own checks of ranges and
choices, which may then rely on the types.

Only conversions that lose nothing are made: a list where a tuple is annotated (and one
string where a tuple of strings is), a string where a ``Path`` is, a value of an Enum, a
numpy number (or 1-d array) where a Python number (or tuple) is.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable
from numbers import Integral
from pathlib import Path
from typing import Any, TypeVar, cast

from quantgate.errors import ConfigError, ConfigTypeError

_MISMATCH = object()
C = TypeVar("C")  # a config class, kept as it is decorated


def check_fields(cfg: Any) -> None:
    """Raise one ConfigError naming every field of ``cfg`` whose value is not of its
    annotated type; convert in place (a frozen dataclass too) where nothing is lost."""
    hints = _hints(type(cfg))  # type: ignore[arg-type]  # (mypy: a class is hashable)
    problems = []
    for field in dataclasses.fields(cfg):
        hint = hints[field.name]
        value = getattr(cfg, field.name)
        conformed = _conform(value, hint)
        if conformed is _MISMATCH:
            problems.append(f"{field.name}: expected {_describe(hint)}, found {_found(value)}")
        elif conformed is not value:
            object.__setattr__(cfg, field.name, conformed)
    if problems:
        raise ConfigError(f"{type(cfg).__name__}: " + "; ".join(problems))


def config_class(cls: type[C]) -> type[C]:
    """Decorate a config dataclass (above ``@dataclass``) so that a keyword that is none of
    its fields is a ConfigTypeError (a TypeError too) naming the field it probably means, as
    a config file's unknown setting is: ``GateConfig(min_speedp=1.1)`` says "did you mean
    'min_speedup'?", not Python's bare "unexpected keyword argument". Its docstring gains
    its fields, each with its type, its default and the comments beside it in the source,
    for ``help()``."""
    init = cls.__init__
    known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if unknown := sorted(kwargs.keys() - known):
            raise ConfigTypeError(unknown_fields(cls.__name__, unknown, known))
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__doc__ = _FieldsDoc(cls.__doc__ or "")  # type: ignore[assignment]
    return cls


class _FieldsDoc:
    """A config class's ``__doc__`` (``_with_fields``), made when first read (``help()``,
    an IDE): reading the source as the class is made would cost every command's start."""

    def __init__(self, doc: str):
        self.doc, self.made = doc, ""

    def __get__(self, instance: object, owner: type) -> str:
        if not self.made:
            self.made = _with_fields(owner, self.doc)
        return self.made


def _with_fields(cls: type, doc: str) -> str:
    """``doc``, then a "Fields:" section: each field's type and default, then its
    comments, those on the lines above it and the one after it."""
    comments = _field_comments(cls)
    if doc.startswith(f"{cls.__name__}("):  # dataclass's signature, where it had none
        doc = ""
    lines = [inspect.cleandoc(doc), ""] if doc else []
    lines.append("Fields:")
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {f.default_factory()!r}"
        else:
            default = ""
        lines.append(f"    {f.name}: {f.type}{default}")
        lines.extend(textwrap.wrap(comments.get(f.name, ""), 80, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8, break_on_hyphens=False))  # fmt: skip
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comments in ``cls``'s source, joined; nothing where the source cannot
    be read (an installation of compiled files only). A line of ``# --`` heads a section,
    no field's."""
    comments: dict[int, str] = {}  # line -> its comment's text
    starts: set[int] = set()  # lines that hold nothing but a comment
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
                if not tok.line[: tok.start[1]].strip():
                    starts.add(tok.start[0])
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # help() must not fail
        return {}
    said: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in starts and not comments[line].startswith("--"):
            above.insert(0, comments[line])
            line -= 1
        after = [comments[node.end_lineno]] if node.end_lineno in comments else []
        said[node.target.id] = " ".join(above + after)
    return said


def unknown_fields(
    owner: str, unknown: list[str], known: set[str], *, where: str | None = None
) -> str:
    """'GateConfig: unknown field 'min_speedp' (did you mean 'min_speedup'?); its fields: ...';
    with ``where`` (the file that gave them) leading: 'g.toml: unknown field ...; GateConfig's
    fields: ...'."""
    named = [f"{name!r}{did_you_mean(name, known)}" for name in unknown]
    whose = "its" if where is None else f"{owner}'s"
    return (
        f"{where or owner}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
        f"{whose} fields: {', '.join(sorted(known))}"
    )


def did_you_mean(name: str, known: Iterable[str], meant: str | None = None) -> str:
    """`` (did you mean 'x'?)`` for the known name ``name`` probably means: ``meant`` where
    the caller knows it (another library's word for it), else ``closest``'s; else ""."""
    meant = meant or closest(name, set(known))
    return f" (did you mean {meant!r}?)" if meant else ""


def closest(name: str, known: set[str]) -> str | None:
    """The known name ``name`` probably means: the one it is a prefix of (``min_top1`` is
    ``min_top1_agreement``), else a close spelling; None where none is close."""
    import difflib

    prefixed = [k for k in sorted(known) if k.startswith(name)]
    if len(prefixed) == 1:  # a prefix of several names says none of them
        return prefixed[0]
    found = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return found[0] if found else None


def wrong_types(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what it must be) for each of ``values`` (fields of config ``cls``, as a file
    gives them) that ``cls`` would refuse, before making one."""
    hints = _hints(cls)
    return [
        (name, _describe(hints[name]))
        for name, value in values.items()
        if _conform(value, hints[name]) is _MISMATCH
    ]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` wants it (the same object when it already is), or _MISMATCH."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if (conformed := _conform(value, arg)) is not _MISMATCH:
                return conformed
        return _MISMATCH
    if origin is tuple:
        many = len(args) == 2 and args[1] is Ellipsis  # tuple[int, ...]; else tuple[int, int]
        if many and args[0] is str and isinstance(value, str):
            return (value,)  # recipes="smooth-static-u8s8": one, not its letters
        if isinstance(value, _numpy("ndarray")) and value.ndim == 1:
            value = value.tolist()
        if not isinstance(value, (tuple, list)) or (not many and len(value) != len(args)):
            return _MISMATCH
        kinds = args[:1] * len(value) if many else args
        items = [_conform(v, kind) for v, kind in zip(value, kinds, strict=True)]
        if any(v is _MISMATCH for v in items):
            return _MISMATCH
        unchanged = isinstance(value, tuple) and all(
            a is b for a, b in zip(items, value, strict=True)
        )
        return value if unchanged else tuple(items)
    if hint is type(None):
        return value if value is None else _MISMATCH
    if hint is bool:
        if isinstance(value, _numpy("bool_")):
            return bool(value)
        return value if isinstance(value, bool) else _MISMATCH
    if hint in (int, float):
        return _number(value, hint)
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if hint is Path:  # not "": Path("") is the current directory, which nobody meant
        if isinstance(value, Path):
            return value
        ok = isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""
        return Path(value) if ok else _MISMATCH
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)  # a member, or its value ("legacy")
        except ValueError:
            return _MISMATCH
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISMATCH
    return value  # Any, a Mapping, a Callable: not checked here


def _numpy(name: str) -> Any:
    """numpy's type ``name`` as a tuple for isinstance, empty where numpy is not loaded: no
    value is numpy's then, and importing it (a quarter of a second) would slow every
    command's start, `--help`'s too."""
    np = sys.modules.get("numpy")
    return (getattr(np, name),) if np is not None else ()


def _number(value: Any, hint: type) -> Any:
    """``value`` as a Python int or float, where nothing is lost: a whole number (numpy's
    too) for either, a float (numpy's too) for a float. Never a bool, which Python counts as
    an int but nobody means as a count or a threshold, nor a Fraction or a Decimal."""
    if isinstance(value, (bool, *_numpy("bool_"))):
        return _MISMATCH
    if isinstance(value, Integral):
        return value if type(value) is hint else hint(value)
    if hint is float and isinstance(value, (float, *_numpy("floating"))):
        return value if type(value) is float else float(cast(float, value))
    return _MISMATCH


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a tuple (or list) of {_plural(args[0])}"
    if origin is tuple:
        return f"a tuple (or list) of {len(args)}: " + ", ".join(_describe(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    names = {type(None): "None", bool: "True or False", int: "a whole number", float: "a number",
             str: "a string", Path: "a path"}  # fmt: skip
    return names.get(hint) or f"a {getattr(hint, '__name__', hint)}"


def _plural(hint: Any) -> str:
    return {int: "whole numbers", float: "numbers", str: "strings"}.get(hint, _describe(hint))


def _found(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}"


def require(value: Any, kind: type, name: str) -> None:
    """ConfigTypeError unless ``value`` is a ``kind`` (a config passed as a dict, say)."""
    if not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        raise ConfigTypeError(
            f"{name}: expected {article} {kind.__name__}, found {type(value).__name__}; make one with "
            f"{kind.__name__}(...), e.g. {name}={kind.__name__}(**settings)"
        )
