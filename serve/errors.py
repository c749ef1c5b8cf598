"""The serving errors, each answered with one gRPC status code (STATUS below).

They extend quantgate.errors: BadRequest (INVALID_ARGUMENT) is shared with the rest of
the package; the ones here exist only while a server runs.
"""

from __future__ import annotations

import grpc

from quantgate.errors import BadRequest, QuantgateError


class ModelNotFound(BadRequest):
    """The request names a model or version the server does not serve (NOT_FOUND)."""


class Unavailable(QuantgateError):
    """The server cannot take the request now: queue full, or shutting down (UNAVAILABLE)."""


class DeadlineExceeded(QuantgateError):
    """The request's deadline passed before it could run (DEADLINE_EXCEEDED)."""


class InferenceFailed(QuantgateError):
    """ONNX Runtime failed on a request that passed validation (INTERNAL)."""


# Checked in this order: the first class an error is an instance of gives its code.
STATUS: dict[type[QuantgateError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
}


def status_of(err: QuantgateError) -> grpc.StatusCode:
    """The gRPC status code that answers ``err`` (INTERNAL for anything unexpected)."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def from_status(code: grpc.StatusCode, message: str) -> QuantgateError:
    """The client side: the error type for a status code a server answered with."""
    for cls, c in STATUS.items():
        if c == code:
            return cls(message)
    return QuantgateError(f"{code.name}: {message}")
