"""Bearer-token authentication: the interceptor, and tokens from the flag or a file.

A token file holds one token per line (blank lines and ``#`` comments aside) and is read
again when it changes (``watch.Watched``: looked at every second, off the request path):
a token rotates with no restart and
no window of refused clients (add the new token, move the clients to it, remove the old),
as a Kubernetes Secret mounted as a file is updated in place. A file that changes into one
that cannot be used (no token, a token with spaces) is logged as an error and the tokens
read before stay in force.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from quantgate import fsutil
from quantgate.errors import ConfigError
from quantgate.serve.config import ServeConfig, token_problem
from quantgate.serve.refusals import refusal
from quantgate.serve.watch import Watched

log = logging.getLogger(__name__)

# The calls anyone may make, token or not (load balancers and probes carry none): health
# checks (grpc.health.v1), reflection, and the inference service's calls that answer a
# yes/no about the server and carry no data.
OPEN_SERVICES = ("/grpc.health.", "/grpc.reflection.")
OPEN = ("ServerLive", "ServerReady")


def is_open(method: str, service: str) -> bool:
    """Whether ``method`` ("/package.Service/Method") is open to anyone, ``service`` being the
    inference service's full name: the one rule for the token check and the threads."""
    return method.startswith(OPEN_SERVICES) or method in _open_methods(service)


@functools.cache
def _open_methods(service: str) -> frozenset[str]:
    return frozenset(f"/{service}/{m}" for m in OPEN)


DENIED = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens in the file at ``path``; a ConfigError when there is none or one is bad,
    or when others may write the file (``fsutil.secret_file``)."""
    fsutil.secret_file("--auth-token-file", path, secret=True, error=ConfigError)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no token's
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--auth-token-file {path}: cannot read it ({e})") from e
    tokens = []
    for lineno, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if problem := token_problem(token):
            raise ConfigError(f"--auth-token-file {path}: the token on line {lineno} {problem}")
        tokens.append(token.encode())
    if not tokens:
        raise ConfigError(
            f"--auth-token-file {path} holds no token: one per line (# starts a comment)"
        )
    return tuple(tokens)


class TokenFile:
    """The tokens of a file, read again when it changes (``watch.Watched``); ``start()``
    watches it, ``close()`` ends the watch. Calling it answers the tokens in force and
    touches no file: interceptors run on gRPC's one dispatch thread."""

    def __init__(self, path: Path):
        self.path = path
        self._watch = Watched(
            f"--auth-token-file {path}",
            [path],
            lambda: read_tokens(path),
            kept="the tokens read before stay in force",
            on_load=lambda t: log.info("read %d token(s) from %s again", len(t), path),
        )

    def start(self) -> TokenFile:
        self._watch.start()
        return self

    def close(self) -> None:
        self._watch.stop()

    def __call__(self) -> tuple[bytes, ...]:
        return self._watch.value


Tokens = Callable[[], Sequence[bytes]]  # the tokens in force, asked on every call


def watch_tokens(tokens: Tokens | None) -> Callable[[], None]:
    """Start watching the file of ``tokens`` (``tokens(cfg)``), if they come from one; what
    ends the watch."""
    if isinstance(tokens, TokenFile):
        return tokens.start().close
    return lambda: None


def tokens(cfg: ServeConfig) -> Tokens | None:
    """The bearer tokens ``cfg`` requires (its token, or its token file's, read now and,
    once ``watch_tokens`` starts it, again when the file changes), or None: no
    authentication."""
    if cfg.auth_token_file is not None:
        return TokenFile(cfg.auth_token_file)
    if cfg.auth_token:
        fixed = (cfg.auth_token.encode(),)
        return lambda: fixed
    return None


class BearerTokenAuth(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call but the open ones
    (``is_open``; ``service`` is the inference service's full name), for any of the tokens
    ``tokens()`` gives; ``on_refused`` counts refusals.

    A refusal reads nothing of its call and runs on ``pool``, not on a request thread: a
    client without a token that sends half a message cannot hold one (it held one per call
    until its message came: 544 such calls on one connection refused every authenticated
    call, and buffered up to the request limit each, 4 MiB).
    """

    def __init__(
        self,
        service: str,
        tokens: Tokens,
        on_refused: Callable[[], None],
        pool: futures.ThreadPoolExecutor,
    ):
        self._service = service
        self._tokens = tokens
        self._on_refused = on_refused
        self._denied = refusal(grpc.StatusCode.UNAUTHENTICATED, DENIED, pool)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or is_open(details.method, self._service):
            return handler
        sent = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        # one header: with two, a proxy that checked the first could disagree with this
        scheme, _, token = (sent[0] if len(sent) == 1 else "").partition(" ")
        # The scheme is case-insensitive (RFC 9110 11.1): "bearer" is "Bearer". Every token
        # is compared, so the time taken does not say which one came close.
        matches = [hmac.compare_digest(token.encode(), t) for t in self._tokens()]
        if scheme.lower() == "bearer" and any(matches):
            return handler
        self._on_refused()
        return self._denied
