"""Hugging Face model directories: the model with the head its task asks for, in float32
with eager attention, its inputs from its ``forward``, and real English text to validate on,
tokenized by its own tokenizer (``loaders.py`` says what a directory is exported as)."""

from __future__ import annotations

import inspect
import logging
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    did_you_mean,
    double_precision,
    half_precision,
    hash_files,
    read_json,
)
from quantgate.tasks import (
    FEATURE_EXTRACTION,
    HF_TASKS,
    MULTI_LABEL_CLASSIFICATION,
    QA_OUTPUTS,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
)
from quantgate.tokenizer import Text

log = logging.getLogger(__name__)

# The heads quantgate exports, by the suffix of their architecture's name; a pretraining
# head (masked or causal LM) is left behind as feature-extraction asks, any other refused.
HF_HEADS = {
    SEQUENCE_CLASSIFICATION: "ForSequenceClassification",
    MULTI_LABEL_CLASSIFICATION: "ForSequenceClassification",  # its config's problem_type says
    TOKEN_CLASSIFICATION: "ForTokenClassification",
    QUESTION_ANSWERING: "ForQuestionAnswering",
}
PRETRAINING_HEADS = ("ForMaskedLM", "ForPreTraining", "ForCausalLM", "LMHeadModel")
ENCODER_ONLY = "EncoderModel"  # T5EncoderModel, MT5EncoderModel, UMT5EncoderModel


def _has_head(architecture: str) -> bool:
    """Whether a class name is a model with a head: ``...ForSequenceClassification`` or
    ``GPT2LMHeadModel``, not ``RoFormerModel`` (whose "For" is its name's)."""
    return re.search(r"(For[A-Z]\w*|LMHeadModel)$", architecture) is not None


HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # in this order, when taken
SENTENCE_CONFIG = "a sentence-transformers config"
# sentence-transformers' Pooling modes (flag suffix, or the one-string form) -> SentenceEmbedder's
POOLING_MODES = {"mean_tokens": "mean", "mean": "mean", "cls_token": "cls", "cls": "cls"}
N_TEXT_SAMPLES = 16  # sentences and paragraphs tokenized for Hugging Face validation
MIN_PAIR_LEN = 16  # the shortest sequence validated with pairs: room for both texts


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
            + did_you_mean(task, HF_TASKS)
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise ModelLoadError(f"cannot load the Hugging Face model at {path}: {brief(e)}") from e
    archs = config.architectures or []
    # A checkpoint saved as an encoder-decoder's encoder alone (T5EncoderModel, sentence-T5's
    # kind) may still say is_encoder_decoder: transformers 4 saved its config so.
    encoder_only = bool(archs) and archs[0].endswith(ENCODER_ONLY)
    if getattr(config, "is_encoder_decoder", False) and not encoder_only:  # before _hf_task
        t5 = config.model_type in ("t5", "mt5", "umt5")
        raise ModelLoadError(
            f"{path} is an encoder-decoder model ({', '.join(archs) or config.model_type}): "
            f"quantgate exports encoders ({', '.join(HF_TASKS)}), whose outputs the input "
            "text alone decides. "
            + (
                "Save its encoder alone (T5EncoderModel.from_pretrained(PATH).save_pretrained"
                "(OUT)) and export that directory."
                if t5
                else "transformers saves no encoder of this family alone: export a factory "
                "(package.module:factory, docs/export.md) that returns its encoder "
                "(model.get_encoder()) with example_inputs."
            )
        )
    if config.model_type in ("longformer", "led"):  # LED: an encoder-decoder, refused above
        raise ModelLoadError(
            f"{path} is a Longformer: neither exporter traces its sliding-window attention "
            "(the legacy exporter's graph reads positions past the model's table in ONNX "
            "Runtime; the dynamo exporter stops at its data-dependent shapes), so quantgate "
            "cannot export it. A full-attention encoder (BERT, RoBERTa) of the same size "
            "exports; for inputs longer than 512 tokens, split them into windows."
        )
    if config.model_type == "funnel":
        raise ModelLoadError(
            f"{path} is a Funnel Transformer: its pooling fails in PyTorch itself on inputs of "
            "2 tokens or fewer (an index out of bounds), and a bundle's server takes any "
            "length from 1, so quantgate cannot export it. A full-attention encoder (BERT, "
            "ELECTRA) of the same size exports."
        )
    if getattr(config, "attention_type", None) == "block_sparse":  # BigBird's
        raise ConfigError(
            f"{path} uses block-sparse attention, which transformers turns into full attention "
            "for inputs too short for its blocks, for good: the export would trace full "
            "attention and validate against it, and ship a graph that answers long inputs "
            'otherwise than the model. Set "attention_type": "original_full" in its '
            "config.json to export full attention (the same answers up to the block-sparse "
            "length, more compute beyond)."
        )
    task = _hf_task(path, archs, task, multi_label=_multi_label(config))
    model = _hf_model(path, task, archs)
    takes = inspect.signature(model.forward).parameters
    names = [n for n in HF_INPUTS if n in takes and n in tokenizer.model_input_names]
    if getattr(config, "type_vocab_size", None) == 0 and "token_type_ids" in names:
        names.remove("token_type_ids")  # DeBERTa's: no table reads them, no graph input could
    if "input_ids" not in names:
        raise ModelLoadError(
            f"{path}: expected a text model taking input_ids; its forward takes {list(takes)[:6]}"
        )
    positions = _hf_positions(model, config)  # None: relative attention, no table
    if max_seq_len is not None and positions is not None and not 1 <= max_seq_len <= positions:
        raise ConfigError(
            f"--max-seq-len {max_seq_len} is outside 1..{positions}, the positions the model "
            "has embeddings for"
        )
    if max_seq_len is None:
        limits = [n for n in (_hf_max_seq_len(path, tokenizer), positions) if n is not None]
        if not limits:
            raise ConfigError(
                f"{path}: the model has no table of positions (relative attention, as T5's) "
                "and its tokenizer names no longest input: pass --max-seq-len, the longest "
                "sequence to export and serve (512 for T5's checkpoints)"
            )
        max_seq_len = _validated_length(path, min(limits), config.num_attention_heads)
    vocab = model.get_input_embeddings().num_embeddings
    pad_id = _hf_pad_id(path, config, tokenizer, task, vocab)
    if getattr(model.config, "pad_token_id", None) is None:
        # The tokenizer's, as Hugging Face's recipe for GPT-2 classifiers sets it: without
        # one such a model cannot find each row's last token in a padded batch at all.
        model.config.pad_token_id = pad_id
    inputs = tuple(InputSpec(n, "int64", pad_id if n == "input_ids" else 0) for n in names)

    outputs: tuple[str, ...]
    extra_task: dict[str, Any]
    if task == QUESTION_ANSWERING:  # (batch, sequence) each
        outputs = QA_OUTPUTS
        module = TupleOutputs(model, names, QA_OUTPUTS)
        extra_task = {}
    elif task in HF_HEADS:  # (batch, classes) logits, or (batch, sequence, classes)
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
        samples=_readable(
            path,
            tokenizer,
            text_samples(
                tokenizer,
                inputs,
                max_seq_len,
                pairs=(getattr(config, "type_vocab_size", 0) or 0) >= 2,
            ),
        ),
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
        if task in (SEQUENCE_CLASSIFICATION, MULTI_LABEL_CLASSIFICATION):
            raise ModelLoadError(
                f"{path}: neither config.json nor the tokenizer names a padding token, and a "
                "classifier's rows of different lengths are padded to be batched (a GPT-2 "
                'style classifier finds each row\'s last token by it). Set "pad_token_id" in '
                'config.json, or "pad_token" in tokenizer_config.json (both, where you set '
                "both, to the same token): for GPT-2 style models, the end-of-text token, as "
                "their classifiers are fine-tuned with."
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


def _a(word: str) -> str:
    """``word`` after its indefinite article: "an AlbertForQuestionAnswering"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _multi_label(config: Any) -> bool:
    """Whether a sequence classifier's labels are each on or off (a sigmoid per label, as
    its config's problem_type says), not one class of them (a softmax)."""
    return getattr(config, "problem_type", None) == "multi_label_classification"


def _hf_task(path: Path, archs: Sequence[str], task: str | None, *, multi_label: bool) -> str:
    """The task of the Hugging Face model at ``path``: ``task`` when given, else its head's
    (``HF_HEADS``; a sequence classifier's is multi-label where its config says
    ``multi_label``), else feature-extraction. A head asked for and absent is refused (its
    weights would be random), and so is a head quantgate does not export unless
    feature-extraction is asked for: it would be dropped without a word."""
    # in the config's order: its first architecture is the model's own
    scores = MULTI_LABEL_CLASSIFICATION if multi_label else SEQUENCE_CLASSIFICATION
    heads = [
        t
        for a in archs
        for t, suffix in HF_HEADS.items()
        if a.endswith(suffix) and t in (scores, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)
    ]
    if task in (SEQUENCE_CLASSIFICATION, MULTI_LABEL_CLASSIFICATION) and scores in heads:
        heads.append(task)  # either reading of a sequence classifier's scores, where asked
    if task in HF_HEADS and task not in heads:
        own = (
            f"Its own head is {heads[0]}: drop --task (or pass --task {heads[0]}), or use"
            if heads
            else "Use"
        )
        raise ConfigError(
            f"{path} has no {task} head (architectures: {archs}); exporting one would ship "
            f"random weights. {own} --task feature-extraction, or fine-tune first."
        )
    other = [
        a for a in archs
        if _has_head(a) and not a.endswith((*HF_HEADS.values(), *PRETRAINING_HEADS))
    ]  # fmt: skip
    if task is None and not heads and other:
        raise ConfigError(
            f"{path} is {_a(other[0])}: quantgate exports {', '.join(HF_TASKS)} models, and as "
            "feature-extraction this head would be dropped, its outputs with it. Pass --task "
            "feature-extraction to export the encoder without it."
        )
    task = task or (heads[0] if heads else FEATURE_EXTRACTION)
    if task == FEATURE_EXTRACTION and (dropped := [a for a in archs if _has_head(a)]):
        log.warning("%s: exporting the encoder of %s, without its head", path, dropped[0])
    return task


def _hf_model(path: Path, task: str, archs: Sequence[str]) -> Any:  # a PreTrainedModel
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from transformers.utils import logging as hf_logging

    cls = {
        SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
        MULTI_LABEL_CLASSIFICATION: AutoModelForSequenceClassification,
        TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
        QUESTION_ANSWERING: AutoModelForQuestionAnswering,
    }.get(task, AutoModel)
    # A checkpoint saved as an encoder-decoder's encoder alone is loaded as itself:
    # T5EncoderModel's, which AutoModel would load as T5Model, encoder and decoder. (Not any
    # class named by the checkpoint: GPT2LMHeadModel's or XLMWithLMHeadModel's would bring
    # their LM heads; AutoModel loads their base models.)
    own = archs[0] if archs and archs[0].endswith(ENCODER_ONLY) else None
    if cls is AutoModel and own and isinstance(getattr(transformers, own, None), type):
        cls = getattr(transformers, own)
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
        fix = (
            "its weights file is cut short or corrupt: copy or save it again "
            "(model.save_pretrained(path))"
            if _weights_unreadable(e)
            else "check that it is a folder model.save_pretrained(path) wrote"
        )
        raise ModelLoadError(f"cannot load {path} for {task}: {brief(e)}; {fix}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    _refuse_random_weights(path, task, loading)
    if stored := half_precision(model):  # transformers loads a checkpoint in the dtype it was saved
        log.info("%s: weights stored in %s, exported in float32 (exactly)", path, stored)
        model.float()
    elif double_precision(model, {}):  # its weights
        log.warning(  # float32 is the reference: ONNX Runtime quantizes float32 weights only
            "%s: weights stored in float64, exported in float32 (rounded: validation compares "
            "with the float32 model)",
            path,
        )
        model.float()
    return model.eval()


def _weights_unreadable(e: BaseException) -> bool:
    """Whether ``from_pretrained`` failed reading the weights file itself: safetensors'
    error, or one raised inside ``torch.load`` (a .bin cut short fails there as "Invalid
    argument", "failed reading zip archive" or "unexpected EOF"), but not torch refusing a
    pickle it will not run ("Weights only load failed"), which no copy mends."""
    if "Weights only load failed" in str(e):
        return False
    if "Safetensor" in type(e).__name__:
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return any(Path(f.filename).parts[-2:] == ("torch", "serialization.py") for f in frames)


def _refuse_random_weights(path: Path, task: str, loading: Mapping[str, Any]) -> None:
    """Refuse a model with weights the checkpoint lacks, which transformers initialised at
    random (a classifier's config over an encoder's checkpoint: its head): its outputs are
    not the trained model's, and no gate can tell, since they compare INT8 with FP32. A
    feature extractor's pooler is not among them: quantgate pools itself."""
    random = [
        str(k) for k in (*loading.get("missing_keys", ()), *loading.get("mismatched_keys", ()))
        if not (task == FEATURE_EXTRACTION and str(k).startswith("pooler."))
    ]  # fmt: skip
    if not random:
        return
    encoder = (
        " For its encoder's outputs alone, pass --task feature-extraction."
        if task != FEATURE_EXTRACTION
        else ""
    )
    raise ModelLoadError(
        f"{path}: {len(random)} weight(s) of the model are not in the checkpoint (or not of "
        f"its shape) and would be random: {', '.join(random[:4])}"
        f"{', ...' if len(random) > 4 else ''}. Its outputs would not be the trained model's, "
        "and no gate can tell (they compare INT8 with FP32): fine-tune it, or export the "
        f"checkpoint it was trained as.{encoder}"
    )


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
        said = (
            f"{path}: its tokenizer reads {unknown:.0%} of English text's tokens as the unknown "
            f"token {tokenizer.unk_token!r} (it has {len(tokenizer)} tokens)"
        )
        if files := sorted(f for f in TOKENIZER_FILES if (path / f).is_file()):
            # ESM's 33 amino acids: the files are there, and English is not its text
            raise ModelLoadError(
                f"{said}, from {', '.join(files)}: it is not made for English text (a protein "
                "or character vocabulary, say), and quantgate validates a Hugging Face export "
                "on English text it tokenizes. Export it as a factory (package.module:factory, "
                "docs/export.md) whose example_inputs are real inputs of the model."
            )
        raise ModelLoadError(
            f"{said}: the directory lacks the tokenizer's files (tokenizer.json, vocab.txt, "
            "...). Copy them in beside config.json."
        )
    return samples


# Files a Hugging Face tokenizer is read from (one of them, with its config)
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
)  # fmt: skip


def _hf_positions(model: nn.Module, config) -> int | None:
    """How many tokens the model has position embeddings for; None for a model without a
    table of them (T5's relative attention). RoBERTa and its kin (XLM-R, CamemBERT, ...)
    number positions from ``padding_idx + 1``: of roberta-base's 514 embeddings, 512 are
    usable."""
    base = getattr(model, "base_model", model)  # the encoder under a classification head
    table = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    if isinstance(table, nn.Embedding) and table.padding_idx is not None:
        return table.num_embeddings - table.padding_idx - 1
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None  # XLNet's -1: relative attention


# Validation runs eager attention at the longest length: rows x heads x T x T float32 scores
# at once (and a few times that at its peak), at most VALIDATION_ROWS rows (export.validation's
# padded case). A default that asks more is halved.
VALIDATION_SCORES_BYTES = 2**31
VALIDATION_ROWS = 4
SHORTEST_DEFAULT = 512  # never halved below: BERT's own length


def _scores_bytes(heads: int, length: int) -> int:
    return VALIDATION_ROWS * heads * length * length * 4


def _validated_length(path: Path, limit: int, heads: int) -> int:
    """``limit``, the longest input the model is made for, or, where validating at it would
    take more than ``VALIDATION_SCORES_BYTES`` of attention scores, the longest half of it
    that does not (not below ``SHORTEST_DEFAULT``); said in a warning, since the server caps
    requests at it. Qwen2's 32,768 took 34 GB and ended the export in an allocation error; a
    4-head ModernBERT of 8,192 took 15.8 GB at its peak (a 12-head one would take about 3
    times that)."""
    length = limit
    while length > SHORTEST_DEFAULT and _scores_bytes(heads, length) > VALIDATION_SCORES_BYTES:
        length //= 2
    if length < limit:
        log.warning(
            "%s takes up to %d tokens; exported and validated for %d, where the attention "
            "scores of validation take %.1f GB (at %d: %.0f GB, a few times that at the peak). "
            "Pass --max-seq-len to choose another length, with the memory for it",
            path, limit, length, _scores_bytes(heads, length) / 1e9, limit,
            _scores_bytes(heads, limit) / 1e9,
        )  # fmt: skip
    return length


def _hf_max_seq_len(path: Path, tokenizer) -> int | None:
    """The longest input the model is meant for, as its directory says besides its positions
    (``_hf_positions`` bounds it): sentence-transformers' limit, else its tokenizer's; None
    where neither names one."""
    st = path / "sentence_bert_config.json"
    if st.is_file() and (n := read_json(st, dict, SENTENCE_CONFIG).get("max_seq_length")):
        return int(n)
    n = tokenizer.model_max_length  # transformers' stand-in for none: about 1e30
    return n if isinstance(n, int) and 0 < n < 1_000_000 else None


def _sentence_pooling(path: Path) -> dict[str, Any]:
    """Pooling per the directory's sentence-transformers config (mean, no normalisation if none)."""
    mode, normalize = "mean", False
    modules = path / "modules.json"
    if modules.is_file():
        entries = read_json(modules, list, "sentence-transformers' list of modules")
        normalize = any(e.get("type", "").endswith(".Normalize") for e in entries)
        other = [
            str(e.get("type"))
            for e in entries[1:]  # the first is the transformer itself, whatever its class
            if not str(e.get("type", "")).endswith(_SENTENCE_MODULES)
        ]
        if other:
            raise ModelLoadError(
                f"{modules} lists {', '.join(other)} after the transformer; quantgate's "
                "sentence_embedding is the transformer's output pooled (and normalized) alone, "
                "and without them would not be the model's embedding (a Dense layer changes "
                "its size and values). Export it as a package.module:factory whose forward "
                "runs every module."
            )
        for e in entries:
            cfg = path / e.get("path", "") / "config.json"
            if e.get("type", "").endswith(".Pooling") and cfg.is_file():
                mode = _pooling_mode(cfg)
    return {"mode": mode, "normalize": normalize}


# The sentence-transformers modules SentenceEmbedder does as the model does, after its first.
_SENTENCE_MODULES = (".Pooling", ".Normalize")


def _pooling_mode(cfg: Path) -> str:
    """The Pooling module's one mode, when SentenceEmbedder has it; else refuse, since
    pooling another way would ship embeddings unlike the model's own."""
    pooling = read_json(cfg, dict, SENTENCE_CONFIG)
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


def text_samples(
    tokenizer, inputs: Sequence[InputSpec], max_seq_len: int, *, pairs: bool = False
) -> Samples:
    """Real English from CPython's pydoc topics: short sentences and long paragraphs. With
    ``pairs`` (a model with a table of two or more token types), where the model takes
    token_type_ids and its sequences have room for a pair, the first and third paragraphs
    follow a sentence as pairs, a query and its passage: validation then sees the second
    segment's token type (1), which a cross-encoder is served, in the longest and the padded
    cases."""
    sentences, paragraphs = english_text()
    # Short and long rows, so that validation sees every length up to max_seq_len.
    texts: list[Text] = [*sentences[: N_TEXT_SAMPLES - 4], *paragraphs[:4]]
    pairs = pairs and "token_type_ids" in {i.name for i in inputs} and max_seq_len >= MIN_PAIR_LEN
    if pairs:
        first_paragraph = N_TEXT_SAMPLES - 4
        for sentence, row in ((0, first_paragraph), (1, first_paragraph + 2)):
            texts[row] = (sentences[sentence], paragraphs[row - first_paragraph])
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
    paired = " (2 of them sentence and paragraph pairs)" if pairs else ""
    return Samples(arrays, lengths, f"pydoc_data.topics: {len(texts)} texts{paired}, tokenized")


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
