"""The gRPC server: built by ``create_server``, run by ``serve``.

    cfg = ServeConfig(path=Path("bundles/digits"), port=0)
    engine = Engine(load_repository(cfg), cfg)
    server, port = create_server(cfg, engine)      # inside a running event loop

``serve(cfg)`` does all of it: load and verify the bundles, listen, warm up, report
SERVING, and on SIGTERM or SIGINT stop accepting, finish every admitted request, and
return (the process then exits 0).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from quantgate.errors import ServeError
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.serve import codec
from quantgate.serve.config import ServeConfig
from quantgate.serve.engine import Engine
from quantgate.serve.runtime import load_repository
from quantgate.serve.servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on the inference service.

    Health checks and reflection stay open: load balancers and probes carry no token.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if hmac.compare_digest(metadata.get("authorization", "").encode(), self._expected):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"

    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serde = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **serde)
    return grpc.unary_unary_rpc_method_handler(deny, **serde)


def create_server(
    cfg: ServeConfig, engine: Engine
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build the server (not started) and bind its port; call inside a running event loop.

    Returns the server, the bound port (the free one chosen when ``cfg.port`` is 0) and
    the health servicer, which reports NOT_SERVING until ``serve`` marks it SERVING.
    """
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a busy port is an error, not a silently shared one
    ]
    interceptors = [BearerTokenAuth(cfg.auth_token)] if cfg.auth_token else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    _add_inference_service(InferenceServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, _credentials(cfg))
    except RuntimeError as e:
        raise ServeError(
            f"cannot listen on {address}: {e}. Is the port in use? Try --port 0."
        ) from e
    if port == 0:
        raise ServeError(f"cannot listen on {address}; is the port in use? Try another --port.")
    return server, port, health_servicer


def _add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated ``add_..._to_server`` does, but with a
    serializer that passes already serialized responses through: ModelInfer answers are
    written by ``codec.encode_response`` with a single copy of the output tensors."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        handler = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=codec.serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _credentials(cfg: ServeConfig) -> grpc.ServerCredentials:
    tls = cfg.tls
    try:
        pair = (tls.key.read_bytes(), tls.cert.read_bytes())
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as e:
        raise ServeError(f"cannot read a TLS file: {e}") from e
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


async def _set_health(servicer: health.aio.HealthServicer, status) -> None:
    for name in ("", SERVICE):
        await servicer.set(name, status)


async def serve(cfg: ServeConfig, *, on_ready: Callable[[int, Engine], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully and return."""
    engine = Engine(load_repository(cfg), cfg)
    server, port, health_servicer = create_server(cfg, engine)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if cfg.metrics_port is not None:
        engine.metrics.serve_http(cfg.metrics_port, cfg.host)
        log.info("Prometheus metrics on http://%s:%d/metrics", cfg.host, cfg.metrics_port)
    await server.start()
    engine.start()
    if cfg.warmup:
        await engine.warm_up()
    engine.ready = True
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s:%d", cfg.host, port)
    if on_ready is not None:
        on_ready(port, engine)

    await stop.wait()
    log.info(
        "shutting down: no new requests; finishing admitted ones (grace %.0fs)",
        cfg.shutdown_grace_s,
    )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    engine.ready = False  # open streams are refused new requests too
    await server.stop(cfg.shutdown_grace_s)  # new calls refused; running ones finish
    await engine.close()
    log.info("stopped")


def run(cfg: ServeConfig, *, on_ready: Callable[[int, Engine], None] | None = None) -> None:
    """Blocking entry point for the CLI."""
    asyncio.run(serve(cfg, on_ready=on_ready))
