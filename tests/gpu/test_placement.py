"""The placement check: memcpy nodes and CPU fall-back, without a GPU.

What runs for real here: ``check`` creates real ORT sessions (CPU provider, and CUDA asked
of an onnxruntime without it), reads the optimized graph ORT wrote and ORT's record of each
node's provider; ``from_profile`` parses a real profiler file. What cannot run without a
GPU is ORT putting nodes on CUDA and inserting Memcpy nodes: ``analyze_graph`` is tested on
a graph built with onnx.helper in the shape ORT writes for a CUDA session whose dynamic-INT8
MatMul fell back (MemcpyToHost -> CPU nodes -> MemcpyFromHost), and on the real CPU record
and profile rewritten with nodes moved to CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from quantgate import placement as pl
from quantgate.bundle import GateResult

from .conftest import ids_feed


def fallen_back_graph():
    """x -> LayerNorm (GPU) -> MemcpyToHost -> DynamicQuantizeLinear, MatMulInteger (CPU)
    -> MemcpyFromHost -> Add (GPU) -> y, as ORT's CUDA session writes it."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln"),
        helper.make_node("MemcpyToHost", ["ln"], ["ln_cpu"], name="Memcpy_token_0"),
        helper.make_node("DynamicQuantizeLinear", ["ln_cpu"], ["q", "s", "z"], name="dql"),
        helper.make_node("MatMulInteger", ["q", "w", "z", "wz"], ["mm"], name="mmi"),
        helper.make_node("Cast", ["mm"], ["mmf"], to=f, name="cast"),
        helper.make_node("MemcpyFromHost", ["mmf"], ["mmf_gpu"], name="Memcpy_token_1"),
        helper.make_node("Add", ["mmf_gpu", "ln"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "fallen",
        [helper.make_tensor_value_info("x", f, ["batch", 4])],
        [helper.make_tensor_value_info("y", f, ["batch", 4])],
    )
    return helper.make_model(graph)


def test_memcpy_and_the_cpu_nodes_at_their_boundaries_are_reported():
    r = pl.analyze_graph(fallen_back_graph(), pl.CUDA, (pl.CUDA, pl.CPU))
    assert (r.memcpy, r.to_host, r.from_host, r.nodes) == (2, 1, 1, 7)
    # the consumer of MemcpyToHost and the producer of MemcpyFromHost; the MatMulInteger
    # between them is not at a boundary (documented: chains are reported by their ends)
    assert r.fallen_back == {"DynamicQuantizeLinear": 1, "Cast": 1}
    assert r.falls_back and "2 memcpy nodes" in r.reason() and "DynamicQuantizeLinear" in r.reason()


def test_a_variant_that_falls_back_fails_its_cuda_speed_gates():
    report = pl.analyze_graph(fallen_back_graph(), pl.CUDA, (pl.CUDA, pl.CPU))
    clean = pl.analyze_graph(onnx.GraphProto(), pl.CUDA, (pl.CUDA, pl.CPU))
    gates = (
        GateResult("cosine:y", 0.999, 0.99, ">=", True),
        GateResult("speedup_b128_s128", 1.5, 1.2, ">=", True, provider=pl.CUDA),
        GateResult("speedup_b1_s128", 1.6, 1.2, ">=", True, provider=pl.CPU),
    )
    out = {g.name: g for g in pl.fail_speed_gates(gates, report, baseline=clean)}
    assert out["cosine:y"].passed  # accuracy is not placement's business
    assert not out["speedup_b128_s128"].passed
    assert "falls back on CUDAExecutionProvider" in out["speedup_b128_s128"].detail
    assert out["speedup_b1_s128"].passed  # measured on the CPU provider: untouched
    assert not out["placement"].passed and out["placement"].value == 2
    assert (
        "FP32 has 0 memcpy and no Cast, DynamicQuantizeLinear on the CPU" in out["placement"].detail
    )
    # the same memcpy as the FP32 baseline is not a fall-back of the candidate
    same = pl.fail_speed_gates(gates, report, baseline=report)
    assert all(g.passed for g in same)


def without_assignment_record(monkeypatch):
    """This onnxruntime as one without ``get_provider_graph_assignment_info``."""
    for cls in ort.InferenceSession.__mro__:
        if "get_provider_graph_assignment_info" in vars(cls):
            monkeypatch.delattr(cls, "get_provider_graph_assignment_info")


def test_check_on_a_real_cpu_session_finds_nothing_fallen(tiny_bert_export):
    r = pl.check(tiny_bert_export.onnx, pl.CPU, precision="fp32")
    assert r.providers == (pl.CPU,) and r.nodes > 10 and r.method == "ep-assignment"
    assert r.assigned == {pl.CPU: r.nodes}  # ORT's record: every node of the FP32 graph
    assert not r.falls_back and pl.placement_gate(r).passed


def test_the_record_names_every_node_of_the_graph_ort_executes(tiny_bert_export, tmp_path):
    so = ort.SessionOptions()
    pl.record(so, tmp_path)
    sess = ort.InferenceSession(str(tiny_bert_export.onnx), so, providers=[pl.CPU])
    record = pl.assignment(sess)
    graph = onnx.load(so.optimized_model_filepath).graph
    assert sorted((n.name, n.op_type) for n in graph.node) == sorted((n, op) for _, n, op in record)
    assert {ep for ep, _, _ in record} == {pl.CPU}


def test_the_record_finds_cpu_nodes_that_no_memcpy_betrays(tiny_bert_export, tmp_path):
    """The record decides, not the copies: the real CPU record rewritten as a CUDA session
    that left only EmbedLayerNormalization on the CPU. The graph has no memcpy node, as a
    CUDA graph has none around CPU nodes that touch only host memory (graph inputs and
    outputs, shape arguments), so the memcpy analysis of it sees nothing."""
    so = ort.SessionOptions()
    pl.record(so, tmp_path)
    sess = ort.InferenceSession(str(tiny_bert_export.onnx), so, providers=[pl.CPU])
    graph = onnx.load(so.optimized_model_filepath)
    record = [
        (pl.CPU if op == "EmbedLayerNormalization" else pl.CUDA, name, op)
        for _, name, op in pl.assignment(sess)
    ]
    r = pl.analyze_graph(graph, pl.CUDA, (pl.CUDA, pl.CPU), assignment=record)
    assert r.memcpy == 0 and r.fallen_back == {"EmbedLayerNormalization": 1}
    assert r.assigned == {pl.CUDA: len(record) - 1, pl.CPU: 1}
    assert r.falls_back and "1 of" in r.reason() and not pl.placement_gate(r).passed
    assert not pl.analyze_graph(graph, pl.CUDA, (pl.CUDA, pl.CPU)).falls_back


def test_cuda_asked_of_an_onnxruntime_without_it_fails_the_gate(tiny_bert_export):
    if pl.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    r = pl.check(
        tiny_bert_export.onnx, pl.CUDA, precision="fp32"
    )  # ORT builds a CPU session, with a warning
    assert r.falls_back and r.memcpy == 0  # a graph all on the CPU needs no copy
    assert sum(r.fallen_back.values()) == r.assigned[pl.CPU] == r.nodes
    assert "EmbedLayerNormalization" in r.fallen_back and len(r.fallen_back_nodes) == r.nodes
    gate = pl.placement_gate(r)
    assert not gate.passed and "CUDAExecutionProvider is not available" in gate.detail


def test_without_the_record_the_memcpy_analysis_still_runs(tiny_bert_export, monkeypatch):
    """An onnxruntime that cannot record each node's provider (onnxruntime-gpu may lag)."""
    without_assignment_record(monkeypatch)
    r = pl.check(tiny_bert_export.onnx, pl.CPU, precision="fp32")
    assert r.method == "optimized-graph" and r.assigned == {} and r.nodes > 10
    assert not r.falls_back and pl.placement_gate(r).passed
    if pl.CUDA not in ort.get_available_providers():
        # the whole graph on the CPU: no memcpy, no boundary node, but no CUDA either
        r = pl.check(tiny_bert_export.onnx, pl.CUDA, precision="fp32")
        assert r.falls_back and r.fallen_back == {} and not pl.placement_gate(r).passed


def test_profile_names_the_provider_of_every_node(tiny_bert_export, tmp_path):
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(str(tiny_bert_export.onnx), so, providers=[pl.CPU])
    sess.run(None, ids_feed([i.name for i in sess.get_inputs()]))
    events = json.loads(Path(sess.end_profiling()).read_text())
    on_cpu = pl.from_profile(events, pl.CPU)
    assert on_cpu.nodes > 10 and not on_cpu.falls_back and on_cpu.method == "profile"
    # the same run as a CUDA run would record it, with the Attention nodes left on the CPU
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and args["op_name"] != "Attention":
            args["provider"] = pl.CUDA
    r = pl.from_profile(events, pl.CUDA, (pl.CUDA, pl.CPU))
    assert r.fallen_back == {"Attention": 2}
    assert not pl.placement_gate(r).passed
