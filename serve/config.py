"""ServeConfig: every knob of the server in one frozen, typed value."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path

from quantgate.configs import check_fields, config_class
from quantgate.schema import PRECISIONS

# The most classes one output may be asked for: each is a string made in Python, and a
# count of 2**62 had every value of a hidden-state output formatted (seconds per request).
MAX_CLASS_COUNT = 1000

DEVICES = ("auto", "cuda", "cpu")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
IO_BINDING = ("auto", "on", "off")


def token_problem(token: str) -> str | None:
    """Why a bearer ``token`` could never be sent as gRPC metadata (or would mean no auth),
    or None. Never the token itself: error output ends up in logs."""
    if not token:
        return "is empty"
    if not (token.isascii() and token.isprintable()) or " " in token:
        return "has spaces, control characters or characters outside ASCII"
    return None


# gRPC's own targets, which name a resolver and are no HOST:PORT (dns:///HOST:PORT,
# xds:///SERVICE, unix:PATH, ...): passed to gRPC as they are
GRPC_TARGETS = (
    "unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:", "xds:", "google-c2p:",
)  # fmt: skip
# any URL's scheme, as RFC 3986 spells one (http://, grpc://, HTTPS://)
_SCHEME = re.compile(r"[A-Za-z][\w+.-]*://")


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a server's address, HOST:PORT (gRPC reads a URL's scheme
    as a host name, a host alone as port 443, a port past 65535 as unreachable: each then
    told as "nothing listens there"); None where it is right, or one of gRPC's own targets
    (``GRPC_TARGETS``). The advice is the address to give instead: an IPv6 address in
    brackets, and where no port is given, Triton's gRPC port."""
    if url.startswith(GRPC_TARGETS):
        return None
    if scheme := _SCHEME.match(url):
        address = url[scheme.end() :].partition("/")[0] or "localhost"
        if ":" not in address.rpartition("]")[2]:  # a host alone, or [ADDR]
            address += ":8001"  # Triton's gRPC port
        return f"expected HOST:PORT, without a scheme (gRPC takes an address, not a URL): {address}"
    host, colon, port = url.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        if _ipv6(host) and _port(port):  # [ADDR]:PORT without its brackets
            return f"an IPv6 address goes in brackets: [{host}]:{port}"
        if _ipv6(bare := url.removeprefix("[").removesuffix("]")):  # no port
            return f"expected [ADDR]:PORT, e.g. [{bare}]:8001 (Triton's gRPC port is 8001)"
        return "expected HOST:PORT, a host name without ':' or an IPv6 address in brackets"
    if not colon:
        return f"expected HOST:PORT, e.g. {url or 'localhost'}:8001 (Triton's gRPC port is 8001)"
    if not host:
        return f"no host: expected HOST:PORT, e.g. localhost:{port if _port(port) else 8001}"
    if not _port(port):
        return f"the port {port!r} is not a number from 1 to 65535"
    return None


def _port(text: str) -> bool:
    """Whether ``text`` is a TCP port, 1 to 65535 in ASCII digits (``str.isdigit`` takes
    other scripts' digits too, which no resolver reads)."""
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _ipv6(text: str) -> bool:
    """Whether ``text`` is an IPv6 address (a zone, ``fe80::1%eth0``, included)."""
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


@config_class
@dataclass(frozen=True)
class TLSConfig:
    cert: Path  # PEM server certificate chain
    key: Path  # PEM private key
    client_ca: Path | None = None  # set: mutual TLS, clients must present a cert it signed

    def __post_init__(self):
        check_fields(self)  # paths given as strings become Paths


@config_class
@dataclass(frozen=True)
class ServeConfig:
    path: Path  # one bundle, or a repository folder of bundles (see repository.load_repository)
    host: str = "0.0.0.0"
    port: int = 8001  # Triton's gRPC port; 0 picks a free one (tests)
    device: str = "auto"  # auto: CUDA when onnxruntime has the CUDA provider, else CPU
    # Largest batch one request may carry, and the largest batch the batcher forms.
    max_batch_size: int = 32
    dynamic_batching: bool = True
    # How long the batcher may hold the oldest request waiting for company. 0: never wait,
    # take what is already queued; under load requests pile up while the previous batch
    # runs, so batches still form, and a lone request pays no delay. A batch is sent sooner
    # when full, when the next request would overfill it, or in time for a queued
    # request's deadline.
    max_queue_delay_us: int = 0
    # Requests admitted but not yet running; beyond it a request gets UNAVAILABLE at once,
    # so overload costs bounded memory and the client learns to back off.
    max_queue_size: int = 256
    # Batches executing concurrently per model. 1 on CPU: ORT already uses every core
    # (intra-op threads) for one batch, and a second one only contends for them.
    instances: int = 1
    # 0: ORT's default, or the CPUs a container has; one on CUDA (quantgate.cpus)
    intra_op_threads: int = 0
    allow_failed_gates: bool = False  # serve a bundle whose verdict is fail (its FP32 variant)
    precision: str | None = None  # force a variant instead of the fastest that passed
    warmup: bool = True  # run each model at three shapes before reporting ready (Engine.warm_up)
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off
    # The metrics port's own address (127.0.0.1: a sidecar's scrape only, gRPC on every
    # address, or the reverse); None: host's. Refused without metrics_port, which it is for.
    metrics_host: str | None = None
    # One INFO line per RPC to the logger quantgate.serve.access (interceptors.AccessLog). Off:
    # no interceptor at all, so a request pays nothing for it.
    access_log: bool = False
    tls: TLSConfig | None = None
    auth_token: str | None = None  # required as "authorization: Bearer <token>" when set
    # Or any token of this file, one per line, read again when it changes (serve/auth.py)
    auth_token_file: Path | None = None
    # Largest request (gRPC's own default): a request is token ids, kilobytes, and a
    # protobuf costs some 40 bytes of memory per byte to parse, so a larger limit lets one
    # client make the server hold gigabytes. Larger ones fail with RESOURCE_EXHAUSTED.
    max_request_bytes: int = 4 << 20
    max_message_bytes: int = 64 << 20  # largest response (hidden states are megabytes)
    # SIGTERM: time admitted requests get to finish. Under Kubernetes' default termination
    # grace (30 s), so that a drain that takes it all still exits by itself, not by SIGKILL.
    shutdown_grace_s: float = 25.0
    # A connection this old (gRPC jitters it by +-10%) is sent a GOAWAY: its client opens a
    # new one for its next calls, while the calls in flight get shutdown_grace_s to finish
    # (a drain's promise to an admitted request) before the old one is closed. An L4 load
    # balancer or a Kubernetes Service balances connections, not calls: without it a
    # long-lived client stays on the replica it first reached, and replicas added later get
    # none of its calls. 0: off, connections live until their client closes them.
    max_connection_age_s: float = 0.0
    # -- CUDA execution provider (ignored on the CPU) -------------------------------------
    cuda_device_id: int = 0  # which GPU (as CUDA numbers them; CUDA_VISIBLE_DEVICES applies)
    # Cap on ORT's CUDA memory arena per session, in bytes; 0: no cap (ORT's default). Set it
    # when several servers or models share one GPU, or the first to grow starves the rest.
    gpu_mem_limit: int = 0
    # kSameAsRequested grows the arena by exactly what a request needs: less memory held when
    # batch/sequence shapes vary (the batcher's buckets), a little more allocation work.
    # kNextPowerOfTwo (ORT's default) rounds growth up and can hold ~2x what it uses.
    arena_extend_strategy: str = "kSameAsRequested"
    # cuDNN convolution algorithm search. Transformers have no convolutions, so EXHAUSTIVE
    # (ORT's default: benchmark every algorithm on each new shape) would only cost start-up
    # time on models that do; HEURISTIC picks from cuDNN's heuristics at once.
    cudnn_conv_algo_search: str = "HEURISTIC"
    # IO binding: inputs bound from the request's arrays and outputs bound to host memory,
    # so a run hands back arrays in host memory without the default run()'s output
    # allocation on the device. auto: on with CUDA, off on the CPU (where outputs are
    # already in host memory). Its gain is not measured.
    # (CUDA graphs are not a serving option: a graph replays one input shape at fixed device
    # addresses, which a server of varying requests cannot promise. bench/gpu_check.py
    # measures what one gains in-process.)
    io_binding: str = "auto"

    def address(self, port: int | None = None) -> str:
        """``host:port`` (``port`` defaults to the configured one) as gRPC and URLs write
        it: an IPv6 address in brackets, ``[::1]:8001``."""
        return _hostport(self.host, self.port if port is None else port)

    @property
    def http_host(self) -> str:
        """The address the metrics port listens on: metrics_host, else host."""
        return self.host if self.metrics_host is None else self.metrics_host

    @property
    def http_host_flag(self) -> str:
        """The flag that set ``http_host``, for the errors that name it."""
        return "--host" if self.metrics_host is None else "--metrics-host"

    def metrics_address(self, port: int) -> str:
        """``http_host:port`` (``port``: the one the metrics port bound), written as
        ``address`` writes it."""
        return _hostport(self.http_host, port)

    def __post_init__(self):
        from quantgate.errors import ConfigError

        check_fields(self)  # types first: path="bundles/digits" becomes a Path
        # An IPv6 address is kept bare ("::1"); address() brackets it where a port follows.
        for name in ("host", "metrics_host"):
            if (host := getattr(self, name)) is not None:
                object.__setattr__(self, name, host.removeprefix("[").removesuffix("]"))
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in (
            "max_batch_size",
            "max_queue_size",
            "instances",
            "max_request_bytes",
            "max_message_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise ConfigError(
                f"arena_extend_strategy must be one of {ARENA_STRATEGIES}, "
                f"got {self.arena_extend_strategy!r}"
            )
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCH:
            raise ConfigError(
                f"cudnn_conv_algo_search must be one of {CONV_ALGO_SEARCH}, "
                f"got {self.cudnn_conv_algo_search!r}"
            )
        if self.io_binding not in IO_BINDING:
            raise ConfigError(f"io_binding must be one of {IO_BINDING}, got {self.io_binding!r}")
        for name in (
            "cuda_device_id", "gpu_mem_limit", "max_queue_delay_us", "port", "intra_op_threads"
        ):  # fmt: skip
            if (value := getattr(self, name)) < 0:
                raise ConfigError(f"{name} cannot be negative, got {value}")
        if not self.shutdown_grace_s >= 0:  # NaN too; inf is a grace with no end
            raise ConfigError(
                "shutdown_grace_s is the seconds admitted requests get to finish at shutdown, "
                f"0 or more (inf: no limit), got {self.shutdown_grace_s}"
            )
        if not math.isfinite(self.max_connection_age_s) or self.max_connection_age_s < 0:
            raise ConfigError(
                "max_connection_age_s is the seconds after which a connection is renewed, 0 "
                f"or more (0: off), got {self.max_connection_age_s}"
            )
        if (
            self.metrics_port
            and self.metrics_port == self.port
            and _may_share(self.host, self.http_host)
        ):
            at = "" if self.metrics_host is None else f" at {self.metrics_host} ({self.host}'s)"
            raise ConfigError(
                f"--metrics-port {self.metrics_port} is the gRPC --port too{at}; give the "
                "metrics another port (or 0 for a free one), or another --metrics-host"
            )
        if self.metrics_host == "":
            raise ConfigError(
                "--metrics-host is empty: give an address (0.0.0.0 for every interface, "
                "127.0.0.1 for this machine alone), or leave it out to use --host's"
            )
        if self.metrics_host is not None and self.metrics_port is None:
            raise ConfigError(
                f"--metrics-host {self.metrics_host} says where the metrics port listens, and "
                "there is none: give --metrics-port too (0 picks a free one)"
            )
        if self.max_queue_delay_us and not self.dynamic_batching:
            raise ConfigError(
                "--max-queue-delay-us waits to form batches; --no-dynamic-batching forms none"
            )
        # An empty token would serve without auth; one with whitespace (a token file's
        # trailing newline) could never be sent in gRPC metadata, so every call would fail.
        if self.auth_token is not None and (problem := token_problem(self.auth_token)):
            raise ConfigError(  # never the token itself: error output ends up in logs
                f"the auth token {problem} (a trailing newline?); pass the token itself, or no "
                "--auth-token (nor QUANTGATE_AUTH_TOKEN) to serve without one"
            )
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ConfigError(
                "--auth-token (or QUANTGATE_AUTH_TOKEN) and --auth-token-file both name the "
                "token: give one (the file can hold several, one per line)"
            )


def _hostport(host: str, port: int) -> str:
    """``host:port`` as gRPC and URLs write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _may_share(a: str, b: str) -> bool:
    """Whether listening on hosts ``a`` and ``b`` could take one address: the same host,
    either every interface (0.0.0.0, ::), or a name (not resolved here: it may be either).
    Two different addresses (127.0.0.1 and 10.0.0.5, 127.0.0.1 and ::1) share none."""
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return True
    return x == y or x.is_unspecified or y.is_unspecified
