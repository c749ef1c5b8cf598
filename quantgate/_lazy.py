"""Names a package offers from its modules, imported on first use.

A stage's package re-exports its entry points (``from quantgate.quantize import build``)
without importing their modules, and with them torch or onnxruntime, when the package is
imported: the CLI's --help and a serving host stay light.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def exports(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from
    ``package.<where[name]>`` on first use (PEP 562), and the ``__dir__`` that lists them.

    A name may not be one of the package's modules: importing ``package.train`` binds the
    module as the package's attribute ``train``, which would then hide the function. The
    package's ``__all__`` (literal, for linters) must list exactly these names."""
    module = sys.modules[package]
    if sorted(getattr(module, "__all__", ())) != sorted(where):
        raise ValueError(f"{package}: __all__ {module.__all__} is not {sorted(where)}")
    modules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    if clash := sorted(set(where) & modules):
        raise ValueError(f"{package}: {clash} would be hidden by the module(s) of that name")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:
        """Its entry points, its modules imported so far and the dunders: not what it
        imports to do this (``annotations``, ``TYPE_CHECKING``, ``exports``), which a
        notebook's completion would offer."""
        own = vars(sys.modules[package])
        kept = {n for n, v in own.items() if n.startswith("__") or isinstance(v, ModuleType)}
        return sorted({*kept, *where})

    return __getattr__, __dir__
