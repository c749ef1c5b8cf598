"""ModelInfer as a Triton client meets it: requests the server cannot honour as asked are
refused with INVALID_ARGUMENT and a message naming the tensor, never answered with
something else, and never reach ONNX Runtime to fail there."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from bundles import LABELS, VOCAB
from helpers import Reference, batch, inputs
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from quantgate.tables import index_limits

INVALID = "StatusCode.INVALID_ARGUMENT"


def _ids(value: int) -> dict[str, np.ndarray]:
    ids = np.array([[3, 7, value, 1]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# -1: ONNX Gather reads it from the end of the table; 2**32 + 3: a fused graph's int32 Cast
# wraps it to 3. Either way ONNX Runtime answers, wrongly, without an error.
@pytest.mark.parametrize("token", [-1, VOCAB, 2**32 + 3])
def test_a_token_id_outside_the_vocabulary_is_refused_with_the_range(client, token):
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(_ids(token)))
    assert err.value.status() == INVALID, err.value
    message = err.value.message()
    assert "'input_ids'" in message and f"0..{VOCAB - 1}" in message and str(token) in message
    assert "ONNXRuntimeError" not in message, message


@pytest.mark.parametrize("value", [2, -1])
def test_an_attention_mask_of_other_values_than_0_and_1_is_refused(client, value):
    feeds = _ids(5)
    feeds["attention_mask"][0, 1] = value
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(feeds))
    assert err.value.status() == INVALID, err.value
    assert "'attention_mask'" in err.value.message() and f"found {value}" in err.value.message()


def test_a_row_of_padding_alone_is_answered_as_load_generators_send_it(client, repo):
    """perf_analyzer's --input-data zero sends a mask of zeros: answered, with what the
    model itself gives for it (finite: no row of NaN from a softmax over nothing)."""
    feeds = _ids(5)
    feeds["attention_mask"][:] = 0  # perf_analyzer --input-data zero
    logits = client.infer("classifier", inputs(feeds)).as_numpy("logits")
    assert logits.shape == (1, len(LABELS)) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, Reference(repo / "classifier")(feeds), atol=1e-4)


def test_a_bad_token_id_in_a_stream_is_answered_there_and_the_stream_goes_on(server, repo):
    reference = Reference(repo / "classifier")
    good = batch(np.random.default_rng(7), 2, 5)
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("classifier", inputs(_ids(-3)), request_id="bad")
        c.async_stream_infer("classifier", inputs(good), request_id="good")
        (_, bad), (result, error) = answers.get(timeout=30), answers.get(timeout=30)
        c.stop_stream()
    assert bad is not None and "'input_ids'" in str(bad) and f"0..{VOCAB - 1}" in str(bad), bad
    assert error is None, error
    np.testing.assert_allclose(result.as_numpy("logits"), reference(good), atol=1e-4)


def _stream_requests(*tokens: int) -> list:
    requests = []
    for token in tokens:
        request = service_pb2.ModelInferRequest(model_name="classifier", id=f"t{token}")
        for name, array in _ids(token).items():
            request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        requests.append(request)
    return requests


def test_a_stream_opened_with_triton_grpc_error_ends_at_its_first_error(server):
    """Triton's header ``triton_grpc_error: true``: the first failed request ends the
    stream with its status code, after the answers before it."""
    answers = []
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stream = stub.ModelStreamInfer(
            iter(_stream_requests(5, -3, 7)), timeout=30, metadata=(("triton_grpc_error", "true"),)
        )
        with pytest.raises(grpc.RpcError) as err:
            answers.extend(stream)
    assert [a.infer_response.id for a in answers] == ["t5"], answers
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "'input_ids'" in err.value.details() and "INVALID_ARGUMENT:" not in err.value.details()


def test_every_stream_answer_is_marked_final_as_triton_marks_it(server):
    """Triton sets parameters["triton_final_response"] on each answer in a stream (true for
    a model that answers a request once), errors too; clients read until it, and without
    it wait forever."""
    requests = _stream_requests(5, -3)  # an answer, then an error
    for request in requests:
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [a.infer_response.id for a in answers] == ["t5", "t-3"], answers
    assert not answers[0].error_message and answers[0].infer_response.outputs
    assert "'input_ids'" in answers[1].error_message, answers[1]
    for a in answers:
        assert a.infer_response.parameters["triton_final_response"].bool_param, a


def _classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    """Triton's "value:index:label" strings, parsed."""
    parsed = [s.decode().split(":", 2) for s in strings.reshape(-1)]
    rows = [(float(v), int(i), rest[0] if rest else "") for v, i, *rest in parsed]
    return [rows[r * strings.shape[1] : (r + 1) * strings.shape[1]] for r in range(len(strings))]


def test_class_count_answers_each_rows_top_classes_with_their_names(client, repo):
    """Triton's classification extension, as tritonclient asks for it: the k largest logits
    of each row, largest first, named by the classes the bundle's manifest records."""
    feeds = batch(np.random.default_rng(11), 3, 6)
    logits = Reference(repo / "classifier")(feeds)
    result = client.infer(
        "classifier", inputs(feeds), outputs=[tc.InferRequestedOutput("logits", class_count=3)]
    )
    output = result.get_output("logits")
    assert output.datatype == "BYTES" and list(output.shape) == [3, 3], output
    for row, top in zip(logits, _classes(result.as_numpy("logits")), strict=True):
        assert [i for _, i, _ in top] == list(np.argsort(-row, kind="stable")[:3])
        assert [name for _, _, name in top] == [LABELS[i] for _, i, _ in top]
        np.testing.assert_allclose([v for v, _, _ in top], row[[i for _, i, _ in top]], atol=1e-4)


def test_class_count_beyond_the_classes_answers_every_class(client):
    result = client.infer(
        "classifier", inputs(_ids(5)), outputs=[tc.InferRequestedOutput("logits", class_count=50)]
    )
    (top,) = _classes(result.as_numpy("logits"))
    assert sorted(i for _, i, _ in top) == list(range(len(LABELS)))
    assert {name for _, _, name in top} == set(LABELS)  # "émeu" too: UTF-8 on the wire
    assert [v for v, _, _ in top] == sorted((v for v, _, _ in top), reverse=True)


def test_class_count_on_an_output_without_names_gives_value_and_index(client, repo):
    """The encoder's manifest names no classes: "value:index", each row flattened whole."""
    feeds = batch(np.random.default_rng(12), 2, 4)
    result = client.infer(
        "encoder",
        inputs(feeds),
        outputs=[tc.InferRequestedOutput("last_hidden_state", class_count=2)],
    )
    strings = result.as_numpy("last_hidden_state")
    assert strings.shape == (2, 2)
    assert all(s.decode().count(":") == 1 for s in strings.reshape(-1)), strings
    hidden = Reference(repo / "encoder" / "1")(feeds)
    for row, top in zip(hidden, _classes(strings), strict=True):
        assert [i for _, i, _ in top] == list(np.argsort(-row.reshape(-1), kind="stable")[:2])


def test_a_class_count_that_is_not_1_to_1000_is_refused(server):
    """Each class is a string made in Python: 2**62 had every value of an output formatted."""
    request = service_pb2.ModelInferRequest(model_name="classifier")
    for name, array in _ids(5).items():
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    output = request.outputs.add(name="logits")
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for value in ({"int64_param": -2}, {"string_param": "3"}, {"int64_param": 2**62}):
            output.parameters["classification"].CopyFrom(service_pb2.InferParameter(**value))
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert "'logits'" in err.value.details() and "from 1 to 1000" in err.value.details()


def test_an_output_asked_for_as_tensor_and_as_classes_is_refused(client):
    same = [tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("logits")]
    answer = client.infer("classifier", inputs(_ids(5)), outputs=same)  # one way, twice: fine
    assert answer.as_numpy("logits").shape == (1, len(LABELS))
    both = [tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("logits", class_count=2)]
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(_ids(5)), outputs=both)
    assert err.value.status() == INVALID, err.value
    assert "'logits'" in err.value.message() and "twice" in err.value.message()


def test_shared_memory_is_refused_by_name(client):
    feeds = _ids(5)
    ids = tc.InferInput("input_ids", [1, 4], "INT64")
    ids.set_shared_memory("region", 32)
    mask = inputs({"attention_mask": feeds["attention_mask"]})
    out = tc.InferRequestedOutput("logits")
    out.set_shared_memory("region", 20)
    for ins, outs, name in (
        ([ids, *mask], None, "'input_ids'"),  # no raw buffer for it
        (inputs(feeds), [out], "'logits'"),  # the output would never reach the region
    ):
        with pytest.raises(InferenceServerException) as err:
            client.infer("classifier", ins, outputs=outs)
        assert err.value.status() == INVALID, err.value
        assert name in err.value.message() and "shared memory" in err.value.message()


def test_mixing_raw_and_typed_contents_names_the_typed_input(server):
    request = service_pb2.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
    request.raw_input_contents.append(np.arange(1, 5, dtype=np.int64).tobytes())
    mask = request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4])
    mask.contents.int64_contents.extend([1, 1, 1, 1])
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'attention_mask'" in err.value.details() and "contents" in err.value.details()


def test_an_input_named_twice_is_refused_by_name(server):
    """Two tensors named input_ids: answering either would be a guess at what was meant."""
    request = service_pb2.ModelInferRequest(model_name="classifier")
    for name, values in (("input_ids", [3, 7, 5, 1]), ("attention_mask", [1, 1, 1, 1]),
                         ("input_ids", [9, 2, 4, 6])):  # fmt: skip
        request.inputs.add(name=name, datatype="INT64", shape=[1, 4])
        request.raw_input_contents.append(np.array(values, dtype=np.int64).tobytes())
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    details = err.value.details()
    assert "input 'input_ids' appears twice" in details and "send it once" in details, details


def test_statistics_count_each_success_and_failure(client):
    def counts() -> tuple[int, int]:
        s = client.get_inference_statistics("encoder").model_stats[0].inference_stats
        return s.success.count, s.fail.count

    before = counts()
    for rows in (1, 3):
        client.infer("encoder", inputs(batch(np.random.default_rng(rows), rows, 6)))
    with pytest.raises(InferenceServerException):
        client.infer("encoder", inputs(_ids(-1)))
    assert counts() == (before[0] + 2, before[1] + 1)
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics("nope")
    assert "NOT_FOUND" in err.value.status() and "'nope'" in err.value.message()


def test_index_limits_follow_casts_quantized_tables_and_fused_embeddings(tmp_path):
    """The tables behind each id input, in the graph forms exporters and ORT produce."""
    table = lambda name, rows: helper.make_tensor(  # noqa: E731
        name, TensorProto.FLOAT, [rows, 4], np.zeros(rows * 4).tolist()
    )
    q = helper.make_tensor("q", TensorProto.UINT8, [50, 4], bytes(200), raw=True)
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node(
            "EmbedLayerNormalization",
            ["ids32", "segments", "words", "positions", "types", "gamma", "beta"],
            ["fused"],
            domain="com.microsoft",
        ),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["q_table"]),
        helper.make_node("Gather", ["q_table", "other"], ["g1"]),
        helper.make_node("Gather", ["words", "rows_not_ids"], ["g2"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
            for n in ("ids", "segments", "other", "rows_not_ids")
        ],
        [helper.make_tensor_value_info("fused", TensorProto.FLOAT, None)],
        initializer=[
            table("words", 30),
            table("positions", 16),
            table("types", 2),
            q,
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert index_limits(tmp_path / "m.onnx") == {"ids": 30, "segments": 2, "other": 50}


def test_a_problem_of_a_shared_axis_is_said_once(client):
    """A zero-size batch is one mistake, not one per input."""
    empty = np.zeros((0, 4), np.int64)
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs({"input_ids": empty, "attention_mask": empty}))
    assert err.value.status() == INVALID, err.value
    assert err.value.message().count("is 0") == 1 and "'input_ids'" in err.value.message()


def test_typed_contents_in_the_field_of_another_datatype_are_named(server):
    request = service_pb2.ModelInferRequest(model_name="classifier")
    ids = request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
    ids.contents.fp32_contents.extend([1, 2, 3, 4])
    mask = request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4])
    mask.contents.int64_contents.extend([1, 1, 1, 1])
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "'input_ids'" in details and "fp32_contents" in details and "int64_contents" in details


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(sequence_id=7, sequence_start=True), "sequence batching is not supported"),
        (dict(priority=5), "request parameter 'priority' 5: this server has one priority level"),
        (dict(parameters={"tenant": "a"}), "request parameter 'tenant' is not one this server"),
        # beyond what a wait can be timed: it wedged the model once (an OverflowError)
        (dict(timeout=2**62), "must be a whole number of microseconds from 0 to 86400000000"),
    ],
)
def test_request_parameters_the_server_cannot_honour_are_refused(client, kw, words):
    """Silently ignored, a client would believe its sequence kept state or its priority
    counted."""
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(_ids(5)), **kw)
    assert err.value.status() == INVALID and words in err.value.message()


def test_a_generous_request_timeout_is_accepted_and_the_request_answered(client, repo):
    """Triton's timeout is in microseconds: 10 s does not expire at once (read as seconds
    it would be 115 days, refused; as nanoseconds, 10 ms). That a timeout which passes in the
    queue answers DEADLINE_EXCEEDED: test_lifecycle."""
    feeds = _ids(5)
    result = client.infer("classifier", inputs(feeds), timeout=10_000_000)  # 10 s in us
    np.testing.assert_allclose(
        result.as_numpy("logits"), Reference(repo / "classifier")(feeds), atol=1e-4
    )


def test_a_request_naming_more_inputs_than_the_model_has_is_refused_unread(server):
    """Thousands of empty input entries are a few kilobytes on the wire and seconds of
    Python to read: refused by their count first."""
    request = service_pb2.ModelInferRequest(model_name="classifier")
    for i in range(5000):
        request.inputs.add(name=f"x{i}", datatype="INT64", shape=[1, 1])
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request names 5000 inputs; model 'classifier' has 2:" in err.value.details()
