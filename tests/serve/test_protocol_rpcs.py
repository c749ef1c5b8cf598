"""Every RPC of Triton's GRPCInferenceService answers: the ones quantgate serves work as
tritonclient expects, the others say UNIMPLEMENTED and what to do instead (not gRPC's bare
"Method not found!")."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


@pytest.mark.parametrize(
    "call, hint",
    [
        (lambda c: c.load_model("classifier"), "restart"),
        (lambda c: c.unload_model("classifier"), "restart"),
        (lambda c: c.get_system_shared_memory_status(), "raw_input_contents"),
        (lambda c: c.register_system_shared_memory("r", "/r", 64), "raw_input_contents"),
        (lambda c: c.unregister_system_shared_memory(), "raw_input_contents"),
        (lambda c: c.get_cuda_shared_memory_status(), "raw_input_contents"),
        (lambda c: c.unregister_cuda_shared_memory(), "raw_input_contents"),
        (lambda c: c.get_trace_settings(), "ModelStatistics"),
        (lambda c: c.update_log_settings({"log_verbose_level": 1}), "-v"),
    ],
)
def test_rpcs_the_server_does_not_offer_say_why(client, call, hint):
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == "StatusCode.UNIMPLEMENTED", err.value
    assert "not supported by quantgate" in err.value.message() and hint in err.value.message()


def test_the_rpcs_it_serves_answer_as_triton_does(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder") and client.is_model_ready("encoder", "1")
    assert not client.is_model_ready("encoder", "2") and not client.is_model_ready("nope")
    for call in (client.get_model_metadata, client.get_model_config):
        with pytest.raises(InferenceServerException) as err:
            call("nope")
        assert err.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in err.value.message()
    config = client.get_model_config("encoder").config
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    policy = config.dynamic_batching.default_queue_policy  # a request's `timeout` is honoured
    assert policy.max_queue_size == 256 and policy.allow_timeout_override
    assert [list(t.dims) for t in config.input] == [[-1], [-1]]  # no batch dimension
    assert [list(t.dims) for t in config.output] == [[-1, 32]]
    listed = client.get_inference_statistics("").model_stats
    assert {(s.name, s.version) for s in listed} == {("classifier", "1"), ("encoder", "1")}


def test_the_repository_index_lists_every_served_model_ready(client, server):
    index = client.get_model_repository_index(as_json=True)
    rows = {(m["name"], m["version"], m["state"]) for m in index["models"]}
    assert rows == {("classifier", "1", "READY"), ("encoder", "1", "READY")}, index
    with grpc.insecure_channel(server.url) as channel:  # tritonclient cannot ask these
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
        # The one repository has no name: a named one is refused (as Triton does).
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other"))
    assert {(m.name, m.version, m.state) for m in ready.models} == rows
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "'other'" in err.value.details() and "repository_name empty" in err.value.details()


def test_server_metadata_lists_the_extensions_served(client):
    extensions = set(client.get_server_metadata().extensions)
    assert extensions == {"classification", "model_configuration", "statistics"}
