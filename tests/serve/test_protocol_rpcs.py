"""The RPCs of Triton's GRPCInferenceService that quantgate serves, as tritonclient meets
them: readiness, metadata and config of known and unknown models, statistics of all."""

from __future__ import annotations

import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(server):
    with tc.InferenceServerClient(server.url) as c:
        yield c


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
    assert [list(t.dims) for t in config.input] == [[-1], [-1]]  # no batch dimension
    assert [list(t.dims) for t in config.output] == [[-1, 32]]
    listed = client.get_inference_statistics("").model_stats
    assert {(s.name, s.version) for s in listed} == {("classifier", "1"), ("encoder", "1")}
