"""tritonclient helpers and the in-process reference the server must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tc
from bundles import VOCAB

MODEL_FILE = "model.fp32.onnx"


def batch(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1, VOCAB, size=(rows, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def inputs(feeds: dict[str, np.ndarray]) -> list[tc.InferInput]:
    out = []
    for name, array in feeds.items():
        i = tc.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        i.set_data_from_numpy(array)
        out.append(i)
    return out


class Reference:
    """In-process ONNX Runtime on the bundle's file: what the server must answer."""

    def __init__(self, bundle: Path):
        self.session = ort.InferenceSession(
            str(bundle / MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        self.output = self.session.get_outputs()[0].name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]
