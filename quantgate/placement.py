"""Placement check: which nodes of a model did ONNX Runtime leave on the CPU?

When an execution provider (CUDA) has no kernel for a node, ORT runs that node on the CPU
provider and inserts copy nodes at every boundary: ``MemcpyToHost`` (device -> host) before
it and ``MemcpyFromHost`` (host -> device) after it. Each copy synchronises the stream, so a
graph that falls back is often far slower than its FP32 parent (docs/BENCHMARKS.md: dynamic
INT8 MiniLM on an H200 got 57 memcpy nodes and ran at 0.02x FP32). A variant that falls back must fail its
CUDA speed gate, and say why.

How it is detected, without an inference run or feeds, and without parsing ORT's verbose
"Node placements" log (a format written to the C++ stderr, which would need fd redirection
in a threaded server). ``record`` sets two things on the session options:

- ``optimized_model_filepath``: ORT writes the graph it will actually execute, after
  partitioning and after the memcpy transformer. Every ``MemcpyToHost`` /
  ``MemcpyFromHost`` node in it is a real device<->host copy on the hot path (exact).
- ``session.record_ep_graph_assignment_info``: ORT records the provider it assigned each
  node to, read back with ``InferenceSession.get_provider_graph_assignment_info`` (the
  Python binding of the C API's ``Session_GetEpGraphAssignmentInfo``; onnxruntime 1.32 has
  it). Every node not on the provider asked for is reported (exact and complete). This
  sees what copies cannot show: a graph placed entirely on the CPU (its inputs and outputs
  live on the host, so it needs no copy), and CPU nodes that exchange data with the device
  only through host memory: graph inputs and outputs, or a kernel argument read from the
  host (a CUDA Reshape reads its shape there).

Where an onnxruntime lacks that method, ``read`` falls back to the optimized graph alone:
the consumers of a ``MemcpyToHost`` output and the producers of a ``MemcpyFromHost`` input
are, by construction, nodes that run on the CPU, and those are reported (exact, but only
the nodes at a boundary: a chain of several CPU nodes between two copies is reported by its
ends). ``PlacementReport.method`` says which was used.

ORT also puts some nodes on the CPU on purpose (small shape computations that feed a
kernel's host-memory argument), which a complete assignment reports like any other. So a
variant is judged against its FP32 parent on the same provider (``placement_gate``'s
``baseline``), not against a perfect placement.

Where a run is possible anyway, ``from_profile`` reads ORT's profiler JSON, which names the
provider of every executed node: used by bench/gpu_check.py as a second opinion.

This module uses onnx and onnxruntime only, so quantize (gates) and serve (load-time
check) can both use it without importing each other.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from quantgate import workarounds
from quantgate.bundle import CPU, CUDA, GateResult
from quantgate.fsutil import work_dir

TO_HOST, FROM_HOST = "MemcpyToHost", "MemcpyFromHost"
MEMCPY = (TO_HOST, FROM_HOST)
# The session config entry that makes ORT record each node's provider (see ``record``).
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
SHOWN = 48  # fallen-back node names kept in a report; the op type counts are complete


@dataclass(frozen=True)
class PlacementReport:
    """Where a model's nodes run on ``provider``, as ORT partitioned it."""

    provider: str  # the provider asked for
    providers: tuple[str, ...]  # what the session actually has, in priority order
    nodes: int  # nodes in the executed graph, memcpy included
    memcpy: int  # MemcpyToHost + MemcpyFromHost nodes
    to_host: int
    from_host: int
    fallen_back: dict[str, int] = field(default_factory=dict)  # CPU op type -> node count
    fallen_back_nodes: tuple[str, ...] = ()  # their names (the first SHOWN)
    assigned: dict[str, int] = field(default_factory=dict)  # provider -> nodes; {}: unknown
    method: str = "optimized-graph"  # memcpy boundaries only; or "ep-assignment", "profile"

    @property
    def falls_back(self) -> bool:
        """Whether anything runs off ``provider``: copies, nodes, or the whole graph when
        the session does not have ``provider`` at all."""
        return self.provider not in self.providers or self.memcpy > 0 or bool(self.fallen_back)

    def reason(self) -> str:
        """One line for a gate's detail: what fell back and what it costs."""
        if self.provider not in self.providers:
            return f"{self.provider} is not available (session has {list(self.providers)})"
        if not self.falls_back:
            return f"all {self.nodes} nodes on {self.provider}, no memcpy"
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fallen_back.items()))
        return (
            f"{sum(self.fallen_back.values())} of {self.nodes} nodes fell back to the CPU "
            f"({ops or 'which: unknown'}); "
            f"{self.memcpy} memcpy nodes ({self.to_host} to host, {self.from_host} from host)"
        )

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "providers": list(self.providers),
            "nodes": self.nodes,
            "memcpy": self.memcpy,
            "to_host": self.to_host,
            "from_host": self.from_host,
            "fallen_back": dict(self.fallen_back),
            "fallen_back_nodes": list(self.fallen_back_nodes),
            "assigned": dict(self.assigned),
            "method": self.method,
        }


def analyze_graph(
    graph: onnx.GraphProto | onnx.ModelProto,
    provider: str = CUDA,
    providers: Sequence[str] = (CUDA, CPU),
    *,
    assignment: Sequence[tuple[str, str, str]] | None = None,
) -> PlacementReport:
    """Memcpy nodes in an ORT-optimized graph, and the nodes that run off ``provider``.

    ``assignment`` is ORT's record of every node's provider (``assignment()``); with it, the
    nodes off ``provider`` are all those assigned elsewhere. Without it, they are the CPU
    nodes at memcpy boundaries, which is all the graph alone shows.
    """
    if isinstance(graph, onnx.ModelProto):
        graph = graph.graph
    nodes = list(_all_nodes(graph))
    copies = Counter(n.op_type for n in nodes if n.op_type in MEMCPY)
    if assignment is None:
        off = [(n.name or n.op_type, n.op_type) for n in _at_memcpy_boundaries(nodes)]
    else:
        off = [(name or op, op) for ep, name, op in assignment if ep != provider]
    return PlacementReport(
        provider=provider,
        providers=tuple(providers),
        nodes=len(nodes),
        memcpy=copies.total(),
        to_host=copies[TO_HOST],
        from_host=copies[FROM_HOST],
        fallen_back=dict(Counter(op for _, op in off)),
        fallen_back_nodes=tuple(name for name, _ in off[:SHOWN]),
        assigned=dict(Counter(ep for ep, _, _ in assignment or ())),
        method="optimized-graph" if assignment is None else "ep-assignment",
    )


def _at_memcpy_boundaries(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes that consume a ``MemcpyToHost`` output or produce a ``MemcpyFromHost``
    input: by construction on the CPU. In graph order."""
    producer = {out: n for n in nodes for out in n.output if out}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    on_cpu: set[int] = set()  # id(node)
    for n in nodes:
        if n.op_type == TO_HOST:
            on_cpu.update(id(c) for c in consumers.get(n.output[0], ()) if c.op_type not in MEMCPY)
        elif n.op_type == FROM_HOST:
            p = producer.get(n.input[0])
            if p is not None and p.op_type not in MEMCPY:
                on_cpu.add(id(p))
    return [n for n in nodes if id(n) in on_cpu]


def _all_nodes(graph: onnx.GraphProto):
    """Every node, subgraphs (If/Loop bodies) included."""
    for n in graph.node:
        yield n
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def record(options, folder: str | os.PathLike) -> None:
    """Make a session created with ``options`` (an ``ort.SessionOptions``) keep what
    ``read`` needs: the graph it executes, written into ``folder`` (which must outlive the
    session's creation), and the provider of each node, where this onnxruntime records it
    (an unknown config entry is ignored by one that does not)."""
    options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
    options.add_session_config_entry(RECORD_ASSIGNMENT, "1")


def read(session, options, provider: str) -> PlacementReport:
    """Where ``session``, created with ``options`` prepared by ``record``, placed its nodes."""
    # External data (a >2 GB model) would land next to it; the graph is what we read.
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return analyze_graph(graph, provider, session.get_providers(), assignment=assignment(session))


def assignment(session) -> tuple[tuple[str, str, str], ...] | None:
    """(provider, node name, op type) of every node ORT assigned, in its subgraph order;
    None where this onnxruntime has no ``get_provider_graph_assignment_info``.

    The session must have been created with ``RECORD_ASSIGNMENT`` set (``record`` does it);
    ORT raises otherwise. The record is taken when ORT partitions the graph, so nodes it
    inserts later (memcpy, casts around float16 ops the CPU lacks) are not in it.
    """
    get = getattr(session, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    return tuple((sub.ep_name, n.name, n.op_type) for sub in get() for n in sub.get_nodes())


def check(
    model: str | os.PathLike | bytes,
    provider: str = CUDA,
    *,
    precision: str,
    options=None,
    provider_options: dict | None = None,
) -> PlacementReport:
    """Create an ORT session for ``provider`` and report what fell back to the CPU.

    ``model`` is a path or serialized bytes. ``options`` (an ``ort.SessionOptions``) is
    copied in spirit: its optimization level and thread count are kept; the optimized graph
    goes to a temp folder that is removed afterwards. Raises ``RuntimeError`` from ORT when
    the session cannot be created; returns a report naming the missing provider when ORT
    silently dropped it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if options is not None:
        so.graph_optimization_level = options.graph_optimization_level
        so.intra_op_num_threads = options.intra_op_num_threads
    so.log_severity_level = 3
    workarounds.apply(so, precision)
    providers: list = [provider] if provider == CPU else [provider, CPU]
    if provider_options:
        providers[0] = (provider, provider_options)
    with work_dir("quantgate-placement-") as tmp:
        record(so, tmp)
        data = model if isinstance(model, bytes) else os.fspath(model)
        sess = ort.InferenceSession(data, so, providers=providers)
        return read(sess, so, provider)


def from_profile(
    profile: str | os.PathLike | list, provider: str = CUDA, providers: Sequence[str] = ()
) -> PlacementReport:
    """Per-node providers from ORT's profiler output (``SessionOptions.enable_profiling``).

    Every executed node appears as a ``Node`` event whose args name its ``op_name`` and
    ``provider``; nodes not on ``provider`` (memcpy aside) are the fallen-back ones.
    """
    events = profile if isinstance(profile, list) else json.loads(Path(profile).read_text())
    placed: dict[str, tuple[str, str]] = {}  # node name -> (op type, provider)
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or "provider" not in args:
            continue
        name = e.get("name", "").rsplit("_kernel_time", 1)[0]
        placed[name] = (args.get("op_name", "?"), args["provider"])
    copies = Counter(op for op, _ in placed.values() if op in MEMCPY)
    off = [(n, op) for n, (op, ep) in placed.items() if ep != provider and op not in MEMCPY]
    return PlacementReport(
        provider=provider,
        providers=tuple(providers) or tuple(sorted({ep for _, ep in placed.values()})),
        nodes=len(placed),
        memcpy=sum(copies.values()),
        to_host=copies[TO_HOST],
        from_host=copies[FROM_HOST],
        fallen_back=dict(Counter(op for _, op in off)),
        fallen_back_nodes=tuple(n for n, _ in off[:SHOWN]),
        assigned=dict(Counter(ep for _, ep in placed.values())),
        method="profile",
    )


def placement_gate(
    report: PlacementReport, *, baseline: PlacementReport | None = None
) -> GateResult:
    """The gate a CUDA speed gate must also pass: nothing fell back to the CPU.

    With ``baseline`` (the FP32 variant's report on the same provider), the candidate may
    have as many memcpy nodes as FP32 has and CPU nodes of the op types FP32 has there (ORT
    places some shape plumbing on the CPU on purpose), but no more memcpy and no other op
    type. Without a baseline any memcpy or CPU node fails it.
    """
    allowed = baseline.memcpy if baseline is not None else 0
    allowed_ops = set(baseline.fallen_back) if baseline is not None else set()
    new_ops = sorted(set(report.fallen_back) - allowed_ops)
    passed = report.provider in report.providers and report.memcpy <= allowed and not new_ops
    detail = report.reason()
    if baseline is not None:
        detail += f"; FP32 has {allowed} memcpy"
        if new_ops:
            detail += f" and no {', '.join(new_ops)} on the CPU"
    return GateResult(
        name="placement",
        value=float(report.memcpy),
        threshold=float(allowed),
        op="<=",
        passed=passed,
        provider=report.provider,
        detail=detail,
    )


def fail_speed_gates(
    gates: Sequence[GateResult], report: PlacementReport, *, baseline: PlacementReport | None = None
) -> tuple[GateResult, ...]:
    """``gates`` plus the placement gate; every speed gate on the report's provider fails
    with the placement reason when the variant falls back (whatever it measured)."""
    gate = placement_gate(report, baseline=baseline)
    if gate.passed:
        return (*gates, gate)
    out = []
    for g in gates:
        if g.is_speed and (g.provider in (None, report.provider)):
            g = GateResult(
                **{
                    **g.__dict__,
                    "passed": False,
                    "detail": (g.detail + "; " if g.detail else "")
                    + f"falls back on {report.provider}: {report.reason()}",
                }
            )
        out.append(g)
    return (*out, gate)


__all__ = [
    "PlacementReport",
    "analyze_graph",
    "assignment",
    "check",
    "fail_speed_gates",
    "from_profile",
    "placement_gate",
    "read",
    "record",
]
