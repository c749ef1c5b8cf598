"""`quantgate serve`: bundles over gRPC (KServe v2 / Triton protocol), or, with --check,
what it would serve."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from quantgate.cli._app import command
from quantgate.cli._console import out
from quantgate.serve.config import DEVICES, PRECISIONS, ServeConfig
from quantgate.serve.logs import LogFormat, server_log

# serve's choices, as ServeConfig names them (an Enum: --help lists them)
ServeDevice = Enum("ServeDevice", {d.upper(): d for d in DEVICES}, type=str)  # type: ignore[misc]
Precision = Enum("Precision", {p.upper(): p for p in PRECISIONS}, type=str)  # type: ignore[misc]

_DEFAULT_SERVE = ServeConfig(path=Path("."))
_DEFAULT_DEVICE = ServeDevice(_DEFAULT_SERVE.device)


@command()
def serve(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="A bundle, or a repository folder of them (NAME/ or NAME/VERSION/ bundles).",
        ),
    ],
    host: Annotated[
        str,
        typer.Option(
            metavar="ADDRESS",
            help="Address to listen on, for gRPC and the metrics port (unless "
            "--metrics-host): 0.0.0.0 is every IPv4 and IPv6 address (where the host has "
            "IPv6), 127.0.0.1 local clients only.",
        ),
    ] = _DEFAULT_SERVE.host,
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="gRPC port (Triton's is 8001); 0 picks a free one.",
        ),
    ] = _DEFAULT_SERVE.port,
    device: Annotated[
        ServeDevice, typer.Option(help="auto: CUDA when onnxruntime has it, else the CPU.")
    ] = _DEFAULT_DEVICE,
    cuda_device: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="Which GPU, as CUDA numbers them (nvidia-smi lists them)."
        ),
    ] = _DEFAULT_SERVE.cuda_device_id,
    max_batch_size: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="Largest batch per request and per formed batch."),
    ] = _DEFAULT_SERVE.max_batch_size,
    max_queue_delay_us: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="MICROSECONDS",
            help="How long a request may wait for others to batch with.",
        ),
    ] = _DEFAULT_SERVE.max_queue_delay_us,
    max_queue_size: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="Waiting requests per model; beyond it UNAVAILABLE."),
    ] = _DEFAULT_SERVE.max_queue_size,
    dynamic_batching: Annotated[
        bool, typer.Option(help="Batch concurrent requests into one session.run.")
    ] = _DEFAULT_SERVE.dynamic_batching,
    instances: Annotated[
        int, typer.Option(min=1, metavar="N", help="Batches run at once per model.")
    ] = _DEFAULT_SERVE.instances,
    threads: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="ONNX Runtime intra-op threads per session (0: its default, one per "
            "physical core, or the CPUs a container may use where fewer: its CPU quota, its "
            "cpuset; one on CUDA, where the graph runs on the GPU; ORT_INTRA_OP_NUM_THREADS "
            "where set).",
        ),
    ] = _DEFAULT_SERVE.intra_op_threads,
    max_request_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="BYTES",
            help="Largest request, compressed or not (gRPC's default 4 MiB: a request is token "
            "ids, and parsing costs ~40x its size in memory); beyond it RESOURCE_EXHAUSTED.",
        ),
    ] = _DEFAULT_SERVE.max_request_bytes,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            min=1, metavar="BYTES", help="Largest response; beyond it RESOURCE_EXHAUSTED."
        ),
    ] = _DEFAULT_SERVE.max_message_bytes,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="Seconds admitted requests get to finish after SIGTERM, Ctrl-C or SIGHUP (a "
            "second signal exits now). Requests still unanswered when it runs out are "
            "cancelled, and the server exits 1. Keep it under the orchestrator's termination "
            "grace (Kubernetes: terminationGracePeriodSeconds, 30 by default).",
        ),
    ] = _DEFAULT_SERVE.shutdown_grace_s,
    max_connection_age: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="Renew client connections this old (+-10%), behind an L4 load balancer or "
            "a Kubernetes Service, which balance connections, not calls: without it a "
            "long-lived client stays on the replica it first reached, and replicas added by a "
            "scale-out get none of its calls. The server sends an HTTP/2 GOAWAY: the client "
            "opens its next calls on a new connection (to any replica), and its calls in "
            "flight get --shutdown-grace to finish on the old one, then closed (an open "
            "ModelStreamInfer stream ends UNAVAILABLE: reopen it). A few minutes (300) is "
            "usual; not needed behind a proxy that balances calls (Envoy, Istio, a gRPC "
            "ingress). 0: off (the default).",
        ),
    ] = _DEFAULT_SERVE.max_connection_age_s,
    precision: Annotated[
        Precision | None,
        typer.Option(help="Serve this variant instead of the fastest that passed."),
    ] = None,  # ServeConfig's: the fastest that passed
    allow_failed_gates: Annotated[
        bool,
        typer.Option(
            "--allow-failed-gates",
            help="Serve a bundle whose gates failed (never a failed variant unless --precision names it).",
        ),
    ] = _DEFAULT_SERVE.allow_failed_gates,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics over HTTP on this port, at /metrics (/ redirects "
            "there), and the probes /healthz and /readyz (and Triton's /v2/health/live, "
            "/v2/health/ready and /v2/models/NAME/ready); other paths are 404. 0 picks a free port and prints it. Off "
            "unless given (Triton's is 8002).",
        ),
    ] = _DEFAULT_SERVE.metrics_port,
    metrics_host: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="The metrics port's own address, as --host reads it (default: --host's): "
            "127.0.0.1 keeps the metrics and HTTP probes to this machine (a sidecar's scrape) "
            "while gRPC listens on every address, or 0.0.0.0 opens them while gRPC stays "
            "local. A kubelet's HTTP probes come from outside the pod and cannot reach "
            "127.0.0.1. Needs --metrics-port (refused without it).",
        ),
    ] = _DEFAULT_SERVE.metrics_host,
    tls_cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PEM server certificate (enables TLS).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PEM private key for --tls-cert.")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="PEM CA that client certificates must chain to (mutual TLS)."
        ),
    ] = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="QUANTGATE_AUTH_TOKEN",
            metavar="TOKEN",
            help="Require 'authorization: Bearer TOKEN' on inference calls (health, "
            "ServerLive/Ready and reflection stay open for probes). On the command line it "
            "shows in `ps`: prefer the variable or --auth-token-file.",
        ),
    ] = _DEFAULT_SERVE.auth_token,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Require a bearer token, any of this file's (one per line, # comments), "
            "read again within a second of a change: rotate a token with no restart (add "
            "the new one, move the clients, remove the old), as a mounted Secret updates.",
        ),
    ] = _DEFAULT_SERVE.auth_token_file,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log",
            help="Log one line per RPC, when it ends, at INFO to the logger "
            "quantgate.serve.access: method, model, version, code (the gRPC status name), "
            "rows, latency_ms, peer, and the client's request id (a stream: one line, with "
            "its requests and how many failed); with --log-format json the fields are keys. "
            "Off by default: the line costs a batch-1 request a few percent of its latency.",
        ),
    ] = _DEFAULT_SERVE.access_log,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            help="The log on stderr: text (a UTC timestamp, level, logger and message per "
            "line) or json (one object per line: ts, level, logger, message, and a record's "
            "fields as keys, such as --access-log's), for a log pipeline. stdout's lines "
            "(serving ..., metrics on ..., listening on ...) stay text.",
        ),
    ] = LogFormat.TEXT,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Load and verify everything as serving would (hashes, gates, sessions, TLS "
            "files), print what each model would serve, and exit without listening.",
        ),
    ] = False,
) -> None:
    """Serve bundles over gRPC (KServe v2 / Triton protocol) until SIGTERM, SIGHUP or Ctrl-C.

    Verifies every bundle's hashes, refuses bundles whose gates failed, and serves per
    execution provider the fastest variant that passed. Health checks, reflection,
    Prometheus metrics; SIGTERM (SIGHUP, Ctrl-C) finishes every admitted request, then
    exits 0 (1 when --shutdown-grace runs out first; a second signal exits at once).
    """
    from quantgate.errors import ConfigError
    from quantgate.serve.config import ServeConfig, TLSConfig
    from quantgate.serve.server import run, verify

    def ready(bound: int, engine) -> None:
        for m in engine.repository:
            out.print(f"serving {m.describe()}", highlight=False, soft_wrap=True)
        if engine.metrics.http_port is not None:  # the free one chosen for --metrics-port 0
            out.print(
                f"metrics on http://{cfg.metrics_address(engine.metrics.http_port)}/metrics",
                highlight=False,
                soft_wrap=True,
            )
        out.print(f"listening on {cfg.address(bound)}", highlight=False, soft_wrap=True)

    verbose = (ctx.obj or {}).get("verbose", False)
    with server_log(verbose, log_format):  # a refused setting is the log's line too (JSON)
        if (tls_cert is None) != (tls_key is None) or (tls_client_ca and not tls_cert):
            raise ConfigError(
                "TLS needs both --tls-cert and --tls-key (and them for --tls-client-ca)"
            )
        tls = TLSConfig(tls_cert, tls_key, tls_client_ca) if tls_cert and tls_key else None
        if auth_token is None and os.environ.get("QUANTGATE_AUTH_TOKEN") == "":
            auth_token = ""  # set but empty: refused below, not read as "no auth"
        cfg = ServeConfig(
            path=path,
            host=host,
            port=port,
            device=device.value,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            max_queue_size=max_queue_size,
            dynamic_batching=dynamic_batching,
            instances=instances,
            intra_op_threads=threads,
            cuda_device_id=cuda_device,
            max_request_bytes=max_request_bytes,
            max_message_bytes=max_message_bytes,
            shutdown_grace_s=shutdown_grace,
            max_connection_age_s=max_connection_age,
            precision=precision and precision.value,
            allow_failed_gates=allow_failed_gates,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            access_log=access_log,
            tls=tls,
            auth_token=auth_token,
            auth_token_file=auth_token_file,
        )
        if not check:
            run(cfg, on_ready=ready, exit_on_second_signal=True)
            return
        repository = verify(cfg)
    for m in repository:
        out.print(f"would serve {m.describe()}", highlight=False, soft_wrap=True)
    out.print(f"{path}: ready to serve", highlight=False, soft_wrap=True)
