"""Shared fixtures: the user-module directory, and the CLI runner (the tiny checkpoint is
tests/conftest.py's)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


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
