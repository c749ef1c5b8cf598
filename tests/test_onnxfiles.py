"""Models past protobuf's 2 GB: written with their weights beside them, found again, and
opened from memory without losing them. Small models stand in, the limit lowered."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantgate import onnxfiles
from quantgate.sessions import session


def _matmul(weights: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights.shape[1]])],
        [numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_past_the_limit_is_saved_beside_its_weights_and_found_again(tmp_path, monkeypatch):
    weights = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    inline = onnxfiles.save(_matmul(weights), tmp_path / "inline.onnx")
    assert onnxfiles.external_locations(inline) == []
    monkeypatch.setattr(onnxfiles, "INLINE_LIMIT", 1000)
    beside = onnxfiles.save(_matmul(weights), tmp_path / "big.onnx")
    assert onnxfiles.external_locations(beside) == ["big.onnx.data"]
    x = np.ones((1, 64), np.float32)
    y = ort.InferenceSession(str(beside)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weights)


def test_weights_in_a_file_a_tensor_are_gathered_into_one(tmp_path, monkeypatch):
    """torch's exporter writes a model past 2 GB with a file per weight, named after the
    tensor (16 files beside the FP32 variant of a 2.27 GB BERT); the bundle gets one."""
    monkeypatch.setattr(onnxfiles, "INLINE_LIMIT", 1000)
    w1, w2 = np.full((64, 32), 0.5, np.float32), np.full((32, 8), 2.0, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
        save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
    )  # fmt: skip
    assert onnxfiles.external_locations(path) == ["W1", "W2"]
    onnxfiles.gather(path)
    assert onnxfiles.external_locations(path) == ["model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.ones((1, 64), np.float32)
    y = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w1 @ w2)
    onnxfiles.gather(path)  # one file already: left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_session_on_a_model_in_memory_past_the_limit_leaves_it_whole(monkeypatch):
    """The weights went into a temporary file for ONNX Runtime, and the caller's model kept
    pointing at that file once it was deleted: a second session on it failed."""
    monkeypatch.setattr(onnxfiles, "INLINE_LIMIT", 1000)
    weights = np.full((64, 32), 0.5, np.float32)
    model = _matmul(weights)
    x = np.ones((1, 64), np.float32)
    for _ in range(2):
        np.testing.assert_allclose(session(model).run(None, {"x": x})[0], x @ weights)
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (64, 32)


def test_weights_a_local_function_keeps_beside_it_are_found(tmp_path):
    """ONNX Runtime's quantizers save with convert_attribute=True, which moves a Constant's
    tensor inside a model-local function out too: the bundle left its file behind, and the
    variant could not be opened."""
    k = helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.ones((64, 8), np.float32))
    )
    add = helper.make_node("Add", ["a", "k"], ["b"])
    function = helper.make_function(
        "local", "AddK", ["a"], ["b"], [k, add], [helper.make_opsetid("", 17)]
    )
    graph = helper.make_graph(
        [helper.make_node("AddK", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 8])],
    )
    model = helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0, convert_attribute=True)  # fmt: skip
    assert onnxfiles.external_locations(tmp_path / "m.onnx") == ["m.onnx.data"]


@pytest.mark.parametrize(
    ("tensor", "nbytes"),
    [
        (helper.make_tensor("s", TensorProto.STRING, [2], [b"abc", b"de"]), 5),
        (numpy_helper.from_array(np.zeros((3, 4), np.float16)), 24),
        (TensorProto(name="u", data_type=TensorProto.UNDEFINED, raw_data=b"xyz"), 3),
    ],
)
def test_a_tensors_size_is_what_it_holds(tensor, nbytes):
    """Strings by their lengths (not numpy's 8-byte objects); a type numpy cannot size (it
    raised KeyError from every size check) by its bytes."""
    assert onnxfiles._nbytes(tensor) == nbytes


def test_a_session_onnx_runtime_opened_on_another_provider_than_asked_is_refused(monkeypatch):
    """A CUDA provider whose libraries do not load gives a CPU session without an error: its
    timings would be the CPU's, labelled CUDA's. Here ONNX Runtime's answer is stood in for
    (no GPU provider can fail to load on this host): a session that says it runs on the CPU
    when the Azure provider, which this onnxruntime has, was asked for."""
    from quantgate.errors import ConfigError

    class OnTheCpu(ort.InferenceSession):
        def get_providers(self):
            return ["CPUExecutionProvider"]

    model = _matmul(np.ones((4, 2), np.float32))
    assert session(model, "AzureExecutionProvider").get_providers()[0] == "AzureExecutionProvider"
    monkeypatch.setattr(ort, "InferenceSession", OnTheCpu)
    with pytest.raises(ConfigError, match=r"opened the session on CPUExecutionProvider, not on Az"):
        session(model, "AzureExecutionProvider")
    assert session(model).get_providers() == ["CPUExecutionProvider"]  # what it asked for
