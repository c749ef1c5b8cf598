"""quantgate_failed_request_seconds: the time of the requests that failed, by status code,
beside the successes' quantgate_request_seconds (whose series stay as they were)."""

from __future__ import annotations

import numpy as np
import pytest
from bundles import VOCAB
from conftest import ServerProcess
from helpers import inputs, metric

from quantgate.bundle import CPU
from quantgate.serve.config import ServeConfig
from quantgate.serve.engine import Engine
from quantgate.serve.repository import Repository
from quantgate.serve.runtime import open_model

FAILED = "quantgate_failed_request_seconds"


def test_a_failed_requests_time_is_in_its_codes_histogram_not_the_successes(repo):
    model = open_model(repo / "classifier", ServeConfig(path=repo), CPU)
    engine = Engine(Repository([model]), ServeConfig(path=repo))
    served = {"model": model.name, "version": model.version}
    engine.finished(model, "DEADLINE_EXCEEDED", 0.75)
    engine.finished(model, "DEADLINE_EXCEEDED", 0.25)
    engine.finished(model, "INVALID_ARGUMENT", 0.0003)
    engine.finished(None, "NOT_FOUND", 0.001, asked="no-such-model")
    engine.finished(model, "OK", 0.002)

    def sample(name: str, **labels: str) -> float | None:
        return engine.metrics.registry.get_sample_value(name, labels)

    late = {**served, "code": "DEADLINE_EXCEEDED"}
    assert sample(f"{FAILED}_count", **late) == 2
    assert sample(f"{FAILED}_sum", **late) == pytest.approx(1.0)
    assert sample(f"{FAILED}_bucket", **late, le="0.5") == 1  # the quick one of the two
    assert sample(f"{FAILED}_count", **served, code="INVALID_ARGUMENT") == 1
    # the successes' histogram, its labels as they were: the one OK alone
    assert sample("quantgate_request_seconds_count", **served) == 1
    assert sample("quantgate_request_seconds_sum", **served) == pytest.approx(0.002)
    # a model not served has no latency series (a client cannot grow the label set)
    assert sample(f"{FAILED}_count", model="", version="", code="NOT_FOUND") is None
    assert sample("quantgate_requests_total", model="", version="", code="NOT_FOUND") == 1


def test_a_servers_failed_request_is_timed_under_its_code(repo):
    """Through the server: a request refused INVALID_ARGUMENT (a token id outside the
    vocabulary) is counted and timed as a failure, and nothing as a success."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    srv = ServerProcess(repo / "classifier", "--metrics-port", "0")
    try:
        ids = np.array([[3, 7, VOCAB, 1]], dtype=np.int64)
        with tc.InferenceServerClient(srv.url) as client, pytest.raises(InferenceServerException):
            client.infer("tiny-classifier", inputs({"input_ids": ids,
                                                     "attention_mask": np.ones_like(ids)}))  # fmt: skip
        labels = {"model": "tiny-classifier", "version": "1"}
        invalid = {**labels, "code": "INVALID_ARGUMENT"}
        assert metric(srv, f"{FAILED}_count", **invalid) == 1
        assert metric(srv, f"{FAILED}_sum", **invalid) > 0
        assert metric(srv, "quantgate_request_seconds_count", **labels) == 0
        assert metric(srv, "quantgate_requests_total", **invalid) == 1
    finally:
        assert srv.terminate() == 0, srv.log
