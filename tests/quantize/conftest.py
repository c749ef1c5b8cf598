"""Fixtures the quantize tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def gate_file(tmp_path) -> Path:
    """Gate settings that time and resample little: a gating of the tiny models in seconds."""
    f = tmp_path / "gates.toml"
    f.write_text("iterations = 3\nwarmup = 1\nbatch_sizes = [1, 4]\nbootstrap = 200\n")
    return f
