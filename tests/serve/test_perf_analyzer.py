"""Triton's own load generator runs against quantgate unmodified."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

PERF_ANALYZER = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "perf_analyzer"


@pytest.mark.slow
@pytest.mark.skipif(
    not PERF_ANALYZER.exists(),
    reason="perf_analyzer is not installed: run scripts/get-perf-analyzer.sh",
)
def test_perf_analyzer_measures_the_server(server):
    out = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-m",
            "classifier",
            "-u",
            server.url,
            "-i",
            "grpc",
            "--shape",
            "input_ids:16",
            "--shape",
            "attention_mask:16",
            "--input-data",
            "zero",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "1000",
            "--stability-percentage",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Throughput:" in out.stdout and "p99 latency:" in out.stdout
    assert "Successful request count:" in out.stdout  # it read our statistics
