"""Placement check: which nodes of a model did ONNX Runtime leave on the CPU?

When an execution provider (CUDA) has no kernel for a node, ORT runs that node on the CPU
provider and inserts copy nodes at every boundary: ``MemcpyToHost`` (device -> host) before
it and ``MemcpyFromHost`` (host -> device) after it. Each copy synchronises the stream, so a
graph that falls back is often far slower than its FP32 parent (docs/BENCHMARKS.md: dynamic
INT8 MiniLM on an H200 got 57 memcpy nodes and ran at 0.02x FP32). A variant that falls back must fail its
CUDA speed gate, and say why.

How it is detected. ORT can write the graph it will actually execute — after partitioning
and after the memcpy transformer — to ``SessionOptions.optimized_model_filepath``. We create
the session with that set and read the file back with onnx:

- every ``MemcpyToHost`` / ``MemcpyFromHost`` node in it is a real device<->host copy on
  the hot path (exact);
- the consumers of a ``MemcpyToHost`` output and the producers of a ``MemcpyFromHost``
  input are, by construction, nodes that run on the CPU: those are the fallen-back nodes
  reported (exact, but only the nodes at a boundary: a chain of several CPU nodes between
  two copies is reported by its ends).

This needs no inference run and no feeds, and does not depend on log formats. It is why it
was chosen over parsing ORT's verbose "Node placements" log (a format, written to the C++
stderr, that would need fd redirection in a threaded server). Where a run is possible anyway,
``from_profile`` reads ORT's profiler JSON, which names the provider of every executed node:
the complete list, used by bench/gpu_check.py as a second opinion.

This module uses onnx and onnxruntime only, so quantize (gates) and serve (load-time
warning) can both use it without importing each other.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from quantgate.bundle import GateResult

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
TO_HOST, FROM_HOST = "MemcpyToHost", "MemcpyFromHost"
MEMCPY = (TO_HOST, FROM_HOST)


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
    fallen_back_nodes: tuple[str, ...] = ()  # their names (the first few dozen)
    method: str = "optimized-graph"  # or "profile"

    @property
    def falls_back(self) -> bool:
        return self.memcpy > 0 or bool(self.fallen_back)

    def reason(self) -> str:
        """One line for a gate's detail: what fell back and what it costs."""
        if self.provider not in self.providers:
            return f"{self.provider} is not available (session has {list(self.providers)})"
        if not self.falls_back:
            return f"all {self.nodes} nodes on {self.provider}, no memcpy"
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fallen_back.items()))
        return (
            f"{sum(self.fallen_back.values())} nodes fell back to the CPU ({ops or 'unknown'}); "
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
            "method": self.method,
        }


def analyze_graph(
    graph: onnx.GraphProto | onnx.ModelProto,
    provider: str = CUDA,
    providers: Sequence[str] = (CUDA, CPU),
) -> PlacementReport:
    """Memcpy nodes and the CPU nodes at their boundaries in an ORT-optimized graph."""
    if isinstance(graph, onnx.ModelProto):
        graph = graph.graph
    nodes = list(_all_nodes(graph))
    producer = {out: n for n in nodes for out in n.output if out}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    to_host = [n for n in nodes if n.op_type == TO_HOST]
    from_host = [n for n in nodes if n.op_type == FROM_HOST]
    on_cpu: dict[int, onnx.NodeProto] = {}  # id(node) -> node, in graph order below
    for n in to_host:
        for c in consumers.get(n.output[0], ()):
            if c.op_type not in MEMCPY:
                on_cpu[id(c)] = c
    for n in from_host:
        p = producer.get(n.input[0])
        if p is not None and p.op_type not in MEMCPY:
            on_cpu[id(p)] = p
    cpu_nodes = [n for n in nodes if id(n) in on_cpu]
    return PlacementReport(
        provider=provider,
        providers=tuple(providers),
        nodes=len(nodes),
        memcpy=len(to_host) + len(from_host),
        to_host=len(to_host),
        from_host=len(from_host),
        fallen_back=dict(Counter(n.op_type for n in cpu_nodes)),
        fallen_back_nodes=tuple(n.name or n.op_type for n in cpu_nodes[:48]),
    )


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


def check(
    model: str | os.PathLike | bytes,
    provider: str = CUDA,
    *,
    options=None,
    provider_options: dict | None = None,
) -> PlacementReport:
    """Create an ORT session for ``provider`` and report what fell back to the CPU.

    ``model`` is a path or serialized bytes. ``options`` (an ``ort.SessionOptions``) is
    copied in spirit: its optimization level is kept, the optimized graph goes to a temp
    file that is removed afterwards. Raises ``RuntimeError`` from ORT when the session cannot
    be created; returns a report naming the missing provider when ORT silently dropped it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if options is not None:
        so.graph_optimization_level = options.graph_optimization_level
        so.intra_op_num_threads = options.intra_op_num_threads
    so.log_severity_level = 3
    providers: list = [provider] if provider == CPU else [provider, CPU]
    if provider_options:
        providers[0] = (provider, provider_options)
    with tempfile.TemporaryDirectory(prefix="quantgate-placement-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        data = model if isinstance(model, bytes) else os.fspath(model)
        sess = ort.InferenceSession(data, so, providers=providers)
        have = tuple(sess.get_providers())
        # External data (a >2 GB model) would land next to it; the graph is what we read.
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return analyze_graph(graph, provider, have)


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
        fallen_back_nodes=tuple(n for n, _ in off[:48]),
        method="profile",
    )


def placement_gate(
    report: PlacementReport, *, baseline: PlacementReport | None = None
) -> GateResult:
    """The gate a CUDA speed gate must also pass: nothing fell back to the CPU.

    With ``baseline`` (the FP32 variant's report on the same provider), the candidate may
    have as many memcpy nodes as FP32 has (ORT places some shape plumbing on the CPU on
    purpose) but no more, and no fallen-back op type FP32 does not have. Without a baseline
    any memcpy fails it.
    """
    allowed = baseline.memcpy if baseline is not None else 0
    allowed_ops = set(baseline.fallen_back) if baseline is not None else set()
    new_ops = set(report.fallen_back) - allowed_ops
    passed = report.provider in report.providers and report.memcpy <= allowed and not new_ops
    return GateResult(
        name="placement",
        value=float(report.memcpy),
        threshold=float(allowed),
        op="<=",
        passed=passed,
        provider=report.provider,
        detail=report.reason() + (f"; FP32 has {allowed}" if baseline is not None else ""),
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
        if g.name.startswith("speedup") and (g.provider in (None, report.provider)):
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
    "check",
    "fail_speed_gates",
    "from_profile",
    "placement_gate",
]
