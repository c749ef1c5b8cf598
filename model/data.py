"""The built-in task: scikit-learn's digits as sequences of 64 pixel tokens.

1,797 real 8x8 handwritten digits with labels. Each image becomes a sequence of 64 tokens,
one per pixel in row-major order: token = intensity + 1 (intensities are 0..16), so token
0 is free for padding. The split into train / calibration / test is fixed (seeded
permutation), so every stage and every machine sees the same held-out data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

PAD_ID = 0
VOCAB_SIZE = 18  # pad + intensities 0..16
SEQ_LEN = 64
N_CLASSES = 10
SPLIT_SEED = 0
N_TEST = 360  # ~20%
N_CALIBRATION = 200  # drawn from what is not test; never trained on


@dataclass(frozen=True)
class Split:
    input_ids: np.ndarray  # (N, 64) int64
    attention_mask: np.ndarray  # (N, 64) int64, all ones
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def feeds(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _tokens(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), SEQ_LEN).astype(np.int64) + 1


def load_digits_splits() -> dict[str, Split]:
    """The fixed {"train", "calibration", "test"} splits of the digits task."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    ids, labels = _tokens(d.images), d.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    parts = {
        "test": order[:N_TEST],
        "calibration": order[N_TEST : N_TEST + N_CALIBRATION],
        "train": order[N_TEST + N_CALIBRATION :],
    }
    return {
        name: Split(ids[idx], np.ones_like(ids[idx]), labels[idx]) for name, idx in parts.items()
    }


def splits_hash(splits: dict[str, Split]) -> str:
    """A content hash of the splits: a checkpoint is reused only for the same data."""
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(s.input_ids).tobytes())
        h.update(np.ascontiguousarray(s.labels).tobytes())
    return h.hexdigest()
