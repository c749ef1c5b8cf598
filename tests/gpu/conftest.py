"""A tiny real fused BERT (ORT Attention, SkipLayerNormalization, ...) for the GPU-path tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_bert_export(tmp_path_factory, tiny_bert):
    """A random 2-layer BertModel (hidden 32) exported and fused by quantgate.export."""
    from transformers import BertModel

    from quantgate.export import ExportConfig, export_fp32

    root = tmp_path_factory.mktemp("gpu")
    hf = tiny_bert(root / "tiny-bert", BertModel)
    work = root / "work"
    work.mkdir()
    return export_fp32(hf, work, cfg=ExportConfig(name="tiny-bert"))


@pytest.fixture(scope="session")
def feeds(tiny_bert_export):
    """Real token ids at every validation shape of the export (batch 1, 8, padded, ...)."""
    return [dict(c.feeds) for c in tiny_bert_export.cases]


def ids_feed(names, batch=2, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0  # one padded row
    all_ = {
        "input_ids": rng.integers(1000, 20000, (batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return {k: all_[k] for k in names}
