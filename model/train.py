"""Train the small encoder classifier on the built-in digits task, and its checkpoints.

A checkpoint is a directory::

    checkpoint/
      config.json   model config, training config, data hash, weights sha256, test accuracy
      model.pt      the state dict (loaded with weights_only=True)

Training is deterministic (seeded, on a fixed number of threads) and a valid checkpoint
for the same model config, training config and data is reused instead of retrained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantgate.bundle import sha256_file
from quantgate.configs import config_class
from quantgate.errors import CheckpointError, CheckpointOutOfSpace, ConfigError
from quantgate.fsutil import atomic_dir, disk_full, target_problem
from quantgate.model.data import (
    N_CLASSES,
    PAD_ID,
    SEQ_LEN,
    VOCAB_SIZE,
    load_digits_splits,
    splits_hash,
)
from quantgate.model.transformer import EncoderClassifier, ModelConfig, preset
from quantgate.quiet import GLOBAL_STATE

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "quantgate-checkpoint"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.pt"
REQUIRED_KEYS = ("model", "train", "data_sha256", "metrics")  # in config.json; readers rely on them
DEFAULT_CHECKPOINT = Path("artifacts/digits-small")


def digits_model_config(preset_name: str = "small") -> ModelConfig:
    return preset(
        preset_name, vocab_size=VOCAB_SIZE, max_seq_len=SEQ_LEN, n_classes=N_CLASSES, pad_id=PAD_ID
    )


@config_class
@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25  # the small preset: 95.6% test accuracy (artifacts/digits-small)
    batch_size: int = 64  # 20 steps per epoch over the 1,237 training images
    lr: float = 2e-3  # AdamW peak learning rate, cosine-decayed to 0
    weight_decay: float = 0.1  # with dropout 0.2: 1,237 images overfit a transformer quickly
    # Linear warm-up to lr over this fraction of all steps (50 of the default 500), so that
    # a short run (--epochs 2) reaches its peak and decays too.
    warmup: float = 0.1
    seed: int = 0  # initial weights, dropout and batch order: same seed, same weights
    threads: int = 2  # fixed so that results do not depend on the machine's core count

    def __post_init__(self):
        problems = [
            f"{name} must be an integer >= {low}, got {getattr(self, name)!r}"
            for name, low in (("epochs", 1), ("batch_size", 1), ("threads", 1))
            if not _is_int(getattr(self, name)) or getattr(self, name) < low
        ]
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            problems.append(  # torch seeds its generator with the low 32 bits: 2**32 is 0
                f"seed must be an integer in [0, 2**32), got {self.seed!r}"
            )
        if not _is_number(self.lr) or not self.lr > 0:
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        if not _is_number(self.warmup) or not 0 <= self.warmup < 1:
            problems.append(
                f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}"
            )
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            problems.append(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    test_accuracy: float
    reused: bool
    seconds: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
) -> float:
    model.eval()
    logits = model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
    return float((logits.argmax(-1).numpy() == labels).mean())


def train(
    out: str | Path = DEFAULT_CHECKPOINT,
    *,
    model_cfg: ModelConfig | None = None,
    cfg: TrainConfig = TrainConfig(),
    force: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train (or reuse) the digits classifier and write a checkpoint to ``out``.

    ``on_step(step, total_steps, loss)`` is called after every optimizer step (progress bars).
    The same configs give the same weights; the caller's global torch RNG is left as it was.
    """
    out = Path(out)
    model_cfg = model_cfg or digits_model_config()
    check_fits_digits(model_cfg)  # these two checks come before minutes of training
    if problem := target_problem(out, force=force, is_ours=is_checkpoint, noun="checkpoint"):
        raise CheckpointError(problem)
    splits = load_digits_splits()
    data_hash = splits_hash(splits)
    t0 = time.perf_counter()

    if not force and (out / CONFIG_FILE).exists():
        try:
            _, info = load_checkpoint(out)
        except CheckpointError as e:
            log.warning("not reusing %s: %s", out, e)
        else:
            if (
                info["model"] == model_cfg.to_dict()
                and info["train"] == asdict(cfg)
                and info["data_sha256"] == data_hash
            ):
                log.info("reusing checkpoint %s (same model, training config and data)", out)
                return TrainResult(
                    out, info["metrics"]["test_accuracy"], True, time.perf_counter() - t0
                )
            log.info("checkpoint %s was trained with other settings: retraining", out)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeds a copy of the global RNG, not the caller's
            torch.manual_seed(cfg.seed)
            model = EncoderClassifier(model_cfg)
            history = _fit(model, splits, cfg, on_step)
    finally:
        torch.set_num_threads(prev_threads)
    test = splits["test"]
    test_acc = accuracy(model, test.input_ids, test.attention_mask, test.labels)

    try:
        with atomic_dir(out) as tmp:
            torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
            info = {
                "format": CHECKPOINT_FORMAT,
                "kind": "encoder-classifier",
                "task": "digits",
                "model": model_cfg.to_dict(),
                "train": asdict(cfg),
                "data_sha256": data_hash,
                "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
                "metrics": {"test_accuracy": test_acc, "n_test": len(test)},
                "inputs": {"input_ids": [None, SEQ_LEN], "attention_mask": [None, SEQ_LEN]},
                "torch": torch.__version__,
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except OSError as e:
        raise (CheckpointOutOfSpace if disk_full(e) else CheckpointError)(
            f"cannot write the checkpoint at {out}: {e.strerror or e} ({e.filename or out}). "
            "Check that --out's parent is a writable directory with room; nothing was changed."
        ) from e
    return TrainResult(out, test_acc, False, time.perf_counter() - t0, history)


def check_fits_digits(model_cfg: ModelConfig) -> None:
    """Raise ConfigError unless ``model_cfg`` takes the digits task's tokens and labels."""
    problems = []
    if model_cfg.vocab_size < VOCAB_SIZE:
        problems.append(
            f"vocab_size {model_cfg.vocab_size} < {VOCAB_SIZE} (pad + intensities 0..16)"
        )
    if model_cfg.max_seq_len < SEQ_LEN:
        problems.append(f"max_seq_len {model_cfg.max_seq_len} < {SEQ_LEN} (one token per pixel)")
    if model_cfg.n_classes != N_CLASSES:
        problems.append(f"n_classes {model_cfg.n_classes} != {N_CLASSES} (the digits 0..9)")
    if problems:
        raise ConfigError(
            f"the model config does not fit the digits task: {'; '.join(problems)}. Start from "
            "digits_model_config() and replace only the model's size (d_model, n_heads, ...)."
        )


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """The rate at optimizer ``step`` (0-based) of ``total``: linear warm-up to ``cfg.lr``
    over the first ``cfg.warmup`` of the steps, then cosine decay towards 0."""
    warmup = round(cfg.warmup * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + np.cos(np.pi * progress))


def _fit(model: EncoderClassifier, splits, cfg: TrainConfig, on_step) -> list[dict]:
    """AdamW with linear warm-up then cosine decay; returns each epoch's mean training loss."""
    train_split = splits["train"]
    ids = torch.from_numpy(train_split.input_ids)
    mask = torch.from_numpy(train_split.attention_mask)
    labels = torch.from_numpy(train_split.labels)
    n = len(labels)
    steps_per_epoch = -(-n // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    gen = torch.Generator().manual_seed(cfg.seed)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()  # dropout on
        order = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step, total)
            loss = F.cross_entropy(model(ids[idx], mask[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)  # the batch's mean loss, times its size
            if on_step:
                on_step(step, total, loss.item())
        # The mean over the epoch's images: the last batch alone (21 images) is noise.
        history.append({"epoch": epoch + 1, "loss": loss_sum / n})
        log.info("epoch %d/%d: mean training loss %.4f", epoch + 1, cfg.epochs, loss_sum / n)
    return history


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint written by ``train`` (intact or not)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_checkpoint(path: str | Path) -> tuple[EncoderClassifier, dict]:
    """Load a checkpoint directory written by ``train``; the model is in eval mode."""
    path = Path(path)
    hint = "Re-create it with `quantgate train --force`."
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: the path does not exist. Create one with `quantgate train`."
        )
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; a checkpoint is a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}."
        )
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        missing = [p.name for p in (cfg_path, weights) if not p.is_file()]
        raise CheckpointError(
            f"{path} is not a complete checkpoint: missing {', '.join(missing)}. {hint}"
        )
    try:
        info = json.loads(cfg_path.read_text())
        if info.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format is {info.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        if missing := [k for k in REQUIRED_KEYS if k not in info]:
            raise ValueError(f"no {', '.join(map(repr, missing))} key")
        model_cfg = ModelConfig(**info["model"])
    except Exception as e:  # noqa: BLE001 - any parse problem is a corrupt checkpoint
        raise CheckpointError(f"{cfg_path} is corrupt ({type(e).__name__}: {e}). {hint}") from e
    digest = sha256_file(weights)
    if digest != info.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match its config (sha256 {digest[:12]}..., expected "
            f"{str(info.get('weights_sha256'))[:12]}...): the file is corrupt or was replaced. {hint}"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # Made as the checkpoint was, whatever the caller set: float32, and its weights'
        # random initialisation (overwritten at once) drawn without advancing the caller's
        # global RNG; both process-wide, so one load at a time (quantgate.quiet).
        with GLOBAL_STATE, torch.random.fork_rng(devices=[]), _default_dtype(torch.float32):
            model = EncoderClassifier(model_cfg)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{weights} cannot be loaded ({type(e).__name__}: {e}). {hint}"
        ) from e
    return model.eval(), info
