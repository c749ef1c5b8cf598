"""Shared fixtures: a tiny real checkpoint, the user-module directory, and the CLI runner."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from quantgate.model.data import N_CLASSES, SEQ_LEN, VOCAB_SIZE
from quantgate.model.train import TrainConfig, train
from quantgate.model.transformer import ModelConfig

HERE = Path(__file__).resolve().parent
TINY = ModelConfig(
    vocab_size=VOCAB_SIZE,
    max_seq_len=SEQ_LEN,
    d_model=32,
    n_heads=4,
    n_layers=2,
    d_ff=64,
    dropout=0.0,
    n_classes=N_CLASSES,
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The built-in classifier at test size, trained for one epoch (a few seconds)."""
    out = tmp_path_factory.mktemp("ckpt") / "digits-tiny"
    train(out, model_cfg=TINY, cfg=TrainConfig(epochs=1, batch_size=256))  # 5 steps
    return out


@pytest.fixture(autouse=True)
def user_modules(monkeypatch):
    """Make tests/export/qg_usermodels.py importable by name, as a user's package would be."""
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Route tempfile to an empty directory, to prove that nothing is left in it."""
    d = tmp_path / "system-tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory, tiny_bert) -> Path:
    """A randomly initialised 2-layer BERT classifier with MiniLM's real tokenizer, saved as a
    Hugging Face directory: the sequence-classification path without a large download."""
    from transformers import BertForSequenceClassification

    return tiny_bert(
        tmp_path_factory.mktemp("hf") / "tiny-bert-cls",
        BertForSequenceClassification,
        num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
