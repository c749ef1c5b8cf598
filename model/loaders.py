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

    - ``sequence-classification``: outputs ``logits`` (batch, labels);
    - ``token-classification``: outputs ``logits`` (batch, sequence, labels);
    - ``feature-extraction``: outputs ``last_hidden_state`` (batch, sequence, hidden) and
      ``sentence_embedding`` (batch, hidden), pooled over the real tokens as the
      directory's sentence-transformers config says (mask mean-pool by default, then L2
      normalisation when it lists a Normalize module).

    Samples: real English text (``pydoc_data.topics``, the help texts shipped with
    CPython) tokenized with the model's own tokenizer.

``package.module:factory`` or ``path/to/file.py:factory``
    Your own module, imported by name (from the current directory too) or loaded from its
    file (whose directory then comes first on ``sys.path``, as ``python file.py`` would
    have it). ``factory()`` is called with no arguments and returns a
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

    ``forward(**example_inputs)`` returns a tensor, a tuple of tensors or a dict of
    tensors. An input named ``attention_mask`` marks real tokens with 1. Samples: the
    module's own ``example_inputs``.

From Python, the model object itself works the same way: such a ``torch.nn.Module`` (put in
eval mode), or the factory function.

Every loaded model is wrapped so that ``module(*tensors)`` takes the inputs positionally in
``inputs`` order and returns a tuple of tensors in ``outputs`` order: the form both ONNX
exporters trace.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from quantgate.bundle import model_identity
from quantgate.configs import closest
from quantgate.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"  # a class per token: tagging, NER
FEATURE_EXTRACTION = "feature-extraction"
CUSTOM = "custom"  # a factory model that is none of them: per-output gates only
HF_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION)
# The heads quantgate exports, by the suffix of their architecture's name; a pretraining
# head (masked or causal LM) is left behind as feature-extraction asks, any other refused.
HF_HEADS = {
    SEQUENCE_CLASSIFICATION: "ForSequenceClassification",
    TOKEN_CLASSIFICATION: "ForTokenClassification",
}
PRETRAINING_HEADS = ("ForMaskedLM", "ForPreTraining", "ForCausalLM")
FACTORY_TASKS = (*HF_TASKS, CUSTOM)
HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # in this order, when taken

# What names a model: a path or a ``package.module:factory`` string (the command line's
# MODEL), or from Python the module object or its factory function.
ModelSpec = str | os.PathLike | nn.Module | Callable[[], nn.Module]

# package.module:factory, or path/to/file.py:factory
FACTORY_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*$")
SENTENCE_CONFIG = "a sentence-transformers config"
# sentence-transformers' Pooling modes (flag suffix, or the one-string form) -> SentenceEmbedder's
POOLING_MODES = {"mean_tokens": "mean", "mean": "mean", "cls_token": "cls", "cls": "cls"}
N_TEXT_SAMPLES = 16  # sentences and paragraphs tokenized for Hugging Face validation


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
        if isinstance(out, Mapping):
            names = self.output_names or tuple(out)
            return tuple(out[n] for n in names)
        return tuple(out)


def load_model(
    spec: ModelSpec, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    """Load a checkpoint directory, a Hugging Face directory or a ``pkg.mod:factory``; from
    Python also a module object or a factory function (as a factory's module)."""
    if isinstance(spec, nn.Module) or callable(spec):
        return load_object(spec, task=task, max_seq_len=max_seq_len)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
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
    if not path.is_dir() or not config.is_file():
        raise ModelLoadError(
            f"{text} is not a model directory: expected a directory with config.json "
            "(a quantgate checkpoint or a Hugging Face model)."
        )
    # Bad JSON is named as such, before the "neither" below.
    _read_json(config, dict, "a quantgate checkpoint or Hugging Face model config")
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
    try:
        info = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    from quantgate.model.train import CHECKPOINT_FORMAT

    if info.get("format") == CHECKPOINT_FORMAT:
        return "checkpoint"
    return "huggingface" if "model_type" in info else None


# -- the built-in checkpoint -------------------------------------------------------------


def load_builtin_checkpoint(
    path: Path, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    from quantgate.model.data import PAD_ID, load_digits_splits
    from quantgate.model.train import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint

    if task not in (None, SEQUENCE_CLASSIFICATION):
        raise ConfigError(
            f"the built-in checkpoint is a {SEQUENCE_CLASSIFICATION} model; --task {task} does not apply"
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


# -- Hugging Face directories ------------------------------------------------------------


def load_huggingface(
    path: Path, *, task: str | None = None, max_seq_len: int | None = None
) -> LoadedModel:
    try:
        from transformers import AutoConfig, AutoTokenizer
    except ImportError as e:
        raise ModelLoadError(
            f"{path} is a Hugging Face model; install the hf extra: pip install 'quantgate[hf]'"
        ) from e
    if task is not None and task not in HF_TASKS:
        raise ConfigError(
            f"--task {task}: a Hugging Face model is one of {', '.join(HF_TASKS)}"
            + _did_you_mean(task, HF_TASKS)
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise ModelLoadError(f"cannot load the Hugging Face model at {path}: {_brief(e)}") from e
    archs = config.architectures or []
    task = _hf_task(path, archs, task)
    model = _hf_model(path, task)
    takes = inspect.signature(model.forward).parameters
    names = [n for n in HF_INPUTS if n in takes and n in tokenizer.model_input_names]
    if getattr(config, "type_vocab_size", None) == 0 and "token_type_ids" in names:
        names.remove("token_type_ids")  # DeBERTa's: no table reads them, no graph input could
    if "input_ids" not in names:
        raise ModelLoadError(
            f"{path}: expected a text model taking input_ids; its forward takes {list(takes)[:6]}"
        )
    positions = _hf_positions(model, config)
    limit = min(_hf_max_seq_len(path, config, tokenizer), positions)
    if max_seq_len is not None and not 1 <= max_seq_len <= positions:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} is outside 1..{positions}, the positions the model "
            "has embeddings for"
        )
    max_seq_len = max_seq_len or limit
    vocab = model.get_input_embeddings().num_embeddings
    pad_id = _hf_pad_id(path, config, tokenizer, task, vocab)
    if getattr(model.config, "pad_token_id", None) is None:
        # The tokenizer's, as Hugging Face's recipe for GPT-2 classifiers sets it: without
        # one such a model cannot find each row's last token in a padded batch at all.
        model.config.pad_token_id = pad_id
    inputs = tuple(InputSpec(n, "int64", pad_id if n == "input_ids" else 0) for n in names)

    if task in HF_HEADS:  # (batch, classes) logits, or (batch, sequence, classes)
        outputs = ("logits",)
        module = TupleOutputs(model, names, call=lambda m, **kw: m(**kw).logits)
        extra_task = {"labels": [config.id2label[i] for i in sorted(config.id2label)]}
    else:
        outputs = ("last_hidden_state", "sentence_embedding")
        pooling = _sentence_pooling(path)
        module = TupleOutputs(SentenceEmbedder(model, **pooling), names)
        extra_task = {"pooling": pooling}
    return LoadedModel(
        kind="huggingface",
        spec=str(path),
        module=module.eval(),
        inputs=inputs,
        outputs=outputs,
        task=task,
        max_seq_len=max_seq_len,
        samples=_readable(path, tokenizer, text_samples(tokenizer, inputs, max_seq_len)),
        sha256=hash_files(sorted(p for p in path.rglob("*") if p.is_file()), root=path),
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        extra={
            "huggingface": {
                "model_type": config.model_type,
                "architectures": archs,
                "attn_implementation": "eager",
                # AutoTokenizer.from_pretrained(this); the bundle keeps a copy (writer.py)
                "tokenizer": str(path),
                "pad_token_id": pad_id,
                # the rows of the embedding tables: ids at or above them are refused as data
                "vocab_size": vocab,
                "type_vocab_size": getattr(config, "type_vocab_size", None),
            },
            **extra_task,
        },
    )


def _hf_pad_id(path: Path, config: Any, tokenizer: Any, task: str, vocab: int) -> int:
    """The id that pads a row of the model's token ids: config.json's ``pad_token_id``, the
    model's own (a GPT-2 classifier finds each row's last token by it; RoBERTa numbers
    positions after it), else its tokenizer's (which the model is then given). The tokenizer
    pads with it from here on (the bundle records it; the server pads batches with it).

    Where neither names one, a classifier is refused: a GPT-2 style classifier cannot find
    a padded row's last token without it. Other models are padded with id 0 behind their
    attention mask (the export's padding check shows that changes no answer). An id outside
    the vocabulary is refused."""
    model_pad, tokenizer_pad = getattr(config, "pad_token_id", None), tokenizer.pad_token_id
    if isinstance(model_pad, list):  # some configs list one per vocabulary
        model_pad = model_pad[0] if model_pad else None
    if model_pad is None and tokenizer_pad is None:
        if task == SEQUENCE_CLASSIFICATION:
            raise ModelLoadError(
                f"{path}: neither config.json nor the tokenizer names a padding token, and a "
                "classifier's rows of different lengths are padded to be batched (a GPT-2 "
                'style classifier finds each row\'s last token by it). Set "pad_token_id" in '
                'config.json and "pad_token" in tokenizer_config.json to the same token (for '
                "GPT-2 style models, the end-of-text token, as their classifiers are "
                "fine-tuned with)."
            )
        log.info("%s: no padding token named; rows are padded with id 0", path)
        tokenizer_pad = 0
    if model_pad is not None and tokenizer_pad is not None and model_pad != tokenizer_pad:
        log.warning(
            "%s: config.json's pad_token_id is %s, the tokenizer pads with %s: quantgate pads "
            "with %s, the model's own",
            path, model_pad, tokenizer_pad, model_pad,
        )  # fmt: skip
    pad = int(model_pad if model_pad is not None else tokenizer_pad)
    if not 0 <= pad < vocab:
        whose = "config.json's pad_token_id" if model_pad is not None else "the tokenizer's pad"
        raise ModelLoadError(
            f"{path}: {whose} is {pad}, outside the model's vocabulary (ids 0..{vocab - 1}): "
            "a padded row would index past its embedding table. Set it to a token of the "
            "vocabulary (for GPT-2 style models, the end-of-text token)."
        )
    tokenizer.pad_token_id = pad
    return pad


def _hf_task(path: Path, archs: Sequence[str], task: str | None) -> str:
    """The task of the Hugging Face model at ``path``: ``task`` when given, else its head's
    (``HF_HEADS``), else feature-extraction. A head asked for and absent is refused (its
    weights would be random), and so is a head quantgate does not export unless
    feature-extraction is asked for: it would be dropped without a word."""
    # in the config's order: its first architecture is the model's own
    heads = [t for a in archs for t, suffix in HF_HEADS.items() if a.endswith(suffix)]
    if task in HF_HEADS and task not in heads:
        raise ConfigError(
            f"{path} has no {task} head (architectures: {archs}); exporting one would ship "
            "random weights. Use --task feature-extraction, or fine-tune first."
        )
    other = [
        a for a in archs
        if "For" in a and not a.endswith((*HF_HEADS.values(), *PRETRAINING_HEADS))
    ]  # fmt: skip
    if task is None and not heads and other:
        raise ConfigError(
            f"{path} is a {other[0]}: quantgate exports {', '.join(HF_TASKS)} models, and as "
            "feature-extraction this head would be dropped, its outputs with it. Pass --task "
            "feature-extraction to export the encoder without it."
        )
    task = task or (heads[0] if heads else FEATURE_EXTRACTION)
    if task == FEATURE_EXTRACTION and (dropped := [a for a in archs if "For" in a]):
        log.warning("%s: exporting the encoder of %s, without its head", path, dropped[0])
    return task


def _hf_model(path: Path, task: str) -> nn.Module:
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from transformers.utils import logging as hf_logging

    cls = {
        SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
        TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    }.get(task, AutoModel)
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # its tqdm bar would tear through quantgate's own
    # Its load report (a table with terminal colour codes) lists the head a checkpoint has
    # and quantgate leaves behind, and the pooler it does not use, as alarms; what matters
    # of it is said below.
    hf_logging.set_verbosity_error()
    try:
        # Eager attention: with SDPA the exported graph hides attention from ORT's fusions.
        model, loading = cls.from_pretrained(
            path, local_files_only=True, attn_implementation="eager", output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {path} for {task}: {_brief(e)}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    _warn_random_weights(path, task, loading)
    if stored := _not_float32(model):  # transformers loads a checkpoint in the dtype it was saved
        log.info("%s: weights stored in %s, exported in float32 (exactly)", path, stored)
        model.float()
    return model.eval()


def _not_float32(module: nn.Module) -> str:
    """The floating dtypes other than float32 among ``module``'s weights, as text ("" if
    none): quantgate's reference is float32, its FP16 and INT8 variants made from it."""
    tensors = (*module.parameters(), *module.buffers())
    found = {str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}
    return ", ".join(sorted(found - {"float32"}))


def _warn_random_weights(path: Path, task: str, loading: Mapping[str, Any]) -> None:
    """Weights the checkpoint lacks, which transformers initialised at random: a warning
    naming them. A feature extractor's pooler is not among them: quantgate pools itself."""
    random = [
        str(k) for k in (*loading.get("missing_keys", ()), *loading.get("mismatched_keys", ()))
        if not (task == FEATURE_EXTRACTION and str(k).startswith("pooler."))
    ]  # fmt: skip
    if random:
        log.warning(
            "%s: %d weight(s) of the model are not in the checkpoint (or not of its shape) "
            "and are random: %s%s. Its outputs are not the trained model's; fine-tune it, or "
            "export the checkpoint it was trained as",
            path, len(random), ", ".join(random[:4]), ", ..." if len(random) > 4 else "",
        )  # fmt: skip


def _readable(path: Path, tokenizer, samples: Samples) -> Samples:
    """``samples``, once the tokenizer is shown to read English. From a directory without its
    files (vocab.txt, tokenizer.json, ...) transformers builds a tokenizer with no vocabulary,
    which turns every word into the unknown token: validation would pass and serve garbage."""
    if tokenizer.unk_token_id is None:
        return samples
    ids = samples.arrays["input_ids"]
    real = np.arange(ids.shape[1]) < samples.lengths[:, None]  # (N, T): not padding
    unknown = float((ids[real] == tokenizer.unk_token_id).mean())
    if unknown > 0.5:
        raise ModelLoadError(
            f"{path}: its tokenizer reads {unknown:.0%} of English text's tokens as the unknown "
            f"token {tokenizer.unk_token!r} (it has {len(tokenizer)} tokens): the directory "
            "lacks the tokenizer's files (tokenizer.json, vocab.txt, ...). Copy them in beside "
            "config.json."
        )
    return samples


def _hf_positions(model: nn.Module, config) -> int:
    """How many tokens the model has position embeddings for. RoBERTa and its kin (XLM-R,
    CamemBERT, ...) number positions from ``padding_idx + 1``: of roberta-base's 514
    embeddings, 512 are usable."""
    base = getattr(model, "base_model", model)  # the encoder under a classification head
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if isinstance(table, nn.Embedding) and table.padding_idx is not None:
        return table.num_embeddings - table.padding_idx - 1
    return config.max_position_embeddings


def _hf_max_seq_len(path: Path, config, tokenizer) -> int:
    """The longest input the model is meant for: sentence-transformers' limit, else the model's."""
    st = path / "sentence_bert_config.json"
    if st.is_file() and (n := _read_json(st, dict, SENTENCE_CONFIG).get("max_seq_length")):
        return int(n)
    limit = config.max_position_embeddings
    if isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < 1_000_000:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def _sentence_pooling(path: Path) -> dict[str, Any]:
    """Pooling per the directory's sentence-transformers config (mean, no normalisation if none)."""
    mode, normalize = "mean", False
    modules = path / "modules.json"
    if modules.is_file():
        entries = _read_json(modules, list, "sentence-transformers' list of modules")
        normalize = any(e.get("type", "").endswith(".Normalize") for e in entries)
        for e in entries:
            cfg = path / e.get("path", "") / "config.json"
            if e.get("type", "").endswith(".Pooling") and cfg.is_file():
                mode = _pooling_mode(cfg)
    return {"mode": mode, "normalize": normalize}


def _pooling_mode(cfg: Path) -> str:
    """The Pooling module's one mode, when SentenceEmbedder has it; else refuse, since
    pooling another way would ship embeddings unlike the model's own."""
    pooling = _read_json(cfg, dict, SENTENCE_CONFIG)
    modes = [
        k.removeprefix("pooling_mode_")
        for k, v in pooling.items()
        if k.startswith("pooling_mode_") and v
    ]
    if not modes and isinstance(pooling.get("pooling_mode"), str):  # the one-string form
        modes = [pooling["pooling_mode"]]
    if not modes:
        return "mean"  # sentence-transformers' default
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(
            f"{cfg} pools with {' + '.join(modes)}; quantgate's sentence_embedding pools with "
            "mean_tokens or cls_token alone, and any other pooling would not match the model. "
            "Export it as a package.module:factory whose forward pools as the model does."
        )
    return POOLING_MODES[modes[0]]


class SentenceEmbedder(nn.Module):
    """A Hugging Face encoder plus sentence pooling: (last_hidden_state, sentence_embedding)."""

    def __init__(self, model: nn.Module, mode: str = "mean", normalize: bool = False):
        super().__init__()
        if mode not in ("mean", "cls"):
            raise ConfigError(f"unsupported pooling {mode!r}; expected 'mean' or 'cls'")
        self.model, self.mode, self.normalize = model, mode, normalize

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        h = self.model(input_ids=input_ids, **kw).last_hidden_state  # (B, T, C)
        if self.mode == "cls":
            e = h[:, 0]  # (B, C)
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            w = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            e = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)  # (B, C)
        if self.normalize:
            e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return h, e


def text_samples(tokenizer, inputs: Sequence[InputSpec], max_seq_len: int) -> Samples:
    """Real English from CPython's pydoc topics: short sentences and long paragraphs."""
    sentences, paragraphs = english_text()
    # Short and long rows, so that validation sees every length up to max_seq_len.
    texts = sentences[: N_TEXT_SAMPLES - 4] + paragraphs[:4]
    enc = tokenizer(texts, truncation=True, max_length=max_seq_len)
    rows = [enc[i.name] for i in inputs]
    lengths = np.array([len(r) for r in rows[0]])
    width = int(lengths.max())
    arrays = {}
    for spec, values in zip(inputs, rows, strict=True):
        a = np.full((len(texts), width), spec.pad_value, dtype=np.int64)
        for j, v in enumerate(values):
            a[j, : len(v)] = v
        arrays[spec.name] = a
    return Samples(arrays, lengths, f"pydoc_data.topics: {len(texts)} texts, tokenized")


def english_text() -> tuple[list[str], list[str]]:
    """Deterministic real text: (sentences of 6-60 words, paragraphs of 250+ words)."""
    from pydoc_data.topics import topics

    sentences, paragraphs = [], []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            flat = " ".join(para.split())
            if len(flat.split()) >= 250 and not flat.startswith(("*", ">>>")):
                paragraphs.append(flat)
            for s in re.split(r"(?<=[.!?])\s+", flat):
                if 6 <= len(s.split()) <= 60 and s[:1].isupper() and s.isascii():
                    sentences.append(s)
    # About 64 sentences spread over the whole corpus, then about 12 spread over their lengths.
    spread = sorted(sentences[:: max(1, len(sentences) // 64)], key=len)
    return spread[:: max(1, len(spread) // 12)], paragraphs


# -- user factories ----------------------------------------------------------------------


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
        raise ModelLoadError(f"{spec}: module {mod_name!r} has no callable {func_name!r}")
    return mod, factory


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
        raise ModelLoadError(f"{spec}: the factory raised {_brief(e)}") from e
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
        raise ModelLoadError(
            f"{spec}: the module needs an `example_inputs` dict of tensors (a real batch, dim 0 "
            "the batch, dim 1 the sequence) to trace and validate with"
        )
    arrays = _example_arrays(spec, example)
    if stored := _not_float32(module):  # your module: quantgate does not cast it for you
        raise ModelLoadError(
            f"{spec}: the module's weights are in {stored}; quantgate exports float32 (and "
            "makes its FP16 and INT8 variants from it). Return `module.float()` (exact for "
            "bfloat16 and float16 weights)."
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
        lengths = arrays["attention_mask"].reshape(len(first), -1).sum(1)
    else:
        lengths = np.full(len(first), width)
    output_names = getattr(module, "output_names", None)
    wrapped = TupleOutputs(module, list(example), output_names).eval()
    if output_names is None:  # a dict's keys, else output, output_0, output_1, ...
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the model's own; export logs them (-v)
            try:
                out = module(**example)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"{spec}: forward(**example_inputs) raised {_brief(e)}") from e
        if isinstance(out, Mapping) and all(isinstance(k, str) and k for k in out):
            output_names = list(out)
        else:
            n_out = len(wrapped(*example.values()))
            output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    src = _source_file(type(module)) or (mod and _source_file(mod)) or ""
    # a module that names its classes says it is a classifier
    task = (
        task
        or getattr(module, "task", None)
        or (SEQUENCE_CLASSIFICATION if getattr(module, "class_names", None) else CUSTOM)
    )
    if task not in FACTORY_TASKS:  # recorded as given (token-classification, say)
        log.warning(
            "%s: task %r is not one the gates know (%s): the model is gated as %r, each output "
            "against FP32's, unless an output is named `logits` or `sentence_embedding`%s",
            spec, task, ", ".join(FACTORY_TASKS), CUSTOM, _did_you_mean(task, FACTORY_TASKS),
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


# what other libraries call the tasks the gates know
_OTHER_NAMES = {
    "classification": SEQUENCE_CLASSIFICATION,
    "text-classification": SEQUENCE_CLASSIFICATION,
    "ner": TOKEN_CLASSIFICATION,
    "tagging": TOKEN_CLASSIFICATION,
    "embedding": FEATURE_EXTRACTION,
    "sentence-similarity": FEATURE_EXTRACTION,
}


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice ``value`` is another library's name for, or
    a misspelling of; else the empty string."""
    meant = _OTHER_NAMES.get(value.lower()) or closest(value, set(choices))
    return f" (did you mean {meant!r}?)" if meant else ""


def _import(spec: str) -> ModuleType:
    """The module of ``package.module:factory``, imported by name."""
    mod_name = spec.rsplit(":", 1)[0]
    # `python -m quantgate` finds modules in the current directory, the console script would
    # not: put it on sys.path, as uvicorn does for `uvicorn module:app`.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        top = mod_name.split(".")[0]
        if e.name not in (top, mod_name):  # the module itself imports something missing
            raise ModelLoadError(f"importing {mod_name!r} for {spec} failed: {_brief(e)}") from e
        raise ModelLoadError(
            f"cannot import {mod_name!r} for {spec}: no module {e.name!r} in the current "
            f"directory ({os.getcwd()}) or on the Python path. Run quantgate from the "
            "directory that holds it, add that directory to PYTHONPATH, or name the file: "
            f"path/to/{mod_name.replace('.', '/')}.py:{spec.rsplit(':', 1)[1]}."
        ) from e
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ModelLoadError(f"cannot import {mod_name!r} for {spec}: {_brief(e)}") from e


def _import_file(spec: str, path: Path) -> ModuleType:
    """The module of ``path/to/file.py:factory``, loaded from that file under its own name
    (a private one where another module has that name already); the file's directory goes
    first on ``sys.path`` so that its own imports of the files beside it work."""
    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"cannot load {spec}: no file {path} (from {os.getcwd()}). Name an existing "
            "Python file, or an importable `package.module:factory`."
        )
    path = path.resolve()
    name = path.stem if path.stem.isidentifier() else "quantgate_user_model"
    existing = sys.modules.get(name)
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve() == path:
            return existing
        name = f"quantgate_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelLoadError(f"cannot load {spec}: {path} is not a Python module")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod  # dataclasses, pickle and torch look classes up by module name
    try:
        loader_spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        del sys.modules[name]
        raise ModelLoadError(f"cannot load {path} for {spec}: {_brief(e)}") from e
    return mod


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
            "Every input must be one batch of the same rows and tokens."
        )
    return arrays


def _is_names(x: Any) -> bool:
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


def _read_json(path: Path, kind: type[dict] | type[list], what: str) -> Any:
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


def _brief(e: BaseException) -> str:
    """``Type: first line`` of an exception, for messages that must stay readable."""
    msg = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not msg:
        return type(e).__name__
    first = msg[0] if not msg[0].endswith(":") or len(msg) < 2 else f"{msg[0]} {msg[1]}"
    return f"{type(e).__name__}: {first}"
