"""Names a package offers from its modules, imported on first use.

A stage's package re-exports its entry points (``from quantgate.quantize import build``)
without importing their modules, and with them torch or onnxruntime, when the package is
imported: the CLI's --help and a serving host stay light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from
    ``package.<where[name]>`` on first use (PEP 562).

    A name may not be one of the modules: importing ``package.train`` binds the module as
    the package's attribute ``train``, which would then hide the function of that name."""
    if clash := sorted(set(where) & set(where.values())):
        raise ValueError(f"{package}: {clash} would be hidden by the module(s) of that name")

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    return __getattr__
