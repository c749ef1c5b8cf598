"""Resolve a MODEL spec into what export needs: a module, its inputs, and real samples.

A spec names one of three kinds of model:

``path/to/checkpoint``
    A checkpoint directory written by ``quantgate train`` (``config.json`` + ``model.pt``):
    the built-in encoder classifier. Samples: the digits test split.

``path/to/hf-model``
    A Hugging Face model directory (``config.json`` with a ``model_type``), loaded offline
    with eager attention, the implementation whose graph ONNX Runtime's attention fusion
    recognises. Inputs are inferred from the model's ``forward``: ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` when it takes them. Tasks:

    - ``sequence-classification`` (and ``multi-label-classification``): outputs
      ``logits`` (batch, labels);
    - ``token-classification``: outputs ``logits`` (batch, sequence, labels);
    - ``question-answering``: outputs ``start_logits`` and ``end_logits`` (batch,
      sequence), extractive;
    - ``feature-extraction``: outputs ``last_hidden_state`` (batch, sequence, hidden) and
      ``sentence_embedding`` (batch, hidden), pooled over the real tokens as the
      directory's sentence-transformers config says (mask mean-pool by default, then L2
      normalisation when it lists a Normalize module).

    Samples: real English text (``pydoc_data.topics``, the help texts shipped with
    CPython) tokenized with the model's own tokenizer.

``package.module:factory`` or ``path/to/file.py:factory``
    Your own module, imported by name (from the current directory too, after the rest of
    the path) or loaded from its file (whose directory then comes first on ``sys.path``, as
    ``python file.py`` would have it; last, and the file loaded under a private name, where
    its name is another module's: a ``statistics.py`` never replaces the standard library's
    for the process). ``factory()`` is called with no arguments and returns a
    ``torch.nn.Module`` that also carries::

        example_inputs: dict[str, torch.Tensor]  # a real batch; dim 0 is the batch,
                                                 # dim 1 the sequence, shared by every input
        output_names: Sequence[str]              # optional: names for forward's outputs
                                                 # (default: a dict's keys, else output_N)
        task: str                                # optional, recorded in the bundle
        class_names: Sequence[str]               # optional: a classifier's classes by index
        max_seq_len: int                         # optional: longest sequence it accepts
        pad_values: dict[str, int | float]       # optional: filler per input (default 0)
        num_heads: int; hidden_size: int         # optional: hints for attention fusion

    ``forward(**example_inputs)`` returns a tensor, a tuple or list of tensors or a dict of
    tensors (a dataclass's fields are a dict's keys). An input named ``attention_mask``
    marks real tokens with 1. Samples: the module's own ``example_inputs``.

From Python, the model object itself works the same way: such a ``torch.nn.Module`` (put in
eval mode), or the factory function.

``load_model`` tells the kinds apart (``spec_kind``) and loads a checkpoint here; a Hugging
Face directory is loaded by ``huggingface.py``, a factory or a model object by
``factories.py``.

Every loaded model is wrapped so that ``module(*tensors)`` takes the inputs positionally in
``inputs`` order and returns a tuple of tensors in ``outputs`` order: the form both ONNX
exporters trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
import torch.nn as nn

from quantgate import configs
from quantgate.bundle import model_identity
from quantgate.errors import ConfigError, ConfigTypeError, ModelLoadError
from quantgate.tasks import (
    FEATURE_EXTRACTION,
    MULTI_LABEL_CLASSIFICATION,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)

# What names a model: a path or a ``package.module:factory`` string (the command line's
# MODEL), or from Python the module object or its factory function.
ModelSpec: TypeAlias = str | os.PathLike | nn.Module | Callable[[], nn.Module]

# package.module:factory, or path/to/file.py:factory
FACTORY_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # numpy dtype name
    pad_value: int | float = 0  # what fills a row past its real length
    fixed_dims: tuple[int, ...] = ()  # dims after (batch, sequence), if any


@dataclass(frozen=True)
class Samples:
    """Real rows to validate on: one (N, T, ...) array per input and each row's real length."""

    arrays: dict[str, np.ndarray]
    lengths: np.ndarray  # (N,) real tokens per row; positions past it hold padding
    source: str  # where the rows came from, for the report

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return next(iter(self.arrays.values())).shape[1]


@dataclass(frozen=True)
class LoadedModel:
    kind: str  # "checkpoint" | "huggingface" | "factory"
    spec: str
    module: nn.Module  # eval mode; module(*inputs) -> tuple of outputs, both in spec order
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    task: str
    max_seq_len: int
    samples: Samples
    sha256: str  # content hash of what was loaded (files, or weights and source)
    num_heads: int = 0  # attention fusion hints; 0 lets ONNX Runtime detect them
    hidden_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the bundle manifest

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def released(self) -> LoadedModel:
        """This description with an empty module in place of the model: what the stages after
        the export read, without holding its weights."""
        return dataclasses.replace(self, module=nn.Module())

    @property
    def source(self) -> dict[str, Any]:
        # identity: the spec resolved, which tells a re-export from another model's
        return {
            "kind": self.kind,
            "spec": self.spec,
            "identity": model_identity(self.spec),
            "sha256": self.sha256,
        }


class TupleOutputs(nn.Module):
    """Adapts a module to positional inputs and a tuple of outputs in a fixed order."""

    def __init__(
        self,
        module: nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str] | None = None,
        *,
        call: Callable[..., Any] | None = None,
    ):
        super().__init__()
        self.inner = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names) if output_names is not None else None
        self.call = call  # maps (inner, **inputs) -> outputs; default inner(**inputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.input_names, tensors, strict=True))
        out = self.call(self.inner, **kwargs) if self.call else self.inner(**kwargs)
        if isinstance(out, torch.Tensor):
            return (out,)
        if (named := by_name(out)) is not None:
            return tuple(named[n] for n in self.output_names or named)
        if isinstance(out, (tuple, list)):  # a NamedTuple too: output_names rename its fields
            return tuple(out)
        raise ModelLoadError(f"the model's forward {unsupported_return(out)}")


def by_name(out: Any) -> dict[str, Any] | None:
    """A forward's outputs by name where its return is a dict (Hugging Face's ModelOutput is
    one) or a dataclass instance, whose fields name them as a dict's keys would; else None.
    ``output_names`` picks among these names."""
    if isinstance(out, Mapping):
        return dict(out)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return None


def unsupported_return(out: Any) -> str:
    """What ``forward`` returned, said where it is none of the forms it may take."""
    kind = type(out).__name__
    shown = f" ({out!r:.40})" if isinstance(out, (str, bytes, int, float, bool)) else ""
    return (
        f"returned {kind}{shown}; expected a tensor, a tuple or list of tensors, or a dict of "
        "tensors (a NamedTuple, a dataclass or a Hugging Face ModelOutput is taken as one). "
        "Return the tensors the model computes in one of these forms."
    )


def load_model(
    spec: ModelSpec, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    """Load a checkpoint directory, a Hugging Face directory or a ``pkg.mod:factory``; from
    Python also a module object or a factory function (as a factory's module)."""
    # Both build on this module's classes: imported when called, not in a cycle at import.
    from quantgate.model.factories import load_factory, load_object
    from quantgate.model.huggingface import load_huggingface

    if isinstance(spec, nn.Module) or callable(spec):
        return load_object(spec, task=task, max_seq_len=max_seq_len)
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigTypeError(
            f"model: expected a path, a 'package.module:factory' string, a torch.nn.Module or "
            f"a function that returns one, found {type(spec).__name__}"
        )
    text = str(spec)
    kind = spec_kind(spec)
    if kind == "factory":
        return load_factory(text, task=task, max_seq_len=max_seq_len)
    path = Path(text).expanduser()
    if kind == "checkpoint":
        return load_builtin_checkpoint(path, task=task, max_seq_len=max_seq_len)
    if kind == "huggingface":
        return load_huggingface(path, task=task, max_seq_len=max_seq_len)
    # Nothing loadable: say which of the three it fails to be, and why.
    if not path.exists():
        raise ModelLoadError(
            f"no model at {text}: the path does not exist. MODEL is a checkpoint directory "
            "(`quantgate train`), a Hugging Face model directory, `package.module:factory` "
            "or `path/to/file.py:factory`."
        )
    config = path / "config.json"
    if path.is_file() and path.suffix == ".py":
        raise ModelLoadError(
            f"{text} is a Python file: name the function in it that returns the model, "
            f"`{text}:FUNCTION` (a torch.nn.Module with an `example_inputs` dict; "
            'docs/export.md, "Factories").'
        )
    if not path.is_dir() or not config.is_file():
        raise ModelLoadError(
            f"{text} is not a model directory: expected a directory with config.json "
            "(a quantgate checkpoint or a Hugging Face model)."
        )
    # Bad JSON is named as such, before the "neither" below.
    read_json(config, dict, "a quantgate checkpoint or Hugging Face model config")
    from quantgate.model.train import CHECKPOINT_FORMAT

    raise ModelLoadError(
        f"{config} is neither a quantgate checkpoint (format {CHECKPOINT_FORMAT!r}) nor a "
        "Hugging Face config (no model_type)."
    )


def spec_kind(spec: ModelSpec) -> str | None:
    """What a MODEL spec names, cheaply and without raising: "factory" (a module object or
    a factory function too), "checkpoint", "huggingface", or None when it names nothing
    loadable (``load_model`` says why)."""
    if isinstance(spec, nn.Module) or callable(spec):
        return "factory"
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists():
        return "factory" if FACTORY_SPEC.match(text) else None
    from quantgate.model.train import is_checkpoint

    if is_checkpoint(path):
        return "checkpoint"
    try:
        info = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return "huggingface" if isinstance(info, dict) and "model_type" in info else None


# -- the built-in checkpoint -------------------------------------------------------------


def load_builtin_checkpoint(
    path: Path, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    from quantgate.model.data import PAD_ID, load_digits_splits
    from quantgate.model.train import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint

    if task not in (None, SEQUENCE_CLASSIFICATION):
        raise ConfigError(
            f"the built-in checkpoint is a {SEQUENCE_CLASSIFICATION} model; --task {task} "
            f"does not apply: leave --task out (or give --task {SEQUENCE_CLASSIFICATION})"
        )
    model, info = load_checkpoint(path)
    cfg = model.cfg
    if max_seq_len is not None and not 1 <= max_seq_len <= cfg.max_seq_len:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} is outside 1..{cfg.max_seq_len}, the positions the "
            "checkpoint was trained with"
        )
    test = load_digits_splits()["test"]
    samples = Samples(
        arrays={"input_ids": test.input_ids[:32], "attention_mask": test.attention_mask[:32]},
        lengths=test.attention_mask[:32].sum(1),
        source="digits test split (scikit-learn), first 32 images",
    )
    inputs = (InputSpec("input_ids", "int64", PAD_ID), InputSpec("attention_mask", "int64", 0))
    return LoadedModel(
        kind="checkpoint",
        spec=str(path),
        module=TupleOutputs(model, [i.name for i in inputs]).eval(),
        inputs=inputs,
        outputs=("logits",),
        task=SEQUENCE_CLASSIFICATION,
        max_seq_len=max_seq_len or cfg.max_seq_len,
        samples=samples,
        sha256=hash_files([path / CONFIG_FILE, path / WEIGHTS_FILE], root=path),
        num_heads=cfg.n_heads,
        hidden_size=cfg.d_model,
        extra={"labels": [str(d) for d in range(cfg.n_classes)], "model": cfg.to_dict()},
    )


# -- helpers -----------------------------------------------------------------------------


def hash_files(files: Sequence[Path], *, root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, in the given order."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# what other libraries call the tasks the gates know
_OTHER_NAMES = {
    "classification": SEQUENCE_CLASSIFICATION,
    "text-classification": SEQUENCE_CLASSIFICATION,
    "multi-label": MULTI_LABEL_CLASSIFICATION,
    "multilabel-classification": MULTI_LABEL_CLASSIFICATION,
    "multi_label_classification": MULTI_LABEL_CLASSIFICATION,  # Hugging Face's problem_type
    "ner": TOKEN_CLASSIFICATION,
    "tagging": TOKEN_CLASSIFICATION,
    "qa": QUESTION_ANSWERING,
    "extractive-qa": QUESTION_ANSWERING,
    "embedding": FEATURE_EXTRACTION,
    "sentence-similarity": FEATURE_EXTRACTION,
}


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice ``value`` is another library's name for, or
    a misspelling of; else the empty string."""
    return configs.did_you_mean(value, choices, _OTHER_NAMES.get(value.lower()))


HALF = (torch.bfloat16, torch.float16)


def half_precision(module: nn.Module) -> str:
    """The 16-bit float dtypes among ``module``'s weights and buffers, as text ("" if none):
    quantgate's reference is float32, its FP16 and INT8 variants made from it, and float32
    holds every bfloat16 and float16 value exactly. (Float64: ``double_precision``.)"""
    tensors = (*module.parameters(), *module.buffers())
    return ", ".join(
        sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.dtype in HALF})
    )


def double_precision(module: nn.Module, example: Mapping[str, torch.Tensor]) -> str:
    """What of ``module``'s parameters and ``example`` inputs is float64, said ("" if none).
    Exported so, the model is float64 through and through, an "fp32" bundle that ONNX
    Runtime's quantizer (float32 weights only) finds nothing to quantize in, with advice to
    skip INT8. (A float64 buffer kept on purpose, a constant, is the module's own
    business.)"""
    weights = [n for n, p in module.named_parameters() if p.dtype == torch.float64]
    inputs = [repr(n) for n, t in example.items() if t.dtype == torch.float64]
    found = []
    if weights:
        more = f" and {len(weights) - 3} more" if len(weights) > 3 else ""
        found.append(f"the module's weights ({', '.join(weights[:3])}{more})")
    if inputs:
        found.append(f"example_inputs {', '.join(inputs)}")
    if not found:
        return ""
    return f"{' and '.join(found)} {'are' if weights or len(inputs) > 1 else 'is'} in float64"


def read_json(path: Path, kind: type[dict] | type[list], what: str) -> Any:
    """``path`` parsed as JSON, which must hold a ``kind``; else a ModelLoadError saying so."""
    expected = f"a JSON {'object' if kind is dict else 'array'}: {what}"
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(
            f"{path} is not valid JSON ({e}); expected {expected}. Fix or replace the file."
        ) from e
    if not isinstance(value, kind):
        raise ModelLoadError(
            f"{path} holds a {type(value).__name__}; expected {expected}. Fix or replace the file."
        )
    return value


def brief(e: BaseException) -> str:
    """``Type: first line`` of an exception, for messages that must stay readable."""
    msg = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not msg:
        return type(e).__name__
    first = msg[0] if not msg[0].endswith(":") or len(msg) < 2 else f"{msg[0]} {msg[1]}"
    return f"{type(e).__name__}: {first}"
