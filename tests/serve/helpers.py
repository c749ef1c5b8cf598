"""tritonclient helpers, the in-process reference the server must match, and what the
in-process batcher tests share."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as tc
from bundles import VOCAB

MODEL_FILE = "model.fp32.onnx"


# Every server subprocess a test starts (conftest.ServerProcess), for the fixture that kills
# those a failed test leaves running. Here, not on the class: pytest imports conftest.py
# under a name of its own, and `from conftest import ...` in a test imports it again, a
# second class with a list of its own; this module is imported once, by both.
SERVERS: list = []


def batch(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1, VOCAB, size=(rows, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def inputs(feeds: dict[str, np.ndarray]) -> list[tc.InferInput]:
    out = []
    for name, array in feeds.items():
        i = tc.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        i.set_data_from_numpy(array)
        out.append(i)
    return out


class Reference:
    """In-process ONNX Runtime on the bundle's file: what the server must answer."""

    def __init__(self, bundle: Path):
        self.session = ort.InferenceSession(
            str(bundle / MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        self.output = self.session.get_outputs()[0].name

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


def batcher(model, **kw):
    """A Batcher over ``model`` with the server's defaults, but no queue delay."""
    from quantgate.serve.batcher import Batcher

    kw = {"max_batch_size": 32, "max_queue_delay_us": 0, "max_queue_size": 64, **kw}
    return Batcher(model, **kw)


def hold_first_run(model) -> tuple[threading.Event, threading.Event]:
    """Make ``model.run``'s first call wait (at most 10 s) until ``release`` is set, so a
    test can queue requests behind a running batch; returns (started, release)."""
    started, release = threading.Event(), threading.Event()
    run = model.run

    def held(feeds, outputs=(), options=None):
        if not started.is_set():
            started.set()
            release.wait(10)
        return run(feeds, outputs, options)

    model.run = held
    return started, release


def queue_depth(srv) -> float:
    """The quantgate_queue_depth of ``srv`` (a conftest.ServerProcess started with
    --metrics-port 0), summed over its models."""
    url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(n) for n in re.findall(r"^quantgate_queue_depth\{[^}]*\} (\S+)$", text, re.M))


def metric(srv, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels`` of ``srv``'s metrics (a conftest.ServerProcess
    started with --metrics-port 0), read by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting"
        time.sleep(0.001)


def spawn(fn, *args, thread_name: str | None = None, **kwargs) -> Future:
    """``fn`` on a daemon thread: a thread stranded by a bug cannot hang the test run."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the test through the future
            future.set_exception(e)

    threading.Thread(target=target, name=thread_name, daemon=True).start()
    return future


def has_ipv6_loopback() -> bool:
    """Whether this host can listen on ::1 (a container may have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
