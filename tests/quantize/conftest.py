"""Fixtures the quantize tests share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import dynamic_int8, tiny_export  # noqa: E402


@pytest.fixture
def gate_file(tmp_path) -> Path:
    """Gate settings that time and resample little: a gating of the tiny models in seconds."""
    f = tmp_path / "gates.toml"
    f.write_text("iterations = 3\nwarmup = 1\nbatch_sizes = [1, 4]\nbootstrap = 200\n")
    return f


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny export and a dynamic INT8 of it: a pair of real models to gate."""
    result = tiny_export()
    return result, dynamic_int8(result.onnx, tmp_path_factory.mktemp("q") / "int8.onnx")
