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
from quantgate.bundle import CPU
from quantgate.errors import ConfigError


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


def test_membership_lines_it_cannot_read_count_for_nothing(tmp_path, monkeypatch):
    """A blank or malformed line, or a path that climbs out of the mount, is no group (and no
    error: every session is opened through this)."""
    mount = tmp_path / "fs"
    _tree(mount, "\nnonsense\n0::/../../x\n0::/ctr\n",
          {"ctr/cpu.max": "300000 100000\n", "../cpu.max": "10000 100000\n"}, monkeypatch)  # fmt: skip
    assert cpus.quota() == 3.0


def test_threads_follow_the_share_of_the_host_the_process_may_use(tmp_path, monkeypatch):
    """ONNX Runtime's default (0) where the process may use the whole host; else the smaller
    of its affinity mask and its quota, whole CPUs, at least one. Threads asked for are kept,
    and so is ORT_INTRA_OP_NUM_THREADS, which ONNX Runtime reads where asked for 0."""
    monkeypatch.delenv(cpus.ORT_THREADS, raising=False)
    monkeypatch.setattr(cpus, "host", lambda: 64)
    monkeypatch.setattr(cpus, "physical", lambda: 64)
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    _tree(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "max 100000\n"}, monkeypatch)
    assert cpus.threads() == 0
    assert cpus.describe() == (
        "ONNX Runtime's default (one per physical core: 64 of the host's 64 CPUs)"
    )
    for limit, expected in (("250000", 2), ("50000", 1), ("6400000", 0), ("9600000", 0)):
        (tmp_path / "ctr/cpu.max").write_text(f"{limit} 100000\n")
        assert cpus.threads() == expected, limit
    (tmp_path / "ctr/cpu.max").write_text("250000 100000\n")
    assert cpus.threads(3) == 3
    assert cpus.describe(3) == "3 (asked for)"
    assert cpus.describe().startswith("2 (the CPU quota, 2.5 CPUs of the host's 64;")

    monkeypatch.setattr(cpus, "affinity", lambda: 8)  # a cpuset of 8, as a static CPU manager
    (tmp_path / "ctr/cpu.max").write_text("max 100000\n")
    assert cpus.threads() == 8
    assert cpus.describe().startswith("8 (the 8 CPUs this process may run on of the host's 64;")
    (tmp_path / "ctr/cpu.max").write_text("400000 100000\n")
    assert cpus.threads() == 4

    (tmp_path / "ctr/cpu.max").write_text("max 100000\n")
    monkeypatch.setattr(cpus, "physical", lambda: 32)  # two threads a core: ORT takes 32
    monkeypatch.setattr(cpus, "affinity", lambda: 48)
    assert cpus.threads() == 0  # 48 of 64 CPUs, more than ORT's own 32

    monkeypatch.setenv(cpus.ORT_THREADS, "3")
    assert cpus.threads() == 3
    assert cpus.describe() == "3 (ORT_INTRA_OP_NUM_THREADS in the environment)"
    monkeypatch.setenv(cpus.ORT_THREADS, "0")  # ONNX Runtime's default: as if unset
    monkeypatch.setattr(cpus, "affinity", lambda: 8)
    assert cpus.threads() == 8
    monkeypatch.setenv(cpus.ORT_THREADS, "abc")
    with pytest.raises(ConfigError, match="ORT_INTRA_OP_NUM_THREADS='abc': expected a whole"):
        cpus.threads()


def test_a_session_on_a_gpu_gets_one_thread_unless_more_are_asked_for(monkeypatch):
    """The graph runs on the GPU: a pool of the host's cores would only spin between runs,
    beside the server's own threads. Threads asked for, or set in the environment, win."""
    monkeypatch.delenv(cpus.ORT_THREADS, raising=False)
    monkeypatch.setattr(cpus, "physical", lambda: 16)
    monkeypatch.setattr(cpus, "affinity", lambda: 16)
    assert (cpus.threads(gpu=True), cpus.threads()) == (1, 0)
    assert cpus.describe(gpu=True) == "1 (the graph runs on the GPU: more would only spin)"
    assert cpus.threads(4, gpu=True) == 4
    monkeypatch.setenv(cpus.ORT_THREADS, "3")
    assert cpus.threads(gpu=True) == 3


def test_speed_gates_record_the_quota_and_the_threads_it_gave(tmp_path, monkeypatch):
    from quantgate.quantize.speed import TimingConditions

    monkeypatch.delenv(cpus.ORT_THREADS, raising=False)
    monkeypatch.setattr(cpus, "physical", lambda: 64)
    monkeypatch.setattr(cpus, "affinity", lambda: 64)
    _tree(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "200000 100000\n"}, monkeypatch)
    now = TimingConditions.now(0, CPU)
    assert (now.threads, now.quota) == (2, 2.0)
    assert now.describe().startswith("2 intra-op threads, 64 CPUs (a CPU quota of 2), ")


_POOL = (
    "import os, sys, onnxruntime as ort\n"
    "from quantgate.sessions import session\n"
    "from quantgate import cpus\n"
    "from onnx import TensorProto, helper as oh\n"
    "if len(sys.argv) > 1: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    "x = oh.make_tensor_value_info('x', TensorProto.FLOAT, [1])\n"
    "g = oh.make_graph([oh.make_node('Relu', ['x'], ['y'])], 'g', [x], "
    "[oh.make_tensor_value_info('y', TensorProto.FLOAT, [1])])\n"
    "m = oh.make_model(g, opset_imports=[oh.make_opsetid('', 17)])\n"
    "def count(): return len(os.listdir('/proc/self/task'))\n"
    "before = count(); ours = session(m); after_ours = count()\n"
    "theirs = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
    "print(cpus.threads(), after_ours - before, count() - after_ours)\n"
)


def _pool_threads(argv: list[str], env: dict | None = None) -> tuple[int, int, int]:
    """(cpus.threads(), pool threads quantgate's session started, ORT's default's): ORT's
    pool of N threads starts N - 1 of its own beside the caller's."""
    env = {k: v for k, v in (env or os.environ).items() if k != cpus.ORT_THREADS}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    chosen, ours, theirs = map(int, run.stdout.split())
    return chosen, ours, theirs


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or cpus.physical() < 2
    or (os.cpu_count() or 1) > len(os.sched_getaffinity(0)) or cpus.threads() != 0,
    reason="needs a Linux process that may use the whole of a host of 2 or more physical "
    "cores (ONNX Runtime's default pool is one thread per core), no quota below it",
)  # fmt: skip
def test_a_real_affinity_mask_sizes_a_real_session():
    """A process on one CPU of the host: quantgate's session starts no pool threads, where a
    session of ORT's default starts them (it reads the host's cores, not the mask)."""
    chosen, ours, theirs = _pool_threads([sys.executable, "-c", _POOL])  # the whole host
    assert chosen == 0 and ours == theirs >= 1  # ORT's default, as a session of its own
    chosen, ours, theirs = _pool_threads([sys.executable, "-c", _POOL, "pin"])
    assert (chosen, ours) == (1, 0)
    assert theirs >= 1


def _writable_v1_cpu_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/cpu")
    ok = (root / "cpu.cfs_quota_us").is_file() and os.access(root, os.W_OK)
    return root if ok and cpus.physical() >= 2 and len(os.sched_getaffinity(0)) >= 2 else None


@pytest.mark.skipif(
    _writable_v1_cpu_cgroup() is None,
    reason="needs a writable cgroup v1 cpu controller (root) and 2 physical cores, to make a "
    "real quota below ONNX Runtime's default",
)
def test_a_real_quota_sizes_a_real_session(tmp_path):
    """In a real cgroup with a 1-CPU quota on a machine of 2 or more CPUs, quantgate's
    session starts no intra-op pool threads (ORT's pool of N threads starts N - 1 of its own
    beside the caller's), where a session of ORT's default starts them."""
    group = _writable_v1_cpu_cgroup() / f"quantgate-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("100000")
        argv = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"']
        chosen, ours, theirs = _pool_threads([*argv, sys.executable, _POOL])
        assert (chosen, ours) == (1, 0)
        assert theirs >= 1  # ORT's default: one thread per physical core, the quota unseen
    finally:
        group.rmdir()


def test_onnx_runtimes_own_tools_get_the_share_through_its_variable(monkeypatch):
    """ONNX Runtime's calibrator opens its session with the default threads: the block sets
    ORT_INTRA_OP_NUM_THREADS to the share, and takes it away after; it changes nothing where
    there is no share to give, nor a number of threads set already. Set to 0 (ONNX Runtime's
    default: every physical core), it left the calibrator all of them."""
    monkeypatch.delenv(cpus.ORT_THREADS, raising=False)
    monkeypatch.setattr(cpus, "threads", lambda: 2)
    with cpus.for_tools():
        assert os.environ[cpus.ORT_THREADS] == "2"
    assert cpus.ORT_THREADS not in os.environ
    monkeypatch.setenv(cpus.ORT_THREADS, "0")
    with cpus.for_tools():
        assert os.environ[cpus.ORT_THREADS] == "2"
    assert os.environ[cpus.ORT_THREADS] == "0"
    monkeypatch.setenv(cpus.ORT_THREADS, "5")  # kept, not the share
    with cpus.for_tools():
        assert os.environ[cpus.ORT_THREADS] == "5"
    assert os.environ[cpus.ORT_THREADS] == "5"
    monkeypatch.delenv(cpus.ORT_THREADS)
    monkeypatch.setattr(cpus, "threads", lambda: 0)
    with cpus.for_tools():
        assert cpus.ORT_THREADS not in os.environ


def test_cpu_time_counts_the_cpus_this_process_may_run_on(tmp_path, monkeypatch):
    """/proc/stat's busy ticks of the CPUs in the affinity mask; where its numbering is not
    the mask's (a container's view of another host's CPUs), every CPU's."""
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 100 1000 0 0 0 0 0 0\n"
        "cpu0 200 0 100 400 0 0 0 0 0 0\n"
        "cpu1 100 0 0 600 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    monkeypatch.setattr(cpus, "PROC_STAT", stat)
    tick = os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    t = cpus.CpuTime.now()
    assert (t.busy, t.cpus) == (300 / tick, 1)  # cpu0 alone: user 200 + system 100
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5})
    t = cpus.CpuTime.now()
    assert (t.busy, t.cpus) == (400 / tick, 2)  # the whole "cpu" line, over its 2 CPUs
    monkeypatch.setattr(cpus, "PROC_STAT", tmp_path / "missing")
    assert cpus.CpuTime.now().busy is None and cpus.CpuTime.now().others_since(t) is None


def test_a_window_too_short_for_the_clock_ticks_says_nothing():
    """/proc/stat counts in clock ticks (10 ms at 100 Hz): over a few milliseconds one tick
    more or less is a share of 50%, not a measurement. Under MIN_TICKS across the CPUs,
    others_since says it cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")
    start = cpus.CpuTime(wall=0.0, busy=0.0, own=0.0, cpus=2)
    short = (cpus.MIN_TICKS - 1) / tick / 2  # seconds of wall time, on 2 CPUs
    assert cpus.CpuTime(wall=short, busy=short, own=0.0, cpus=2).others_since(start) is None
    enough = cpus.MIN_TICKS / tick / 2
    busy = cpus.CpuTime(wall=enough, busy=enough, own=0.0, cpus=2)  # one CPU of two busy
    assert busy.others_since(start) == pytest.approx(0.5)


def test_a_timing_with_no_proc_stat_blames_no_clock_ticks(tmp_path, monkeypatch):
    """Where /proc/stat cannot be read (another OS), nothing is told of other processes, and
    no reason about ticks is given for it; a short timing on Linux says why it tells none."""
    from quantgate.quantize.speed import TimingConditions

    conditions = TimingConditions.now(1, "CPUExecutionProvider")
    short = conditions.measured(cpus.CpuTime.now())
    assert short.others is None and short.timed_s is not None
    assert "not told over" in short.describe()
    monkeypatch.setattr(cpus, "PROC_STAT", tmp_path / "missing")
    start = cpus.CpuTime.now()
    none = conditions.measured(start)
    assert none.others is None and none.timed_s is None
    assert "other processes" not in none.describe()
