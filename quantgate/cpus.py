"""How many CPUs this process may use, and so how many intra-op threads ONNX Runtime gets.

ONNX Runtime (1.32) sizes its default thread pool to the host's physical cores, whatever
share of them the process has: it reads neither a container's CPU quota (cgroup v2
``cpu.max``, v1 ``cpu.cfs_quota_us``) nor its affinity mask (``taskset``, a cpuset; measured:
a process on one CPU of two got a pool of 2). A pod limited to 2 CPUs on a 64-core host gets a
32-thread pool whose threads the kernel throttles in turn, and each request waits for the
last of them. quantgate's sessions ask for ``threads()`` instead: ONNX Runtime's own default
(0) where the process may use the whole host, else the CPUs it may use.

A session on a GPU provider gets one thread. The graph runs on the GPU; the CPU's pool runs
only what the GPU leaves it (shape arithmetic, for a variant that passed its CUDA gates),
and its threads spin after every run all the same (ONNX Runtime's default), a core each,
beside the server's own threads. A variant that falls back to the CPU runs its CPU nodes
on that one thread too when served, unless more are asked for; the CUDA gates time it with
the CPU's threads (``quantize.cuda.measure``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")  # where the cgroup filesystems are mounted
PROC_STAT = Path("/proc/stat")  # the machine's CPU time, every CPU and process (Linux)
MIN_TICKS = 20  # clock ticks a window of others_since must span, across the CPUs
MEMBERSHIP = Path("/proc/self/cgroup")  # which group of each hierarchy this process is in


def host() -> int:
    """The host's logical CPUs (its physical cores: ``physical``)."""
    return os.cpu_count() or 1


def affinity() -> int:
    """The logical CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return host()


def quota() -> float | None:
    """The CPUs this process's cgroup may use per period (2.5 for ``250000 100000``), or
    None where there is no quota or none can be read (not Linux, no cgroup filesystem).

    cgroup v2's ``cpu.max`` of the process's own group and its parents (the smallest
    counts: a pod's limit sits on the group above the container's); v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of its ``cpu`` controller."""
    limits: list[float] = []
    for group in _groups():
        limits.extend(filter(None, (_v2(group / "cpu.max"), _v1(group))))
    return min(limits, default=None)


ORT_THREADS = "ORT_INTRA_OP_NUM_THREADS"  # ONNX Runtime's own setting, read where we ask for 0


def threads(asked: int = 0, *, gpu: bool = False) -> int:
    """Intra-op threads for a session: ``asked`` where given (>0), else a positive
    ``ORT_INTRA_OP_NUM_THREADS``; else 1 for a session on a GPU provider (``gpu``); else 0
    (ONNX Runtime's default: the host's physical cores) unless the process may use fewer
    CPUs than that: its affinity mask, or a smaller CPU quota. Then the smaller of the two,
    whole CPUs, at least one."""
    if asked > 0:
        return asked
    if from_env := _env_threads():
        return from_env
    if gpu:
        return 1
    share = min(affinity(), quota() or math.inf)
    if share >= physical():
        return 0
    return max(1, math.floor(share))


@contextlib.contextmanager
def for_tools() -> Iterator[None]:
    """ORT_INTRA_OP_NUM_THREADS set to ``threads()`` for the block, for the sessions ONNX
    Runtime's own tools open with its default (its calibrator), where the process may use
    fewer CPUs than that default takes; nothing changed where it may not, or where the
    variable is set already (to a number of threads: 0, ONNX Runtime's default, is given the
    share, and back after)."""
    chosen = threads()
    if not chosen or _env_threads():
        yield
        return
    before = os.environ.get(ORT_THREADS)
    os.environ[ORT_THREADS] = str(chosen)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ORT_THREADS, None)
        else:
            os.environ[ORT_THREADS] = before


@functools.cache
def physical() -> int:
    """The host's physical cores, as ONNX Runtime counts them for its default pool: one per
    (package, core) pair in sysfs; the logical CPUs where sysfs does not say. Read once:
    every session asks (``threads``), and the host's cores do not change."""
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return host()
    return len(cores) or host()


def _env_threads() -> int:
    """ONNX Runtime's ``ORT_INTRA_OP_NUM_THREADS``: 0 where unset or 0 (its default);
    ConfigError for a value it would refuse, naming the variable."""
    value = os.environ.get(ORT_THREADS, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        from quantgate.errors import ConfigError

        raise ConfigError(
            f"{ORT_THREADS}={value!r}: expected a whole number of threads >= 0 (0: ONNX "
            "Runtime's default). Set it so, or unset it"
        )
    return int(value)


def describe(asked: int = 0, *, gpu: bool = False) -> str:
    """The threads ``threads`` gives and why, for a log line or a gate's detail."""
    if asked > 0:
        return f"{asked} (asked for)"
    chosen = threads(gpu=gpu)
    if _env_threads():
        return f"{chosen} ({ORT_THREADS} in the environment)"
    if gpu:
        return "1 (the graph runs on the GPU: more would only spin)"
    if chosen:
        limit, mask = quota(), affinity()
        why = (
            f"the CPU quota, {limit:g} CPU{'s' if limit != 1 else ''}"
            if limit is not None and limit < mask
            else f"the {mask} CPU{'s' if mask != 1 else ''} this process may run on"
        )
        return (
            f"{chosen} ({why} of the host's {host()}; ONNX Runtime's default would "
            "size its pool to the host's cores)"
        )
    return (
        f"ONNX Runtime's default (one per physical core: {physical()} of the host's {host()} CPUs)"
    )


def _groups() -> list[Path]:
    """The cgroup folders that limit this process: its own and every parent below the mount,
    of the unified hierarchy (v2) and of the ``cpu`` controller's (v1). A line of
    /proc/self/cgroup it cannot read, or a path that would leave the mount, counts for none."""
    try:
        lines = MEMBERSHIP.read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3 or ".." in Path(fields[2]).parts:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2: the unified hierarchy
            mount = CGROUP
        elif "cpu" in controllers.split(","):  # v1, mounted as cpu,cpuacct or cpu
            mounts = (CGROUP / controllers, CGROUP / "cpu", CGROUP / "cpu,cpuacct")
            found = next((m for m in mounts if m.is_dir()), None)
            if found is None:
                continue
            mount = found
        else:
            continue
        here = mount / path.lstrip("/")
        # inside a container the group's own path is often not mounted (v1): the mount's
        # root is the container's group, and the groups above are the host's
        while not here.is_dir() and here != mount:
            here = here.parent
        groups.extend([here, *[p for p in here.parents if p.is_relative_to(mount)]])
    return groups


def _v2(file: Path) -> float | None:
    try:
        limit, period = file.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if limit == "max" else _ratio(limit, period)


def _v1(group: Path) -> float | None:
    try:
        limit = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return None if limit.startswith("-") else _ratio(limit, period)


def _ratio(limit: str, period: str) -> float | None:
    try:
        value = int(limit) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


__all__ = ["affinity", "describe", "for_tools", "host", "physical", "quota", "threads"]


@dataclass(frozen=True)
class CpuTime:
    """The CPU time the CPUs this process may run on and the process itself had spent at one
    moment, so that a timing can tell what other processes took of those CPUs while it ran:
    its own work (the threads of the sessions it times) is no contention, and a load
    average, which counts it, cannot tell the two apart. Only the CPUs it may run on count:
    a process pinned to one CPU of two is slowed by work on that one, not on the other."""

    wall: float  # time.monotonic()
    busy: float | None  # busy seconds of its CPUs since boot (steal too); None: no /proc/stat
    own: float  # this process's user and system seconds, every thread's
    cpus: int  # how many CPUs ``busy`` counts

    @classmethod
    def now(cls) -> CpuTime:
        busy, counted = None, affinity()
        try:
            mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            per_cpu: dict[str, int] = {}  # "cpu" (every CPU) and "cpu0", "cpu1", ...
            for line in PROC_STAT.read_text().splitlines():
                name, *fields = line.split()
                if name == "cpu" or (name.startswith("cpu") and name[3:].isdigit()):
                    # user nice system idle iowait irq softirq steal, in clock ticks
                    v = [int(x) for x in fields[:8]]
                    per_cpu[name] = sum(v) - v[3] - v[4]  # all but idle and iowait
            ours = [f"cpu{n}" for n in sorted(mine or ()) if f"cpu{n}" in per_cpu]
            ticks: int | None = None
            if mine is not None and len(ours) == len(mine):
                ticks, counted = sum(per_cpu[c] for c in ours), len(ours)
            elif "cpu" in per_cpu:  # numbered otherwise (a container's view): every CPU
                ticks, counted = per_cpu["cpu"], sum(1 for c in per_cpu if c != "cpu")
            if ticks is not None:
                busy = ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            busy, counted = None, affinity()
        t = os.times()
        return cls(time.monotonic(), busy, t.user + t.system, max(counted, 1))

    def others_since(self, start: CpuTime) -> float | None:
        """The share (0..1) of this process's CPUs that other processes kept busy from
        ``start`` until this moment; None where the OS does not say (no /proc/stat), or
        the window is too short for its clock ticks to say (under ``MIN_TICKS`` of them
        across the CPUs: a tick either way is then a share of 5% or more)."""
        if self.busy is None or start.busy is None or self.wall <= start.wall:
            return None
        if (self.wall - start.wall) * self.cpus * os.sysconf("SC_CLK_TCK") < MIN_TICKS:
            return None
        others = (self.busy - start.busy) - (self.own - start.own)
        return min(max(others / ((self.wall - start.wall) * self.cpus), 0.0), 1.0)
