"""A model's tokenizer as quantgate uses it: texts to right-padded arrays of the model's
inputs, cut at a number of tokens, and ids back to tokens.

Two ways to run one. ``Transformers`` is Hugging Face's own: it reads any tokenizer, and
takes seconds to import (transformers imports torch where it is installed). ``Backend`` runs
the tokenizer's serialized pipeline (tokenizer.json: normalizer, pre-tokenizer, model,
special tokens) through the ``tokenizers`` library alone, in a tenth of a second, with the
few settings transformers applies around it at every call (``Settings``).

A text is a string, or a pair of them (``Text``): a cross-encoder's query and passage, a
question and its context, an NLI premise and hypothesis, tokenized as one sequence with the
tokenizer's separator between them (and token type 1 for the second, where the model
takes token types), as transformers' ``tokenizer(text, text_pair)`` does.

A bundle uses ``Backend`` only where its export proved that it answers exactly as
transformers does (``check``): the pipeline ``Backend`` runs is, field by field and score by
score, the one transformers runs, and the two answer alike on ``PROBES``, ``PAIR_PROBES``
and the tokenizer's own special tokens with the recorded ``Settings``; the manifest keeps
those (``extra.huggingface.tokenizers``). Else, and for every model directory,
``Transformers``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantgate.schema import described

log = logging.getLogger(__name__)

DOC_STRIDE = 128  # the most tokens two windows of a long context share (window_overlap)
TOKENIZER_FILE = "tokenizer.json"  # transformers' name for the serialized pipeline
OPTIONAL_INPUTS = ("token_type_ids", "attention_mask")  # as input_ids, where returned

# Texts the check tokenizes both ways: scripts, accents and case, whitespace, emoji and
# symbols, text that spells special tokens, and a text long enough to be cut.
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "Naïve café façade: résumé, Ångström, Zürich, São Paulo, ÉCOLE élève.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines,  doubled  spaces",
    "東京は日本の首都です。 北京 서울 ภาษาไทย",
    "Привет, мир! مرحبا بالعالم שלום עולם नमस्ते",
    "emoji 😀👍🏽 🇫🇷 and symbols ©®™ €£¥ ½ ∑∫√ →",
    "decomposed e\u0301 and ligature \ufb01 and zero\u200bwidth",
    "[CLS] [SEP] [PAD] [MASK] [UNK] <s> </s> <pad> <unk> <mask> <|endoftext|>",
    "--------------------- x |=====|=====| ***** ..... ____ ~~~ !!! ??? ### ===",
    "URLs https://example.com/a?b=c&d=e#f, e-mail a.b@example.org, 3.14159, 1,000,000",
    "don't won't it's y'all ' \" `quotes` «guillemets» „Anführung“",
    "x",
    # long enough to be cut, and no two cuts alike: which side loses its tokens shows
    " ".join(f"sentence {i} of a text that runs past the model's longest" for i in range(60)),
)
# Pairs: a text cut by the longer of the two losing its tokens first (``longest_first``, as
# transformers cuts pairs), a pair of one token each, and texts that spell special tokens.
# The long text is some 150 tokens, not PROBES' longest: the tokenizers library cuts a long
# pair in time that grows with its length (tokenizers issue 2035), 0.5 s for that one.
_LONG_PAIR = " ".join(f"pair {i} runs past the cut" for i in range(25))
PAIR_PROBES = (
    *zip(PROBES[0:12:2], PROBES[1:12:2], strict=True),
    (PROBES[0], _LONG_PAIR),
    (_LONG_PAIR, PROBES[12]),
    ("x", "y"),
)
SHORT_CUT = 8  # the probes are also cut here: a model's own limit may exceed every probe
# How a Unigram model's scores are read from tokenizer.json (``Settings.scores``): as the
# tokenizers library reads them, or as Python's json does.
# transformers' sentencepiece classes (T5, ALBERT, XLM-R, DeBERTa-v2, ...) build the model from
# scores Python's json reads exactly; the tokenizers library reads some a unit in the last
# place off (-3.2628101906413534 as -3.262810190641354), and where two segmentations of a
# text nearly tie, that picks the other (XLM-R's "---------------------" came out as two
# pieces in the other order). A generic PreTrainedTokenizerFast reads the file as the
# library does. No probe finds every near tie: the check compares the scores themselves.
SCORES = ("tokenizers", "python")

# A text, or a pair (text, text_pair) tokenized as one sequence: (question, context).
Text = str | tuple[str, str]
# Where a token stands in its row's text: (0 for the text, 1 for its pair, first character,
# end character); None for a special token ([CLS], [SEP]), which stands for none.
Place = tuple[int, int, int] | None


class Tokenizer(Protocol):
    """Text to a model's inputs. One may be shared between threads: a call sets the
    truncation it needs under a lock."""

    @property
    def truncation_side(self) -> str:
        """Where a text too long is cut: "right" (its last tokens go) or "left"."""
        ...

    def ids(self, texts: Sequence[Text], limit: int | None) -> list[list[int]]:
        """Each text's token ids (special tokens included), cut at ``limit`` tokens (None:
        not cut; a pair's longer text loses its tokens first), unpadded."""
        ...

    def encode(self, texts: Sequence[Text], limit: int | None) -> dict[str, np.ndarray]:
        """The texts as one batch: input_ids and, where the tokenizer returns them,
        token_type_ids and attention_mask, (rows, longest) int64, padded on the right."""
        ...

    def pieces(self, texts: Sequence[Text], limit: int | None) -> list[list[str]]:
        """Each token of each text (as ``ids`` gives them) as a person reads it
        (``_read_as_typed``): the characters of the text it stands for, not the vocabulary's
        spelling (``##ing``, ``Ġin``, ``▁in``)."""
        ...

    def places(self, texts: Sequence[Text], limit: int | None) -> list[list[Place]] | None:
        """Where each token of each text (as ``ids`` gives them) stands in it (``Place``):
        an extractive answer's characters. None where the tokenizer keeps no offsets (a
        slow one's)."""
        ...

    def windows(self, pairs: Sequence[tuple[str, str]], limit: int) -> Windows | None:
        """``pairs`` (question, context) read in windows of at most ``limit`` tokens
        (``Windows``): a pair that fits is one window, as ``encode`` reads it. None where the
        tokenizer keeps no offsets (a slow one's)."""
        ...


@dataclass(frozen=True)
class Windows:
    """(question, context) pairs read as Hugging Face's question answering reads a context
    longer than the model (its ``doc_stride``): each window holds the whole question and a
    part of the context, neighbouring parts overlapping (``window_overlap``), so an answer
    cut at one window's edge is whole in the next. A pair that fits is one window, as
    ``Tokenizer.encode`` reads it. The windows run from the context's start whichever side
    the tokenizer cuts (transformers' own run from its end for a left-cutting one)."""

    encoded: dict[str, np.ndarray]  # (W, T) as ``Tokenizer.encode`` gives them
    pairs: np.ndarray  # (W,) int64: the pair each window reads, by its index in those given
    # (W,) int64: the window's first context token's index among its pair's context tokens:
    # the same answer in two overlapping windows is the same tokens of the context
    starts: np.ndarray
    places: list[list[Place]]  # each window's tokens' places in its pair's texts
    # the pairs (their indices) whose question leaves no room for a part of the context:
    # one window each, cut as ``encode`` cuts
    cut: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)


def window_overlap(limit: int, room: int) -> int:
    """Tokens two consecutive windows of a context share: the question-answering pipeline's
    doc_stride for windows of ``limit`` tokens, half of them and at most 128 (run_qa.py's
    default: 128 of 384), where each window then reads at least a quarter of the ``room``
    it has for the context anew; else half the room. The pipeline's own, where a long
    question leaves little more room than its stride, reads a token or two a window (a
    62-token question over 229 tokens of context: 165 windows of 128)."""
    stride = min(limit // 2, DOC_STRIDE)
    return stride if room - stride >= max(room // 4, 1) else room // 2


@dataclass(frozen=True)
class _Piece:
    """One window as a tokenizer encoded it, whichever library did."""

    inputs: dict[str, list[int]]
    offsets: Sequence[tuple[int, int]]
    special: Sequence[int]
    sequences: Sequence[int | None]


def _windowed(
    read: Sequence[tuple[list[_Piece], int]], pads: Mapping[str, int], cut: Sequence[int]
) -> Windows:
    """``Windows`` of each pair's pieces, in order, and the overlap they were read with."""
    rows: dict[str, list[list[int]]] = {}
    pairs, starts, places = [], [], []
    for pair, (pieces, overlap) in enumerate(read):
        start = 0
        for piece in pieces:
            for name, values in piece.inputs.items():
                rows.setdefault(name, []).append(values)
            pairs.append(pair)
            starts.append(start)
            places.append(_places(piece.offsets, piece.special, piece.sequences))
            start += sum(s == 1 for s in piece.sequences) - overlap
    return Windows(
        _padded(rows, pads),
        np.asarray(pairs, np.int64),
        np.asarray(starts, np.int64),
        places,
        tuple(cut),
    )


def _room(sequences: Sequence[int | None], limit: int) -> int:
    """The context tokens a window of ``limit`` tokens holds beside the question and the
    special tokens of a pair whose whole encoding's ``sequences`` these are."""
    return limit - sum(s != 1 for s in sequences)


class Transformers:
    """transformers' tokenizer, cut only where asked, right-padded with ``pad_id`` here
    (not by transformers, which takes a pad id only as one of its tokens)."""

    def __init__(self, tok: Any, pad_id: int | None):
        pad = pad_id if pad_id is not None else tok.pad_token_id or 0
        self.pads = {"input_ids": int(pad), "token_type_ids": int(tok.pad_token_type_id)}
        self.tok = tok
        self._lock = threading.Lock()  # a call sets the tokenizer's truncation for itself

    @property
    def truncation_side(self) -> str:
        return str(self.tok.truncation_side)

    def _call(self, texts: Sequence[Text], limit: int | None) -> Any:
        # verbose=False: quantgate cuts texts at the model's max_seq_len itself, and says so
        # in its own words, not in transformers' warning of "indexing errors" against its
        # own, other limit
        with self._lock, _pair_advice_dropped():
            return self.tok(
                list(texts), truncation=limit is not None, max_length=limit, verbose=False
            )

    def ids(self, texts: Sequence[Text], limit: int | None) -> list[list[int]]:
        return self._call(texts, limit)["input_ids"]

    def encode(self, texts: Sequence[Text], limit: int | None) -> dict[str, np.ndarray]:
        enc = self._call(texts, limit)
        return _padded({k: enc[k] for k in ("input_ids", *OPTIONAL_INPUTS) if k in enc}, self.pads)

    def pieces(self, texts: Sequence[Text], limit: int | None) -> list[list[str]]:
        if not self.tok.is_fast:  # a slow tokenizer keeps no offsets: its own spelling
            return [self.tok.convert_ids_to_tokens(ids) for ids in self.ids(texts, limit)]
        enc = self._offsets(texts, limit)
        return [
            _read_as_typed(
                text,
                self.tok.convert_ids_to_tokens(ids),
                ids,
                offsets,
                special,
                enc.sequence_ids(row),
                lambda i: self.tok.decode([i]),
            )  # fmt: skip
            for row, (text, ids, offsets, special) in enumerate(
                zip(
                    texts,
                    enc["input_ids"],
                    enc["offset_mapping"],
                    enc["special_tokens_mask"],
                    strict=True,
                )
            )  # fmt: skip
        ]

    def places(self, texts: Sequence[Text], limit: int | None) -> list[list[Place]] | None:
        if not self.tok.is_fast:
            return None
        enc = self._offsets(texts, limit)
        return [
            _places(offsets, special, enc.sequence_ids(row))
            for row, (offsets, special) in enumerate(
                zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
            )
        ]

    def _offsets(self, texts: Sequence[Text], limit: int | None) -> Any:
        """A fast tokenizer's encoding with offsets (a slow one keeps none, and alone logs
        the advice ``_call`` drops)."""
        with self._lock:
            return self.tok(
                list(texts), truncation=limit is not None, max_length=limit, verbose=False,
                return_offsets_mapping=True, return_special_tokens_mask=True,
            )  # fmt: skip

    def windows(self, pairs: Sequence[tuple[str, str]], limit: int) -> Windows | None:
        if not self.tok.is_fast:
            return None
        names = ("input_ids", *OPTIONAL_INPUTS)
        read: list[tuple[list[_Piece], int]] = []
        cut: list[int] = []
        with self._lock:
            side = self.tok.truncation_side
            try:
                for pair, (q, c) in enumerate(pairs):
                    enc = whole = self.tok(
                        [q], [c], return_offsets_mapping=True, return_special_tokens_mask=True,
                        verbose=False,
                    )  # fmt: skip
                    room = _room(whole.sequence_ids(0), limit)
                    overlap = 0
                    if len(whole["input_ids"][0]) > limit:  # else the pair is its one window
                        windowed = room >= 2  # else its question fills it: cut as encode
                        cut += [] if windowed else [pair]
                        overlap = window_overlap(limit, room) if windowed else 0
                        # windows read a context from its start; a cut is the tokenizer's own
                        self.tok.truncation_side = "right" if windowed else side
                        enc = self.tok(
                            [q], [c], truncation="only_second" if windowed else True,
                            max_length=limit, stride=overlap, return_overflowing_tokens=windowed,
                            return_offsets_mapping=True, return_special_tokens_mask=True,
                            verbose=False,
                        )  # fmt: skip
                    pieces = [
                        _Piece(
                            {n: enc[n][k] for n in names if n in enc},
                            enc["offset_mapping"][k],
                            enc["special_tokens_mask"][k],
                            enc.sequence_ids(k),
                        )
                        for k in range(len(enc["input_ids"]))
                    ]
                    read.append((pieces, overlap))
            finally:
                self.tok.truncation_side = side
        return _windowed(read, self.pads, cut)


class _PairAdvice(logging.Filter):
    """Drops transformers' slow tokenizers' line for every pair they cut ("Be aware,
    overflowing tokens are not returned ..."), advice about a setting quantgate does not use:
    a line per pair, dozens per export."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Be aware, overflowing tokens are not returned")


# where transformers logs it: 4.x's module, and 5.x's for its slow (Python) tokenizers
_PAIR_ADVICE_LOGGERS = ("transformers.tokenization_utils_base", "transformers.tokenization_python")


@contextlib.contextmanager
def _pair_advice_dropped() -> Iterator[None]:
    """``_PairAdvice`` on transformers' loggers for the while of one of quantgate's calls
    (under its lock): a program's own tokenizer calls keep their lines."""
    advice = _PairAdvice()
    loggers = [logging.getLogger(name) for name in _PAIR_ADVICE_LOGGERS]
    for logger in loggers:
        logger.addFilter(advice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(advice)


def _padded(rows: Mapping[str, Sequence[Sequence[int]]], pads: Mapping[str, int]) -> dict:
    """Each input's rows as one (rows, longest) int64 array, padded on the right with its
    value in ``pads`` (an attention mask with 0), as transformers pads."""
    width = max(len(r) for r in rows["input_ids"])
    out = {}
    for name, values in rows.items():
        array = np.full((len(values), width), pads.get(name, 0), dtype=np.int64)
        for row, v in zip(array, values, strict=True):
            row[: len(v)] = v
        out[name] = array
    return out


@dataclass(frozen=True)
class Settings:
    """What transformers sets around a tokenizer.json pipeline at each call (its
    ``set_truncation_and_padding`` and ``_convert_encoding``), as the manifest records it."""

    truncation_side: str = "right"
    pad_type_id: int = 0
    split_special_tokens: bool = False
    returns: tuple[str, ...] = OPTIONAL_INPUTS  # of OPTIONAL_INPUTS, those returned
    # a Unigram model's: one of SCORES; None for a model without scores, and in a record
    # written before Unigram models were recorded (which stands for nothing for one)
    scores: str | None = None

    @classmethod
    def of(cls, tok: Any) -> Settings:
        """A transformers tokenizer's."""
        names = tuple(tok.model_input_names)
        return cls(
            truncation_side=str(tok.truncation_side),
            pad_type_id=int(tok.pad_token_type_id),
            split_special_tokens=bool(getattr(tok, "split_special_tokens", False)),
            returns=tuple(n for n in OPTIONAL_INPUTS if n in names),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "returns": list(self.returns)}
        if self.scores is None:  # a model without scores: the record is as it always was
            del d["scores"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Settings:
        return cls(
            truncation_side=d["truncation_side"],
            pad_type_id=d["pad_type_id"],
            split_special_tokens=d["split_special_tokens"],
            returns=tuple(d["returns"]),
            scores=d.get("scores"),
        )


def settings_problems(d: Any) -> list[str]:
    """What is wrong with a manifest's ``extra.huggingface.tokenizers`` (empty: nothing)."""
    where = "extra.huggingface.tokenizers"
    if not isinstance(d, dict):
        return [f"{where}: expected an object, found {described(d)}"]
    expected = {
        "truncation_side": ("'left' or 'right'", lambda v: v in ("left", "right")),
        "pad_type_id": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
        "split_special_tokens": ("true or false", lambda v: isinstance(v, bool)),
        "returns": (f"a list of {', '.join(OPTIONAL_INPUTS)}", lambda v: isinstance(v, list)),
        "scores": (
            f"null or one of {', '.join(map(repr, SCORES))}",
            lambda v: v is None or v in SCORES,
        ),
    }
    problems = [  # (only "scores" may be absent: its check takes None)
        f"{where}: the field {key!r} is missing"
        if key not in d
        else f"{where}.{key}: expected {what}, found {described(d[key])}"
        for key, (what, ok) in expected.items()
        if not ok(d.get(key))
    ]
    returns = d.get("returns")
    return problems + [  # each entry said, as "a list" alone would not say which is wrong
        f"{where}.returns[{i}]: expected {' or '.join(OPTIONAL_INPUTS)}, found {described(x)}"
        for i, x in enumerate(returns if isinstance(returns, list) else [])
        if x not in OPTIONAL_INPUTS
    ]


class Backend:
    """A tokenizer.json pipeline run by the ``tokenizers`` library, as transformers runs it
    with ``settings``, right-padded with ``pad_id``."""

    def __init__(self, backend: Any, settings: Settings, pad_id: int):
        backend.no_padding()  # padded here, per batch; a saved file may pad to a length
        backend.no_truncation()
        backend.encode_special_tokens = settings.split_special_tokens
        self.backend, self.settings, self.pad_id = backend, settings, int(pad_id)
        self._lock = threading.Lock()  # a call sets the pipeline's truncation for itself

    @property
    def truncation_side(self) -> str:
        return self.settings.truncation_side

    @classmethod
    def load(cls, directory: str | Path, settings: Settings, pad_id: int) -> Backend:
        from tokenizers import Tokenizer as Pipeline
        from tokenizers.models import Unigram

        path = Path(directory) / TOKENIZER_FILE
        if settings.scores != "python":
            return cls(Pipeline.from_file(str(path)), settings, pad_id)
        text = path.read_text(encoding="utf-8")  # read once: 17 MB for XLM-R's 250,000 pieces
        pipeline = Pipeline.from_str(text)
        if isinstance(pipeline.model, Unigram):
            model = json.loads(text)["model"]
            vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
            pipeline.model = Unigram(vocab, model.get("unk_id"), model.get("byte_fallback"))
        return cls(pipeline, settings, pad_id)

    @property
    def model_kind(self) -> str:
        """The pipeline's token model: "WordPiece", "BPE", "Unigram", "WordLevel"."""
        return type(self.backend.model).__name__

    @property
    def proven(self) -> bool:
        """Whether the record this runs by proves it: a Unigram model's says how its scores
        are read (a record from before Unigram models were recorded does not)."""
        return self.model_kind != "Unigram" or self.settings.scores in SCORES

    def _encodings(self, texts: Sequence[Text], limit: int | None) -> list[Any]:
        with self._lock:
            if limit is None:
                self.backend.no_truncation()
            else:
                side = self.settings.truncation_side
                self.backend.enable_truncation(
                    limit, stride=0, strategy="longest_first", direction=side
                )
            return self.backend.encode_batch(list(texts), add_special_tokens=True)

    def ids(self, texts: Sequence[Text], limit: int | None) -> list[list[int]]:
        return [e.ids for e in self._encodings(texts, limit)]

    def encode(self, texts: Sequence[Text], limit: int | None) -> dict[str, np.ndarray]:
        encodings = self._encodings(texts, limit)
        rows = {"input_ids": [e.ids for e in encodings]}
        if "token_type_ids" in self.settings.returns:
            rows["token_type_ids"] = [e.type_ids for e in encodings]
        if "attention_mask" in self.settings.returns:
            rows["attention_mask"] = [e.attention_mask for e in encodings]
        pads = {"input_ids": self.pad_id, "token_type_ids": self.settings.pad_type_id}
        return _padded(rows, pads)

    def pieces(self, texts: Sequence[Text], limit: int | None) -> list[list[str]]:
        def decode(i: int) -> str:
            return self.backend.decode([i], skip_special_tokens=False)

        return [
            _read_as_typed(
                text, e.tokens, e.ids, e.offsets, e.special_tokens_mask, e.sequence_ids, decode
            )
            for text, e in zip(texts, self._encodings(texts, limit), strict=True)
        ]

    def places(self, texts: Sequence[Text], limit: int | None) -> list[list[Place]] | None:
        return [
            _places(e.offsets, e.special_tokens_mask, e.sequence_ids)
            for e in self._encodings(texts, limit)
        ]

    def windows(self, pairs: Sequence[tuple[str, str]], limit: int) -> Windows | None:
        returns = ("input_ids", *self.settings.returns)
        read: list[tuple[list[_Piece], int]] = []
        cut: list[int] = []
        with self._lock:
            self.backend.no_truncation()
            wholes = self.backend.encode_batch(list(pairs), add_special_tokens=True)
            for index, (pair, whole) in enumerate(zip(pairs, wholes, strict=True)):
                room = _room(whole.sequence_ids, limit)
                overlap = window_overlap(limit, room)
                if len(whole.ids) <= limit:
                    read.append(([_piece(whole, returns)], 0))
                    continue
                if room < 2:  # the question alone fills the window: cut as encode cuts
                    cut.append(index)
                    overlap, strategy = 0, "longest_first"
                else:
                    strategy = "only_second"
                side = self.settings.truncation_side if strategy == "longest_first" else "right"
                self.backend.enable_truncation(
                    limit, stride=overlap, strategy=strategy, direction=side
                )
                first = self.backend.encode(*pair, add_special_tokens=True)
                self.backend.no_truncation()
                pieces = [first] if strategy == "longest_first" else [first, *first.overflowing]
                read.append(([_piece(e, returns) for e in pieces], overlap))
        pads = {"input_ids": self.pad_id, "token_type_ids": self.settings.pad_type_id}
        return _windowed(read, pads, cut)


def _piece(e: Any, returns: Sequence[str]) -> _Piece:
    """A ``tokenizers`` encoding as a window: the inputs transformers returns for it."""
    inputs = {"input_ids": e.ids, "token_type_ids": e.type_ids, "attention_mask": e.attention_mask}
    return _Piece({n: inputs[n] for n in returns}, e.offsets, e.special_tokens_mask, e.sequence_ids)


def _places(
    offsets: Sequence[tuple[int, int]], special: Sequence[int], sequences: Sequence[int | None]
) -> list[Place]:
    return [
        None if is_special or seq is None else (seq, start, end)
        for (start, end), is_special, seq in zip(offsets, special, sequences, strict=True)
    ]


def _read_as_typed(
    text: Text,
    tokens: Sequence[str],
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    sequences: Sequence[int | None],
    decode: Callable[[int], str],
) -> list[str]:
    """Each token as a person reads it: the characters of ``text`` it covers (its
    ``offsets``, in the text of a pair its ``sequences`` id names), stripped; a special token
    (``[CLS]``, ``<s>``) as itself; one that stands for whitespace alone (byte-level BPE's
    ``Ġ`` and ``Ċ``, SentencePiece's ``▁``, whose offsets may cover the next character) as
    that whitespace, quoted. A character several tokens spell (an emoji's bytes) is each's."""
    texts = (text,) if isinstance(text, str) else text
    read = []
    for token, i, (start, end), is_special, seq in zip(
        tokens, ids, offsets, special, sequences, strict=True
    ):
        if is_special or seq is None:
            read.append(token)
        elif not (decoded := decode(i)).strip():  # "" alone: a leading space, decoders drop
            read.append(repr(decoded or " "))
        else:
            read.append(texts[seq][start:end].strip() or repr(decoded))
    return read


@dataclass(frozen=True)
class Examined:
    """What the export learns of a tokenizer it saved into a bundle."""

    settings: Settings | None  # the record: how to run tokenizer.json alone; None: not safe
    copy_differs: str | None  # where transformers reads the copy otherwise than the model's


def check(
    source: Any, directory: Path, max_seq_len: int | None, pad_id: int | None
) -> Settings | None:
    """``examine``'s settings: the record, or None."""
    return examine(source, directory, max_seq_len, pad_id).settings


def examine(source: Any, directory: Path, max_seq_len: int | None, pad_id: int | None) -> Examined:
    """``source`` (the transformers tokenizer the export read text with: the model
    directory's), saved at ``directory``, compared three ways on ``PROBES``, ``PAIR_PROBES``
    and the tokenizers' special tokens (ids, token types, masks; one batch and each text
    alone; cut and not; padded with ``pad_id``, the model's): ``source``, transformers
    reading the copy back (as a bundle without the record is read), and its tokenizer.json
    run by ``Backend``.

    A copy transformers reads otherwise than ``source`` (its config naming an ordinary token
    as a special one, say) is warned about: text sent with the bundle is not tokenized as its
    export's was. The record is the settings with which ``Backend`` runs the very pipeline
    transformers runs (``_pipeline``: every field, every score) and answers the probes as
    transformers does."""
    saved = _read_back(directory)
    pad = pad_id if pad_id is not None else (saved.pad_token_id or 0)
    read = Transformers(saved, pad)
    texts: list[Text] = [*PROBES, *PAIR_PROBES, *_special_probes(source, saved)]
    try:
        differs = _first_difference(read, Transformers(source, pad), texts, max_seq_len)
    except Exception as e:  # noqa: BLE001 - a probe one of them cannot take
        log.info("the tokenizer's copy could not be compared with it (%s: %s)", type(e).__name__, e)
        differs = None
    if differs is not None:
        log.warning(
            "the bundle's copy of the tokenizer, read back by transformers, tokenizes "
            "otherwise than the model's own on %s: text sent with this bundle is not "
            "tokenized as its gates' was",
            differs,
        )
        return Examined(None, differs)
    return Examined(_alone(saved, read, directory, pad, texts, max_seq_len), None)


def _alone(
    saved: Any, read: Transformers, directory: Path, pad: int, texts: list[Text], limit: int | None
) -> Settings | None:
    """The settings with which ``directory``'s tokenizer.json, run by ``Backend``, is the
    pipeline ``read`` (transformers, reading the copy) runs, and answers ``texts`` as it
    does; None where it is not, or cannot be run so."""
    path = directory / TOKENIZER_FILE
    if not path.is_file() or not hasattr(saved, "backend_tokenizer"):
        why = f"the tokenizer has no {path.name}"
    else:
        try:
            found = _same_pipeline(saved, directory, pad)
            if isinstance(found, str):
                why = found
            elif where := _first_difference(found, read, texts, limit):
                why = f"{path.name} alone differs from transformers on {where}"
            else:
                return found.settings
        except Exception as e:  # noqa: BLE001 - a file or a probe tokenizers cannot take
            why = f"{path.name} does not run alone ({type(e).__name__}: {e})"
    log.info("%s: the bundle's text is tokenized by transformers", why)
    return None


def _same_pipeline(saved: Any, directory: Path, pad: int) -> Backend | str:
    """``Backend`` on ``directory``'s tokenizer.json, with ``saved``'s settings, where it
    runs the pipeline ``saved`` runs (for a Unigram model, with its scores read one of the
    two ways, ``SCORES``); else why not."""
    want = _pipeline(saved.backend_tokenizer)
    settings = Settings.of(saved)
    fast = Backend.load(directory, settings, pad)  # the file as the library reads it
    unigram = fast.model_kind == "Unigram"
    if unigram:
        fast = Backend(fast.backend, replace(settings, scores="tokenizers"), pad)
    if (have := _pipeline(fast.backend)) == want:
        return fast
    if unigram:  # a file of 250,000 pieces (XLM-R's) takes a second to read: once more only
        fast = Backend.load(directory, replace(settings, scores="python"), pad)
        if (have := _pipeline(fast.backend)) == want:
            return fast
    parts = ", ".join(k for k in dict.fromkeys([*want, *have]) if want.get(k) != have.get(k))
    return f"{TOKENIZER_FILE} alone is not the pipeline transformers runs (they differ in: {parts})"


def _pipeline(backend: Any) -> dict[str, Any]:
    """A ``tokenizers`` pipeline as it serializes itself (every score as the shortest text
    that reads back as the same double), less the truncation and padding set per call."""
    d = json.loads(backend.to_str())
    return {k: v for k, v in d.items() if k not in ("truncation", "padding")}


def _read_back(directory: Path) -> Any:
    """The tokenizer saved at ``directory``, as transformers reads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _special_probes(*tokenizers: Any) -> list[str]:
    """Texts that spell each special token of ``tokenizers``, apart and glued to words and
    to itself: where one tokenizer takes it for special and another for ordinary text."""
    specials = dict.fromkeys(str(t) for tok in tokenizers for t in tok.all_special_tokens)
    return [f"a {s} b, a{s}b{s}{s}c" for s in specials]


def _first_difference(
    a: Tokenizer, b: Tokenizer, texts: list[Text], max_seq_len: int | None
) -> str | None:
    """Where ``a`` and ``b`` first answer otherwise: ``texts`` as one batch and each alone
    (alone, unpadded: the arrays are the ids), not cut, cut short (``SHORT_CUT``) and at
    ``max_seq_len``; None where they never do."""
    for limit in dict.fromkeys((None, SHORT_CUT, max_seq_len or None)):
        batch = [(texts, "the probe texts as one batch")]
        for inputs, what in [*batch, *(([t], f"probe text {quoted(t, 40)}") for t in texts)]:
            x, y = a.encode(inputs, limit), b.encode(inputs, limit)
            same = x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
            if not same:
                return f"{what} (cut at {limit})"
    return None


def quoted(text: Text, width: int | None = None) -> str:
    """A text, or a pair, as a message quotes it ('a' + 'b'): whole, or its first ``width``
    characters."""
    if isinstance(text, str):
        return repr(text[:width])
    return " + ".join(repr(t[: None if width is None else width // 2]) for t in text)


__all__ = [
    "SCORES",
    "PAIR_PROBES",
    "PROBES",
    "Place",
    "Text",
    "Backend",
    "Settings",
    "Tokenizer",
    "Transformers",
    "Windows",
    "Examined",
    "check",
    "examine",
    "quoted",
    "window_overlap",
]
