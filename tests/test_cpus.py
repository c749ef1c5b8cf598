"""The CPUs a process may use, and the intra-op threads its sessions get: a container's CPU
quota, read from cgroup v2 and v1 trees laid out as the kernel mounts them, and a real
cgroup where this machine lets the test make one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate import cpus


def _tree(tmp_path: Path, membership: str, files: dict[str, str], monkeypatch) -> None:
    """A cgroup filesystem under ``tmp_path`` with ``files`` (path -> content), and this
    process's /proc/self/cgroup as ``membership``."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    monkeypatch.setattr(cpus, "CGROUP", tmp_path)
    monkeypatch.setattr(cpus, "MEMBERSHIP", tmp_path / "self-cgroup")


def test_cgroup_v2_quota_is_the_smallest_of_the_group_and_its_parents(tmp_path, monkeypatch):
    """A pod's limit sits on the group above the container's, whose own cpu.max is "max"."""
    _tree(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        {
            "kubepods/cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "250000 100000\n",
            "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        },
        monkeypatch,
    )
    assert cpus.quota() == 2.5
    (tmp_path / "kubepods/pod1/ctr/cpu.max").write_text("50000 100000\n")
    assert cpus.quota() == 0.5


def test_cgroup_v1_quota_and_no_quota(tmp_path, monkeypatch):
    """v1: cfs_quota_us / cfs_period_us of the cpu controller's group, -1 for none; inside a
    container the group's own path is not mounted and the controller's root is its group."""
    _tree(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
         "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
        monkeypatch,
    )  # fmt: skip
    assert cpus.quota() == 2.0
    (tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.quota() is None

    _tree(
        tmp_path / "ctr",
        "4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        monkeypatch,
    )
    assert cpus.quota() == 1.5


def test_no_cgroup_is_no_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "MEMBERSHIP", tmp_path / "absent")
    assert cpus.quota() is None
    _tree(tmp_path, "0::/\n", {"cpu.max": "garbage\n"}, monkeypatch)
    assert cpus.quota() is None


def test_threads_follow_a_quota_below_the_cpus_and_nothing_else(tmp_path, monkeypatch):
    """ONNX Runtime's default (0) unless a quota is below the CPUs the process may run on;
    then its whole CPUs, at least one. Threads asked for are kept, quota or not."""
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    _tree(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "max 100000\n"}, monkeypatch)
    assert cpus.threads() == 0
    assert cpus.describe() == "ONNX Runtime's default (one per physical core)"
    for limit, expected in (("250000", 2), ("50000", 1), ("6400000", 0), ("9600000", 0)):
        (tmp_path / "ctr/cpu.max").write_text(f"{limit} 100000\n")
        assert cpus.threads() == expected, limit
    (tmp_path / "ctr/cpu.max").write_text("250000 100000\n")
    assert cpus.threads(3) == 3
    assert cpus.describe(3) == "3 (asked for)"
    assert cpus.describe().startswith("2 (the CPU quota, 2.5 CPUs;")


def test_speed_gates_record_the_quota_and_the_threads_it_gave(tmp_path, monkeypatch):
    from quantgate.quantize.speed import TimingConditions

    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    _tree(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "200000 100000\n"}, monkeypatch)
    now = TimingConditions.now(0)
    assert (now.threads, now.quota) == (2, 2.0)
    assert now.describe().startswith("2 intra-op threads, 64 CPUs (a CPU quota of 2), ")


def _writable_v1_cpu_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/cpu")
    ok = (root / "cpu.cfs_quota_us").is_file() and os.access(root, os.W_OK)
    return root if ok and len(os.sched_getaffinity(0)) >= 2 else None


@pytest.mark.skipif(
    _writable_v1_cpu_cgroup() is None,
    reason="needs a writable cgroup v1 cpu controller (root) and 2 CPUs to make a real quota",
)
def test_a_real_quota_sizes_a_real_session(tmp_path):
    """In a real cgroup with a 1-CPU quota on a machine of 2 or more CPUs, quantgate's
    session starts no intra-op pool threads (ORT's pool of N threads starts N - 1 of its own
    beside the caller's), where a session of ORT's default starts them."""
    group = _writable_v1_cpu_cgroup() / f"quantgate-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("100000")
        code = (
            "import os, onnxruntime as ort\n"
            "from quantgate.sessions import session\n"
            "from quantgate import cpus\n"
            "from onnx import TensorProto, helper as oh\n"
            "x = oh.make_tensor_value_info('x', TensorProto.FLOAT, [1])\n"
            "g = oh.make_graph([oh.make_node('Relu', ['x'], ['y'])], 'g', [x], "
            "[oh.make_tensor_value_info('y', TensorProto.FLOAT, [1])])\n"
            "m = oh.make_model(g, opset_imports=[oh.make_opsetid('', 17)])\n"
            "def count(): return len(os.listdir('/proc/self/task'))\n"
            "before = count(); ours = session(m); after_ours = count()\n"
            "theirs = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
            "print(cpus.quota(), cpus.threads(), after_ours - before, count() - after_ours)\n"
        )
        run = subprocess.run(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, code],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        quota, threads, ours, theirs = run.stdout.split()
        assert (float(quota), int(threads), int(ours)) == (1.0, 1, 0)
        assert int(theirs) >= 1  # ORT's default: one thread per physical core, the quota unseen
    finally:
        group.rmdir()
