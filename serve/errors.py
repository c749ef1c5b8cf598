"""The gRPC status code that answers each of quantgate's errors, and back.

The error types live in quantgate.errors with the rest; this module only adds what needs
grpc: the mapping a server answers with and a client decodes.
"""

from __future__ import annotations

import grpc

from quantgate.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    ModelNotFound,
    QuantgateError,
    ResponseTooLarge,
    Unauthenticated,
    Unavailable,
    clipped,
)

__all__ = ["STATUS", "from_status", "message_of", "status_of"]


# An error's code is that of the nearest class in its MRO found here (status_of).
STATUS: dict[type[QuantgateError], grpc.StatusCode] = {
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    ResponseTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,  # answered by auth.BearerTokenAuth
}


def status_of(err: QuantgateError) -> grpc.StatusCode:
    """The gRPC status code that answers ``err`` (INTERNAL for anything unexpected)."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


# Characters of an error's message a status carries. gRPC sends it in the trailers,
# percent-encoded (a non-ASCII character takes up to 9 bytes), which a client refuses past
# its metadata limit (8 KB by default): a request naming a 20 kB model would get
# RESOURCE_EXHAUSTED, which reads as retryable, instead of its NOT_FOUND.
MESSAGE_LIMIT = 800


def message_of(err: BaseException) -> str:
    """``err``'s message as a status carries it: cut past ``MESSAGE_LIMIT`` characters."""
    return clipped(str(err), MESSAGE_LIMIT)


def from_status(code: grpc.StatusCode, message: str) -> QuantgateError:
    """The client side: the error type for a status code a server answered with."""
    for cls, c in STATUS.items():
        if c == code:
            return cls(message)
    return QuantgateError(f"{code.name}: {message}")
