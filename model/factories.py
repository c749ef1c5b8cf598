"""User factories: ``package.module:factory`` or ``path/to/file.py:factory`` imported and
called, or the module object or factory function given from Python, checked against the
factory contract (``loaders.py`` spells it out) and wrapped for export."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn as nn

from quantgate.errors import ConfigError, ModelLoadError
from quantgate.model.loaders import (
    InputSpec,
    LoadedModel,
    Samples,
    TupleOutputs,
    brief,
    by_name,
    did_you_mean,
    double_precision,
    half_precision,
    unsupported_return,
)
from quantgate.quiet import warnings_caught
from quantgate.tasks import CUSTOM, HF_TASKS, QA_OUTPUTS, QA_TASKS, SEQUENCE_CLASSIFICATION

log = logging.getLogger(__name__)

FACTORY_TASKS = (*HF_TASKS, CUSTOM)  # the tasks the gates know; a factory's may be any


def load_factory(
    spec: str, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    mod, factory = factory_of(spec)
    return _from_factory(spec, factory, mod, task=task, max_seq_len=max_seq_len)


def factory_of(spec: str) -> tuple[ModuleType, Callable[[], Any]]:
    """The module and the factory function ``package.module:factory`` (or
    ``path/to/file.py:factory``) names, imported but not called; ModelLoadError saying what
    is missing."""
    mod_name, func_name = spec.rsplit(":", 1)
    mod = _import_file(spec, Path(mod_name)) if mod_name.endswith(".py") else _import(spec)
    factory = getattr(mod, func_name, None)
    if not callable(factory):
        if mod_name.endswith(".py"):
            raise ModelLoadError(
                f"{spec}: module {mod_name!r} has no callable {func_name!r}"
                + _meant(mod, func_name)
            )
        raise ModelLoadError(
            f"{spec}: module {mod_name!r} ({_file_of(mod)}) has no callable {func_name!r}"
            + (_not_the_local_file(mod, mod_name, func_name) or _meant(mod, func_name))
        )
    if needs := [
        name
        for name, p in _parameters(factory).items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]:
        raise ModelLoadError(
            f"{spec}: the factory takes arguments ({', '.join(needs)}), and quantgate calls it "
            f"with none: give them defaults, or name a function that calls it with them "
            f"(def make(): return {func_name}(...))"
        )
    return mod, factory


def _parameters(factory: Callable) -> Mapping[str, inspect.Parameter]:
    """``factory``'s parameters; none where Python cannot tell them (a builtin, a C type)."""
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}


def _meant(mod: ModuleType, func_name: str) -> str:
    """The module's callable ``func_name`` is probably a misspelling of, said; else ""."""
    from quantgate.configs import did_you_mean

    return did_you_mean(
        func_name, (n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
    )


def _file_of(mod: ModuleType) -> str:
    return getattr(mod, "__file__", None) or "built into Python"


def _not_the_local_file(mod: ModuleType, mod_name: str, func_name: str) -> str:
    """Where ``package.module`` imported another module than the file of that name in the
    current directory (the standard library's ``signal``, not ./signal.py), that advice:
    name the file; else the empty string."""
    local = Path(*mod_name.split(".")).with_suffix(".py")
    file = getattr(mod, "__file__", None)
    if not local.is_file() or (file and Path(file).resolve() == local.resolve()):
        return ""
    top = mod_name.split(".")[0]
    whose = "the standard library's" if top in sys.stdlib_module_names else "another"
    return (
        f": {mod_name!r} is {whose} module, which the name finds before ./{local}. Name the "
        f"file instead ({local}:{func_name}), or rename it"
    )


def load_object(
    model: nn.Module | Callable[[], nn.Module],
    *,
    task: str | None = None,
    max_seq_len: int | None = None,
) -> LoadedModel:
    """A model given as a Python object: a ``torch.nn.Module`` that carries what a factory's
    module carries (``example_inputs``, ...), or the factory function itself. Its spec in
    messages and the manifest is where it was defined: ``package.module:name``."""
    if isinstance(model, nn.Module):
        kind = type(model)
        spec = f"{kind.__module__}:{kind.__qualname__}"
        return _from_factory(
            spec, lambda: model, inspect.getmodule(kind), task=task, max_seq_len=max_seq_len
        )
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    spec = f"{getattr(model, '__module__', None) or '?'}:{name}"
    return _from_factory(spec, model, inspect.getmodule(model), task=task, max_seq_len=max_seq_len)


def _from_factory(
    spec: str,
    factory: Callable[[], Any],
    mod: ModuleType | None,
    *,
    task: str | None,
    max_seq_len: int | None,
) -> LoadedModel:
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{spec}: the factory raised {brief(e)}") from e
    if not isinstance(module, nn.Module):
        raise ModelLoadError(
            f"{spec}: the factory returned {type(module).__name__}; expected a torch.nn.Module"
        )
    example = getattr(module, "example_inputs", None)
    if callable(example):
        example = example()
    if (
        not isinstance(example, Mapping)
        or not example
        or not all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in example.values())
    ):
        found = _example_found(example)
        raise ModelLoadError(
            f"{spec}: the torch.nn.Module the factory returns needs an attribute "
            "`example_inputs`, a dict of input name -> tensor (a real batch: dim 0 the batch, "
            f"dim 1 the sequence), to trace and validate with; it {found}. Set it on the "
            'module before returning it: model.example_inputs = {"input_ids": ids, ...}'
        )
    if unknown := _not_taken(module, example):
        raise ModelLoadError(
            f"{spec}: example_inputs names {unknown}, which forward does not take (forward"
            f"{inspect.signature(module.forward)}): the model is called "
            "as forward(**example_inputs), and served by the same names. Name each input as "
            "forward's parameter."
        )
    if where := _off_the_cpu(module, example):
        raise ModelLoadError(
            f"{spec}: {where}; quantgate runs the module on the CPU, in float32, to export and "
            "validate it. Return it with real weights, on the CPU (module.cpu(), and the "
            "example_inputs' tensors too; a module made on 'meta' needs load_state_dict(..., "
            "assign=True) first)"
        )
    arrays = _example_arrays(spec, example)
    if stored := half_precision(module):  # your module: quantgate does not cast it for you
        raise ModelLoadError(
            f"{spec}: the module's weights are in {stored}; quantgate exports float32 (and "
            "makes its FP16 and INT8 variants from it). Return `module.float()` from the "
            "factory: float32 holds every bfloat16 and float16 value exactly."
        )
    if wide := double_precision(module, example):  # an "fp32" bundle INT8 finds nothing in
        raise ModelLoadError(
            f"{spec}: {wide}; quantgate exports float32 and makes its FP16 and INT8 variants "
            "from it (ONNX Runtime quantizes float32 weights only). Return `module.float()` "
            "from the factory, and float example_inputs as float32 (`x.float()`)."
        )
    module.eval()
    pads = _factory_attributes(spec, module, arrays)
    for name, a in arrays.items():  # a padding mask under another name: quantgate misses it
        looks_like_one = "mask" in name.lower() and a.ndim == 2 and np.isin(a, (0, 1)).all()
        if name != "attention_mask" and looks_like_one:
            log.warning(
                "%s: input %r holds 0s and 1s like a padding mask; quantgate knows one only as "
                "`attention_mask` (1 = token): under another name its rows get no mask checks, "
                "and requests are not padded together in serving. Rename it if it is one.",
                spec,
                name,
            )
    inputs = tuple(
        InputSpec(name, str(a.dtype), pads.get(name, 0), tuple(a.shape[2:]))
        for name, a in arrays.items()
    )
    first = next(iter(arrays.values()))
    width = first.shape[1]
    declared_max = getattr(module, "max_seq_len", None)
    if max_seq_len is not None and declared_max is not None and max_seq_len > declared_max:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} is beyond {declared_max}, the module's own max_seq_len"
        )
    if "attention_mask" in arrays:
        _check_mask(spec, arrays["attention_mask"])
        lengths = arrays["attention_mask"].reshape(len(first), -1).sum(1)
    else:
        lengths = np.full(len(first), width)
    declared = getattr(module, "output_names", None)
    output_names = _output_names(spec, module, example, declared)
    wrapped = TupleOutputs(module, list(example), declared).eval()
    src = _source_file(type(module)) or (mod and _source_file(mod)) or ""
    # a module that names its classes says it is a classifier
    custom = "--task custom" if task else "task = 'custom'"  # as the task was said
    task = (
        task
        or getattr(module, "task", None)
        or (SEQUENCE_CLASSIFICATION if getattr(module, "class_names", None) else CUSTOM)
    )
    if task in QA_TASKS and not set(QA_OUTPUTS) <= set(output_names):
        raise ConfigError(
            f"{spec}: task {task!r}, but its outputs are named {', '.join(output_names)}: a "
            f"question answerer's gates pick answer spans from outputs named "
            f"{' and '.join(QA_OUTPUTS)}, each (batch, sequence), the scores of each token as "
            f"the answer's first and last. Name them so (the module's output_names), or say "
            f"{custom} to gate each output against FP32's alone"
        )
    if task not in FACTORY_TASKS:  # recorded as given (token-classification, say)
        log.warning(
            "%s: task %r is not one the gates know (%s): the model is gated as %r, each output "
            "against FP32's, unless an output is named `logits` or `sentence_embedding`%s",
            spec, task, ", ".join(FACTORY_TASKS), CUSTOM, did_you_mean(task, FACTORY_TASKS),
        )  # fmt: skip
    return LoadedModel(
        kind="factory",
        spec=spec,
        module=wrapped,
        inputs=inputs,
        outputs=tuple(output_names),
        task=task,
        max_seq_len=max_seq_len or declared_max or width,
        samples=Samples(arrays, lengths, f"{spec}: the module's example_inputs"),
        sha256=_hash_module(module, src),
        num_heads=getattr(module, "num_heads", 0),
        hidden_size=getattr(module, "hidden_size", 0),
        # as a Hugging Face config's id2label: labels by name, and the server's top classes
        extra={"labels": list(names)} if (names := getattr(module, "class_names", None)) else {},
    )


def _output_names(
    spec: str,
    module: nn.Module,
    example: Mapping[str, torch.Tensor],
    declared: Sequence[str] | None,
) -> list[str]:
    """The names of forward's outputs: ``output_names`` where the module declares them, else
    a dict's keys or a dataclass's or NamedTuple's fields, else ``output`` or ``output_0``,
    ``output_1``, ... Forward runs once on the example for them, so that a return of another
    form (a string, a set, an object) is refused here, as such, and not as a failure of
    the model in validation."""
    with (
        torch.no_grad(),
        warnings_caught(record=False),
    ):  # the model's own: export logs them (-v)
        try:
            out = module(**example)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{spec}: forward(**example_inputs) raised {brief(e)}") from e
    named = by_name(out)
    if named is None and not isinstance(out, (torch.Tensor, tuple, list)):
        raise ModelLoadError(f"{spec}: forward(**example_inputs) {unsupported_return(out)}")
    if declared is not None:
        if named is not None and (missing := [n for n in declared if n not in named]):
            raise ModelLoadError(
                f"{spec}: output_names names {', '.join(missing)}, which forward's "
                f"{type(out).__name__} does not hold (it holds {', '.join(map(str, named))}): "
                "output_names picks a dict's keys, or a dataclass's fields, by name"
            )
        return list(declared)
    if named is not None and all(isinstance(k, str) and k for k in named):
        return list(named)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple's fields
        return list(out._fields)
    n_out = 1 if isinstance(out, torch.Tensor) else len(named or out)
    return ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]


def _import(spec: str) -> ModuleType:
    """The module of ``package.module:factory``, imported by name."""
    mod_name = spec.rsplit(":", 1)[0]
    # `python -m quantgate` finds modules in the current directory, the console script would
    # not: put it on sys.path, as uvicorn does for `uvicorn module:app`, but last, so that a
    # file there named as another module (./statistics.py) does not replace that module for
    # the rest of the process (quantgate imports statistics itself).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        top = mod_name.split(".")[0]
        if e.name not in (top, mod_name):  # the module itself imports something missing
            raise ModelLoadError(f"importing {mod_name!r} for {spec} failed: {brief(e)}") from e
        raise ModelLoadError(
            f"cannot import {mod_name!r} for {spec}: no module {e.name!r} in the current "
            f"directory ({os.getcwd()}) or on the Python path. Run quantgate from the "
            "directory that holds it, add that directory to PYTHONPATH, or name the file: "
            f"path/to/{mod_name.replace('.', '/')}.py:{spec.rsplit(':', 1)[1]}."
        ) from e
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ModelLoadError(f"cannot import {mod_name!r} for {spec}: {brief(e)}") from e


def _import_file(spec: str, path: Path) -> ModuleType:
    """The module of ``path/to/file.py:factory``, loaded from that file under its own name,
    or under a private one where that name is another module's; the file's directory goes
    on ``sys.path`` so that its own imports of the files beside it work."""
    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"cannot load {spec}: no file {path} (from {os.getcwd()}). Name an existing "
            "Python file, or an importable `package.module:factory`."
        )
    path = path.resolve()
    name = path.stem if path.stem.isidentifier() else "quantgate_user_model"
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == path:
        return existing
    taken = _names_another_module(name, path)
    if taken:
        name = f"quantgate_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name]
    if str(path.parent) not in sys.path:
        # first, as `python file.py` has it; last where the file's name is another module's,
        # so that `import statistics` still finds the standard library's for the process
        sys.path.insert(len(sys.path) if taken else 0, str(path.parent))
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelLoadError(f"cannot load {spec}: {path} is not a Python module")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod  # dataclasses, pickle and torch look classes up by module name
    try:
        loader_spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        del sys.modules[name]
        raise ModelLoadError(f"cannot load {path} for {spec}: {brief(e)}") from e
    return mod


def _names_another_module(name: str, path: Path) -> bool:
    """Whether importing ``name`` gives (or would give) a module other than the file
    ``path``: one loaded already, one of the standard library, or one found on the Python
    path, an installed package's, say. A user's file registered under that name replaced that
    module for the whole process."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return Path(getattr(loaded, "__file__", "") or "").resolve() != path
    if name in sys.stdlib_module_names:
        return True
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a broken package of that name is another module too
        return True
    return found is not None and (found.origin is None or Path(found.origin).resolve() != path)


def _example_found(example: Any) -> str:
    """What a module's ``example_inputs`` is, where it is not a dict of 2-D (or more)
    tensors: "has none", "has an empty dict", "has input_ids of 1 dimension(s)", ..."""
    if example is None:
        return "has none"
    if not isinstance(example, Mapping):
        return f"has a {type(example).__name__}"
    if not example:
        return "has an empty dict"
    for name, v in example.items():
        if not isinstance(v, torch.Tensor):
            return f"has {name} as a {type(v).__name__}"
        if v.dim() < 2:
            return f"has {name} of {v.dim()} dimension(s)"
    return "has it otherwise"


def _not_taken(module: nn.Module, example: Mapping[str, torch.Tensor]) -> list[str]:
    """The example's input names that ``forward`` has no parameter for (none where it takes
    ``**kwargs``, or its signature cannot be read)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin's, a compiled module's
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [name for name in example if name not in params]


def _check_mask(spec: str, mask: np.ndarray) -> None:
    """ModelLoadError unless the example's attention_mask marks each row's tokens with 1s:
    one that marks padding (True = pad, as nn.MultiheadAttention's key_padding_mask takes
    it) read the example's full rows as 0 tokens, and validation failed in other words."""
    rows = mask.reshape(len(mask), -1)
    if np.isin(rows, (0, 1)).all() and rows.any(axis=1).all():
        return
    inverted = np.isin(rows, (0, 1)).all()  # 0s and 1s, and a row of 0s: full, if inverted
    raise ModelLoadError(
        f"{spec}: example_inputs['attention_mask'] must be 1 on each row's tokens and 0 on its "
        f"padding, with a token in every row; found {np.unique(rows)[:6].tolist()} with "
        f"{int((~rows.any(axis=1)).sum())} of {len(rows)} rows without a 1"
        + (
            ". Is it inverted (True = padding, as nn.MultiheadAttention's key_padding_mask "
            "takes it)? Give attention_mask as 1 = token, and invert it inside forward"
            if inverted
            else ""
        )
    )


def _off_the_cpu(module: nn.Module, example: Mapping[str, torch.Tensor]) -> str | None:
    """Where the module's weights or example tensors are not on the CPU, said; else None. A
    module on 'meta' has no values at all (hashing its weights raised NotImplementedError)."""
    for kind, tensors in (
        ("weights", dict(module.state_dict())),
        ("example_inputs", dict(example)),
    ):
        if off := {n: t.device for n, t in tensors.items() if t.device.type != "cpu"}:
            name, device = next(iter(off.items()))
            more = f" and {len(off) - 1} more" if len(off) > 1 else ""
            return f"its {kind} are on {device.type!r} ({name}{more})"
    return None


def _example_arrays(spec: str, example: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``example_inputs`` as numpy arrays, once they share dims 0 (batch) and 1 (sequence)."""
    arrays = {}
    for name, t in example.items():
        try:
            arrays[name] = t.detach().cpu().numpy()
        except TypeError as e:  # bfloat16 and other dtypes numpy (and ONNX Runtime feeds) lack
            raise ModelLoadError(
                f"{spec}: example_inputs[{name!r}] has dtype {t.dtype}, which has no numpy "
                "equivalent to feed ONNX Runtime; use int64 ids or float32 values"
            ) from e
    shapes = {n: tuple(a.shape) for n, a in arrays.items()}
    if len({s[:2] for s in shapes.values()}) != 1:
        raise ModelLoadError(
            f"{spec}: example_inputs disagree on (batch, sequence), dims 0 and 1: {shapes}. "
            "Every input must be one batch of the same rows and tokens: a value per row (a "
            "row's features, (batch, F)) goes in as one per token, repeated along the "
            "sequence, (batch, sequence, F), and forward takes it from the first token."
        )
    return arrays


def _is_names(x: Any) -> TypeGuard[Sequence[str]]:
    """Whether ``x`` is a sequence of non-empty strings (class names), not a string."""
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and all(isinstance(c, str) and c for c in x)
    )


def _factory_attributes(
    spec: str, module: nn.Module, arrays: Mapping[str, np.ndarray]
) -> dict[str, int | float]:
    """Check the module's optional attributes; return its pad values per input."""
    problems = []
    names = getattr(module, "output_names", None)
    if names is not None and (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
        or set(names) & set(arrays)
    ):
        problems.append(
            f"output_names {names!r}: expected a sequence of distinct non-empty strings, none "
            f"of them an input name ({', '.join(arrays)})"
        )
    for attr, least in (("max_seq_len", 1), ("num_heads", 0), ("hidden_size", 0)):
        value = getattr(module, attr, None)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            problems.append(f"{attr} {value!r}: expected an int >= {least}")
    task = getattr(module, "task", None)
    if task is not None and not isinstance(task, str):
        problems.append(f"task {task!r}: expected a string")
    classes = getattr(module, "class_names", None)
    if classes is not None and not _is_names(classes):
        problems.append(f"class_names {classes!r}: expected a sequence of non-empty strings")
    for other in ("id2label", "labels"):  # what other libraries call it: not read here
        names = getattr(module, other, None)
        if isinstance(names, Mapping):  # id2label: index -> name
            names = list(names.values())
        if classes is None and _is_names(names) and len(names) > 0:  # not a tensor's truth
            problems.append(
                f"{other} is not read: name a classifier's classes, by index, in "
                "`class_names` (a sequence of strings)"
            )
    pads = getattr(module, "pad_values", None) or {}
    if not isinstance(pads, Mapping) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in pads.values()
    ):
        problems.append(f"pad_values {pads!r}: expected a dict of input name -> int or float")
    elif unknown := sorted(set(pads) - set(arrays)):
        problems.append(f"pad_values names {unknown}, which are not inputs ({', '.join(arrays)})")
    if problems:
        raise ModelLoadError(
            f"{spec}: the module's attributes do not fit the factory contract:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return dict(pads)


def _source_file(obj: Any) -> str | None:
    """Where ``obj`` (a class, a module) was defined; None when nowhere on disk (a class
    typed into an interactive session)."""
    try:
        return inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return None


def _hash_module(module: nn.Module, source_file: str) -> str:
    h = hashlib.sha256()
    if source_file and Path(source_file).is_file():
        h.update(Path(source_file).read_bytes())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + b"\0")
        # the bytes as they are: numpy has no bfloat16 (nor float8)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
