"""The cheaper benchmark scripts still run, end to end, and print what docs/BENCHMARKS.md
quotes from them: a smoke run of each, its figures not asserted (benchmarks measure; tests
do not time). The others build MiniLM bundles or need a GPU: `make bench` runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT: where a run writes
    run = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_codec_bench_times_both_encoders():
    text = _run("codec.py", "--rounds", "3")
    for encoder in ("protobuf (tobytes, append, serialize)", "codec.encode_response"):
        assert re.search(rf"{re.escape(encoder)}: \d+\.\d us", text), text


def test_grpc_transport_bench_prints_every_server_row():
    text = _run("grpc_transport.py", "--requests", "20")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms |" not in line]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == [
        "no gRPC: TCP echo",
        "aio",
        "aio, no BDP, 4 MB window",
        "sync",
        "aio, after a model run",
        "aio, after a model run on the event loop",
        "aio, after a model run, ORT spinning off",
        "sync, after a model run on the request thread",
    ], text
    for row in rows:  # three figures per row: two round trips and the CPU it cost
        assert re.fullmatch(r"\| .+ \| \d+\.\d{3} \| \d+\.\d{3} \| \d+ / \d+ \|", row), row
