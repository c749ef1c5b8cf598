"""The server as users meet it: a real subprocess driven by tritonclient."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import urllib.request

import bundles
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Reference, batch, inputs, until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

# Batching pads and regroups: results may differ from a lone session.run by float noise.
ATOL = 1e-4

MODELS = {"classifier": ("classifier", "logits"), "encoder": ("encoder/1", "last_hidden_state")}


@pytest.mark.parametrize("model", MODELS)
def test_unary_equals_in_process(client, repo, model):
    folder, output = MODELS[model]
    reference = Reference(repo / folder)
    rng = np.random.default_rng(0)
    for rows, length in [(1, 5), (3, 17), (2, 128), (1, 1)]:
        feeds = batch(rng, rows, length)
        got = client.infer(model, inputs(feeds)).as_numpy(output)
        np.testing.assert_allclose(got, reference(feeds), atol=ATOL)


@pytest.mark.parametrize("model", MODELS)
def test_streaming_equals_in_process(server, repo, model):
    folder, output = MODELS[model]
    reference = Reference(repo / folder)
    rng = np.random.default_rng(1)
    sent = {str(i): batch(rng, 1 + i % 3, 3 + 7 * i) for i in range(12)}
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for rid, feeds in sent.items():
            c.async_stream_infer(model, inputs(feeds), request_id=rid)
        got = [answers.get(timeout=30) for _ in sent]
        c.stop_stream()
    for result, error in got:
        assert error is None, error
        rid = result.get_response().id
        np.testing.assert_allclose(result.as_numpy(output), reference(sent[rid]), atol=ATOL)


def test_health_serving_and_metadata(server, client):
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        # List, which reflection names too: every service, as Check answers each
        listed = stub.List(health_pb2.HealthListRequest()).statuses
        assert {name: s.status for name, s in listed.items()} == dict.fromkeys(
            ("", "inference.GRPCInferenceService"), health_pb2.HealthCheckResponse.SERVING
        )
    # before any status is set, List says what Check says: the server SERVING (as gRPC's
    # servicer starts); in a process of its own, as it loads the protocol's stubs
    fresh = (
        "from quantgate.serve.server import Health\n"
        "print({k: v.status for k, v in Health().List(None, None).statuses.items()})"
    )
    said = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, timeout=60)
    assert said.stdout.strip() == "{'': 1}", (said.stdout, said.stderr)  # 1: SERVING
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("classifier") and not client.is_model_ready("nope")
    assert "statistics" in client.get_server_metadata().extensions
    meta = client.get_model_metadata("encoder")
    assert meta.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    config = client.get_model_config("classifier").config
    assert config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert config.parameters["task"].string_value == "sequence-classification"
    assert config.parameters["precision"].string_value == "fp32"
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert "max_sequence_length" not in config.parameters  # the tiny bundles record none
    client.infer("classifier", inputs(batch(np.random.default_rng(4), 1, 6)))
    stats = client.get_inference_statistics("classifier").model_stats[0]
    assert stats.inference_count >= 1 and stats.inference_stats.success.count >= 1


def _raw_infer(stub, model: str, tensors, version: str = ""):
    """ModelInfer with hand-made tensors (name, datatype, shape, raw bytes)."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return stub.ModelInfer(request, timeout=30)


def _bad(rng) -> list[tuple[str, str, str, list, grpc.StatusCode, tuple[str, ...]]]:
    """(case, model, version, tensors, code, words its message must contain)."""
    ids = batch(rng, 1, 8)["input_ids"]

    def t(name, array, datatype="INT64", shape=None):
        return (name, datatype, list(array.shape if shape is None else shape), array.tobytes())

    good = [t("input_ids", ids), t("attention_mask", np.ones_like(ids))]
    big = batch(rng, 33, 4)
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        ("missing input", "classifier", "", good[:1], invalid, ("'attention_mask'", "missing")),
        (
            "extra input",
            "classifier",
            "",
            [*good, t("token_type_ids", ids)],
            invalid,
            ("'token_type_ids'", "unexpected"),
        ),
        (
            "wrong dtype",
            "classifier",
            "",
            [t("input_ids", ids.astype(np.float32), "FP32"), good[1]],
            invalid,
            ("'input_ids'", "FP32", "expected INT64"),
        ),
        (
            "wrong rank",
            "classifier",
            "",
            [t("input_ids", ids.reshape(-1)), good[1]],
            invalid,
            ("'input_ids'", "expected 2 dimensions"),
        ),
        (
            "mismatched lengths",
            "classifier",
            "",
            [good[0], t("attention_mask", ids[:, :4])],
            invalid,
            ("'attention_mask'", "must match"),
        ),
        (
            "byte size",
            "classifier",
            "",
            [t("input_ids", ids[:, :4], shape=[1, 8]), good[1]],
            invalid,
            ("'input_ids'", "32 bytes", "expected 64"),
        ),
        (
            "empty sequence",
            "classifier",
            "",
            [t("input_ids", ids[:, :0]), t("attention_mask", ids[:, :0])],
            invalid,
            ("'input_ids'", "is 0"),
        ),
        (
            "batch too large",
            "classifier",
            "",
            [t(n, a) for n, a in big.items()],
            invalid,
            ("batch size 33", "max batch size 32"),
        ),
        (
            "unknown datatype",
            "classifier",
            "",
            [t("input_ids", ids, "INT128"), good[1]],
            invalid,
            ("'input_ids'", "INT128"),
        ),
        (
            "token id out of range",
            "classifier",
            "",
            [t("input_ids", ids * 1000), good[1]],
            invalid,
            ("classifier",),
        ),
        ("unknown model", "nope", "", good, not_found, ("'nope'", "classifier")),
        ("unknown version", "encoder", "7", good, not_found, ("version '7'", "['1']")),
    ]


def test_bad_input_matrix_while_good_clients_run(server, repo):
    """Every bad request gets its code and a message naming the input; good ones stay right."""
    reference = Reference(repo / "classifier")
    stop, failures, served = threading.Event(), [], [0]

    def good_client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with tc.InferenceServerClient(server.url) as c:
            while not stop.is_set():
                feeds = batch(rng, 1 + seed % 2, int(rng.integers(1, 40)))
                try:
                    got = c.infer("classifier", inputs(feeds)).as_numpy("logits")
                    np.testing.assert_allclose(got, reference(feeds), atol=ATOL)
                    served[0] += 1
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    failures.append(repr(e))

    threads = [threading.Thread(target=good_client, args=(s,)) for s in range(3)]
    for th in threads:
        th.start()
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for case, model, version, tensors, code, words in _bad(np.random.default_rng(2)) * 3:
                with pytest.raises(grpc.RpcError) as err:
                    _raw_infer(stub, model, tensors, version)
                assert err.value.code() == code, (case, err.value.details())
                for w in words:
                    assert w in err.value.details(), (case, err.value.details())
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not failures, failures[:3]
    assert served[0] > 0


def test_a_bad_request_in_a_stream_is_answered_there_and_the_stream_goes_on(server, repo):
    reference = Reference(repo / "classifier")
    rng = np.random.default_rng(5)
    good = [batch(rng, 1, 7), batch(rng, 2, 12)]
    wrong_dtype = tc.InferInput("input_ids", [1, 3], "FP32")
    wrong_dtype.set_data_from_numpy(np.ones((1, 3), np.float32))
    mask = tc.InferInput("attention_mask", [1, 3], "INT64")
    mask.set_data_from_numpy(np.ones((1, 3), np.int64))
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("classifier", inputs(good[0]), request_id="a")
        c.async_stream_infer("classifier", [wrong_dtype, mask], request_id="bad")
        c.async_stream_infer("classifier", inputs(good[1]), request_id="b")
        got = [answers.get(timeout=30) for _ in range(3)]
        c.stop_stream()
    (first, e1), (_, bad), (last, e3) = got  # answers keep request order
    assert e1 is None and e3 is None, (e1, e3)
    np.testing.assert_allclose(first.as_numpy("logits"), reference(good[0]), atol=ATOL)
    np.testing.assert_allclose(last.as_numpy("logits"), reference(good[1]), atol=ATOL)
    assert "INVALID_ARGUMENT" in str(bad) and "'input_ids'" in str(bad), bad


def test_an_unreadable_stream_message_ends_the_stream_at_once(server):
    """Bytes that are no ModelInferRequest: the good request before them is answered, then
    the call fails with an error; it does not hang until the client's deadline."""
    ids = np.ones((1, 4), np.int64)
    request = service_pb2.ModelInferRequest(model_name="classifier")
    for name in ("input_ids", "attention_mask"):
        request.inputs.add(name=name, datatype="INT64", shape=[1, 4])
        request.raw_input_contents.append(ids.tobytes())
    with grpc.insecure_channel(server.url) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=bytes,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        answers = stream(iter([request.SerializeToString(), b"\xff\xff\xff"]), timeout=20)
        first = next(answers)
        assert not first.error_message and first.infer_response.model_name == "classifier"
        with pytest.raises(grpc.RpcError) as err:
            next(answers)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "stream message 2 is no ModelInferRequest" in err.value.details()
    with tc.InferenceServerClient(server.url) as c:
        assert c.is_server_live()


def test_an_unreadable_request_is_the_clients_error_not_the_servers(server):
    """Bytes that are no ModelInferRequest on a unary call: gRPC's own reader answered
    INTERNAL (the server's failure, by the docs) and logged a traceback at ERROR for each;
    it is INVALID_ARGUMENT, as on a stream, and the log stays quiet."""
    with grpc.insecure_channel(server.url) as channel:
        for path, kind, message in (
            ("/inference.GRPCInferenceService/ModelInfer", "unary_unary", "ModelInferRequest"),
            (
                "/inference.GRPCInferenceService/ModelMetadata",
                "unary_unary",
                "ModelMetadataRequest",
            ),
            # the health service needs no token: anyone could fill the log with tracebacks
            ("/grpc.health.v1.Health/Check", "unary_unary", "HealthCheckRequest"),
            ("/grpc.health.v1.Health/Watch", "unary_stream", "HealthCheckRequest"),
        ):
            call = getattr(channel, kind)(
                path, request_serializer=bytes, response_deserializer=bytes
            )
            with pytest.raises(grpc.RpcError) as err:
                answer = call(b"\xff\xff\xff", timeout=20)
                next(iter(answer)) if kind == "unary_stream" else None
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert f"the request is no {message}: Error parsing message" in err.value.details()
    with tc.InferenceServerClient(server.url) as c:
        assert c.is_server_live()
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


def test_oversized_message_is_refused(server, client):
    # 4 MiB default limit: a 300k-token request (4.8 MB) is refused by gRPC itself.
    ids = np.zeros((1, 300_000), dtype=np.int64)
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs({"input_ids": ids, "attention_mask": ids}))
    assert "RESOURCE_EXHAUSTED" in err.value.status()
    assert client.is_server_live()


def test_a_client_string_too_long_for_a_status_gets_its_own_code(server, client):
    """A 20 kB model name, or input name, echoed whole into the error message, made the status
    larger than a client's metadata limit: it got RESOURCE_EXHAUSTED (which reads as
    retryable) in place of NOT_FOUND or INVALID_ARGUMENT."""
    feeds = batch(np.random.default_rng(0), 1, 9)
    with pytest.raises(InferenceServerException) as err:
        client.infer("m" * 20_000, inputs(feeds))
    assert err.value.status() == "StatusCode.NOT_FOUND", err.value
    assert "...(+19936 chars); this server serves ['classifier'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(feeds), model_version="9" * 20_000)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value  # beyond any int64
    # a number, too long for one: said so (a fuzz review found "is no version number")
    assert "...(+" in err.value.message() and "is out of range" in err.value.message()
    odd = {**feeds, "é" * 20_000: feeds["input_ids"]}  # 9 bytes a character, percent-encoded
    with pytest.raises(InferenceServerException) as err:
        client.infer("classifier", inputs(odd))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert re.search(r"\.\.\.\(\+\d+ chars\)$", err.value.message()), err.value.message()[-200:]


def test_metrics_endpoint(tmp_path, repo):
    from conftest import ServerProcess

    # A request's timeout of 1 us passes before the batcher looks at it: expired, queued.
    srv = ServerProcess(
        repo / "classifier", "--metrics-port", "0", "--max-queue-delay-us", "300000"
    )
    try:
        # the free port it chose, as it says it
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", "".join(srv.stdout))[1])
        with tc.InferenceServerClient(srv.url) as c:
            c.infer("tiny-classifier", inputs(batch(np.random.default_rng(3), 2, 9)))
            with pytest.raises(InferenceServerException):
                c.infer("tiny-classifier", inputs(batch(np.random.default_rng(3), 40, 9)))
            with pytest.raises(InferenceServerException) as late:
                c.infer(
                    "tiny-classifier",
                    inputs(batch(np.random.default_rng(3), 1, 9)),
                    # the request's own timeout (us), not a client deadline: a call whose
                    # deadline passes before a thread takes it up is never counted
                    timeout=1,
                )
            assert "Request timeout expired" in str(late.value), late.value  # as Triton
            for name in ("nope", "x" * 200):  # clients cannot grow the label set
                with pytest.raises(InferenceServerException):
                    c.infer(name, inputs(batch(np.random.default_rng(3), 1, 9)))
            for version in ("3", "3" * 18, "x" * 200):  # a served model's, at no version
                with pytest.raises(InferenceServerException) as err:
                    c.infer("tiny-classifier", inputs(batch(np.random.default_rng(3), 1, 9)),
                            model_version=version)  # fmt: skip
                number = version != "x" * 200  # else no version number: INVALID_ARGUMENT
                assert ("NOT_FOUND" if number else "INVALID_ARGUMENT") in err.value.status()
        labels = 'model="tiny-classifier",version="1"'
        expired = f'quantgate_requests_total{{code="UNAVAILABLE",{labels}}} 1.0'
        text = ""

        def scraped() -> str:
            nonlocal text
            url = f"http://127.0.0.1:{port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            return expired in text

        # The client gives up at its deadline; the server counts the expired request when
        # its own clock says so, a moment later on a busy machine.
        until(scraped)
        assert f'quantgate_requests_total{{code="OK",{labels}}} 1.0' in text
        refused = 'quantgate_refused_requests_total{model="tiny-classifier",reason="timeout",'
        assert f'{refused}version="1"}} 1.0' in text, text  # a busy model, by its reason
        assert 'code="INVALID_ARGUMENT"' in text
        assert 'quantgate_requests_total{code="NOT_FOUND",model="",version=""} 2.0' in text, text
        pinned = 'quantgate_requests_total{code="NOT_FOUND",model="tiny-classifier",version=""}'
        assert f"{pinned} 2.0" in text, text
        assert "nope" not in text and "x" * 200 not in text
        # no latency series for a model not served (a dashboard by model would show "")
        assert 'seconds_count{model="",version=""}' not in text, text
        assert f"quantgate_queue_depth{{{labels}}} 0.0" in text  # the expired one left
        assert "quantgate_batch_size_bucket" in text and "quantgate_request_seconds_bucket" in text

        def value(series: str) -> float:
            found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
            assert found, (series, text)
            return float(found[1])

        # the histograms an operator's latency panels read: the one request answered is in
        # each, and its batch took time (a histogram never observed, or observed 0, is seen)
        for histogram in ("request", "queue", "compute"):
            assert value(f"quantgate_{histogram}_seconds_count{{{labels}}}") == 1.0, histogram
        assert value(f"quantgate_compute_seconds_sum{{{labels}}}") > 0
        assert value(f"quantgate_request_seconds_sum{{{labels}}}") >= value(
            f"quantgate_queue_seconds_sum{{{labels}}}"
        )
        assert 'precision="fp32",provider="CPUExecutionProvider"' in text
        # A second server cannot have the same metrics port: a clear error, no traceback.
        taken = subprocess.run(
            [
                sys.executable,
                "-m",
                "quantgate",
                "serve",
                str(repo / "classifier"),
                "--port",
                "0",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert taken.returncode != 0
        assert "--metrics-port" in taken.stderr and "Traceback" not in taken.stderr, taken.stderr
    finally:
        assert srv.terminate() == 0


def test_reflection_lists_the_services_grpcurl_needs(server):
    """README: grpcurl works without the .proto files, through server reflection."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        file = db.FindFileContainingSymbol("inference.GRPCInferenceService")
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, services
    methods = {m.name for svc in file.service for m in svc.method}
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata"} <= methods, methods


def test_without_dynamic_batching_each_request_runs_alone(repo):
    """--no-dynamic-batching: concurrent requests are answered right, each in a batch of
    its own (the batch-size histogram counts only batches of its own rows)."""
    from conftest import ServerProcess

    srv = ServerProcess(repo / "classifier", "--no-dynamic-batching", "--metrics-port", "0")
    try:
        reference = Reference(repo / "classifier")
        rng = np.random.default_rng(5)
        requests = [batch(rng, 1, 6 + i % 5) for i in range(24)]
        answers: list[queue.Queue] = [queue.Queue() for _ in requests]
        with tc.InferenceServerClient(srv.url) as c:
            for q, feeds in zip(answers, requests, strict=True):
                c.async_infer("tiny-classifier", inputs(feeds),
                              callback=lambda result, error, q=q: q.put((result, error)))  # fmt: skip
            for q, feeds in zip(answers, requests, strict=True):
                result, error = q.get(timeout=60)
                assert error is None, error
                np.testing.assert_allclose(result.as_numpy("logits"), reference(feeds), atol=1e-4)
        url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        count = re.search(r"^quantgate_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
        ones = re.search(r'^quantgate_batch_size_bucket\{[^}]*le="1.0"[^}]*\} (\S+)$', text, re.M)
        assert float(count.group(1)) == float(ones.group(1)) == 24, text
    finally:
        assert srv.terminate() == 0, srv.log


def _failing_bundle(out):
    """A bundle whose model fails inside ONNX Runtime on some valid requests: it reshapes
    the (1, T) ids to (1, first id), which works only where the first id is T."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["input_ids"], ["floats"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["input_ids"], ["shape"], start=0, end=1),
        helper.make_node("Constant", [], ["zero"], value_ints=[0]),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Slice", ["input_ids", "zero", "one", "one"], ["first_col"]),
        helper.make_node("Slice", ["first_col", "zero", "one", "zero"], ["first"]),
        helper.make_node("Reshape", ["first", "one"], ["first_id"]),
        helper.make_node("Concat", ["shape", "first_id"], ["wanted"], axis=0),
        helper.make_node("Reshape", ["floats", "wanted"], ["scores"], name="private/Reshape_7"),
    ]
    return bundles.hand_built(out, nodes, "failing", max_seq_len=16)


def test_a_model_failing_inside_onnx_runtime_answers_internal_and_keeps_its_details(tmp_path):
    """ONNX Runtime's message names the graph's nodes: the client gets INTERNAL, what failed
    and an error id; the server's log has the message under that id; the next request is
    served."""
    from conftest import ServerProcess

    srv = ServerProcess(_failing_bundle(tmp_path / "failing"))
    try:
        with tc.InferenceServerClient(srv.url) as c:

            def infer(ids):
                x = tc.InferInput("input_ids", [1, len(ids)], "INT64")
                x.set_data_from_numpy(np.array([ids], np.int64))
                return c.infer("failing", [x]).as_numpy("scores")

            np.testing.assert_array_equal(infer([4, 1, 2, 3]), [[4, 1, 2, 3]])
            with pytest.raises(InferenceServerException) as err:
                infer([5, 1, 2, 3])
            assert err.value.status() == "StatusCode.INTERNAL", err.value
            said = err.value.message()
            match = re.fullmatch(
                r"model 'failing' failed to run \((\w+)\); the server's log has the details: "
                r"error ([0-9a-f]{8})",
                said,
            )
            assert match, said
            assert "Reshape" not in said and "private" not in said
            np.testing.assert_array_equal(infer([3, 1, 2]), [[3, 1, 2]])  # still serving
        until(lambda: f"error {match.group(2)}" in srv.log)
        line = next(x for x in srv.log.splitlines() if f"error {match.group(2)}" in x)
        assert f"model 'failing' failed to run, error {match.group(2)}: {match.group(1)}" in line
        assert "private/Reshape_7" in line, line  # ONNX Runtime's own words, for the operator
    finally:
        assert srv.terminate() == 0, srv.log
