"""Calls answered with an error at once, their request unread: a stream handler, whatever
the method, which gRPC runs without waiting for a message it never reads (nor parses), on
threads of its own. A client that holds back its message holds no request thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc


def refusal(
    code: grpc.StatusCode,
    message: str,
    pool: futures.ThreadPoolExecutor,
    before: Callable[[grpc.ServicerContext], None] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` with ``message``, on ``pool``; ``before`` runs first
    (to count or log the call)."""

    def refuse(_requests, context: grpc.ServicerContext) -> None:
        if before is not None:
            before(context)
        context.abort(code, message)

    refuse.experimental_thread_pool = pool  # type: ignore[attr-defined]  # read by gRPC
    return grpc.stream_stream_rpc_method_handler(refuse)
