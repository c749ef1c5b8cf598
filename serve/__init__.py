"""Serving: bundles over gRPC (KServe v2 / Triton protocol) through ONNX Runtime.

    config.py        ServeConfig, every knob in one frozen value
    variants.py      the execution provider, then the variant the bundle's gates vouch for there
    runtime.py       Model: a verified bundle's variant in an ONNX Runtime session; request checks
    repository.py    the served models by name and version, opened from one bundle or a folder
    batcher.py       the dynamic batcher (bounded queue, length buckets, padding)
    engine.py        models + batchers + warm-up + readiness + accounting
    servicer.py      inference.GRPCInferenceService: protobuf <-> numpy, errors -> status codes
    server.py        create_server(cfg, engine) and run(cfg): health, reflection, SIGTERM
    interceptors.py  around every call: the access log, overload refusals, the stream limit
    tls.py           TLS files checked before models load (pair, dates), read again on change
    auth.py          bearer tokens, from the flag or a file read again on change
    refusals.py      calls answered with an error at once, unread, off the request threads
    metrics.py       Prometheus metrics, Triton statistics, the HTTP probes
    logs.py          the server's log on stderr: UTC text lines, or JSON lines
    client.py        a numpy-in, numpy-out client over our own stubs; request_inputs

Importing this package imports nothing heavy; never torch or quantgate.model.

The entry points, loaded on first use (``Client`` loads quantgate's protobuf stubs, which
cannot share a process with tritonclient's)::

    from quantgate.serve import Client, ServeConfig, run
    run(ServeConfig(path="bundles/digits", port=8001))   # blocks until SIGTERM or Ctrl-C
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantgate._lazy import exports

_WHERE = {
    "Client": "client",
    "ClientTLS": "client",
    "ServeConfig": "config",
    "TLSConfig": "config",
    "request_inputs": "client",
    "run": "server",
}
__all__ = [
    "Client",
    "ClientTLS",
    "ServeConfig",
    "TLSConfig",
    "request_inputs",
    "run",
]
__getattr__, __dir__ = exports(__name__, _WHERE)

if TYPE_CHECKING:
    from quantgate.serve.client import Client, ClientTLS, request_inputs
    from quantgate.serve.config import ServeConfig, TLSConfig
    from quantgate.serve.server import run
